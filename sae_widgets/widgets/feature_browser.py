"""FeatureBrowser: a sortable, searchable table of all latents; a click opens the latent's dashboard.

Sorting, filtering and paging run in Python (`LatentTable`); the front-end receives only the visible rows.
"""
from __future__ import annotations

import traitlets

from ._common import LiveStaticWidget, check_choice, jsonable, widget_css, widget_esm
from .feature_dashboard import check_optional_latent, feature_payload
from .latent_table import SORT_KEYS, LatentTable
from .static_html import dashboard_html, latent_table_html

QUERY_TRAITS = ("sort_by", "descending", "query", "min_density", "max_density", "page", "page_size")


class FeatureBrowser(LiveStaticWidget):
    """All latents of `stats` in a table; `selected_latent` (-1: none) follows row clicks and shows its dashboard."""

    _esm = widget_esm("feature_browser")
    _css = widget_css()
    _static_traits = ("rows", "feature")

    sort_by = traitlets.Unicode("density").tag(sync=True)
    descending = traitlets.Bool(True).tag(sync=True)
    query = traitlets.Unicode("").tag(sync=True)              # a substring of a top token, case-insensitive
    min_density = traitlets.Float(None, allow_none=True).tag(sync=True)
    max_density = traitlets.Float(None, allow_none=True).tag(sync=True)
    page = traitlets.Int(0).tag(sync=True)
    page_size = traitlets.Int(25).tag(sync=True)
    rows = traitlets.List().tag(sync=True)                   # the visible page only
    n_matches = traitlets.Int(0).tag(sync=True)
    n_pages = traitlets.Int(1).tag(sync=True)
    n_latents = traitlets.Int(0).tag(sync=True)
    selected_latent = traitlets.Int(-1).tag(sync=True)
    feature = traitlets.Dict().tag(sync=True)                # dashboard of selected_latent ({} when none)

    def __init__(self, stats, *, page_size: int = 25, sort_by: str = "density", descending: bool = True, **kwargs):
        self.stats = stats
        self.table = LatentTable(stats.columns())
        super().__init__(n_latents=len(self.table), page_size=page_size, sort_by=sort_by, descending=descending,
                         **kwargs)
        self.observe(self._requery, names=list(QUERY_TRAITS))
        self._requery()

    @traitlets.validate("sort_by")
    def _check_sort(self, proposal):
        return check_choice("sort_by", proposal["value"], SORT_KEYS)

    @traitlets.validate("page_size")
    def _check_page_size(self, proposal):
        if proposal["value"] < 1:
            raise traitlets.TraitError(f"page_size={proposal['value']} must be >= 1")
        return proposal["value"]

    @traitlets.validate("selected_latent")
    def _check_selected(self, proposal):
        return check_optional_latent(proposal["value"], int(self.stats.d_sae))

    def _requery(self, change=None):
        if change is not None and change["name"] in ("query", "min_density", "max_density", "sort_by",
                                                      "descending", "page_size") and self.page != 0:
            self.page = 0  # a new filter or order starts at the first page; this re-enters _requery
            return
        result = self.table.page(sort_by=self.sort_by, descending=self.descending, query=self.query,
                                 min_density=self.min_density, max_density=self.max_density, page=self.page,
                                 page_size=self.page_size)
        with self.hold_trait_notifications():
            self.rows = jsonable(self.table.rows(result.positions))
            self.n_matches, self.n_pages = result.n_matches, result.n_pages
            if result.page != self.page:
                self.page = result.page

    @traitlets.observe("selected_latent")
    def _selected_changed(self, change):
        latent = change["new"]
        self.feature = feature_payload(self.stats, latent) if latent >= 0 else {}

    def open_dashboard(self):
        """A separate FeatureDashboard on the selected latent (to keep it open while browsing on)."""
        from .feature_dashboard import FeatureDashboard

        if self.selected_latent < 0:
            raise ValueError("no latent is selected: click a row (or set selected_latent) first")
        return FeatureDashboard(self.stats, self.selected_latent)

    def visible_latents(self) -> list[int]:
        return [r["latent"] for r in self.rows]

    def static_html(self) -> str:
        sel = self.selected_latent if self.selected_latent >= 0 else None
        first = self.page * self.page_size
        summary = (f'<div class="sae-controls"><span class="sae-count">{self.n_matches} of {self.n_latents} latents'
                   f' · rows {first + 1 if self.rows else 0}–{first + len(self.rows)} · sorted by {self.sort_by}'
                   f' {"↓" if self.descending else "↑"}</span></div>')
        dash = dashboard_html(self.feature) if self.feature else ""
        return f'<div class="sae-browser">{summary}{latent_table_html(self.rows, selected=sel)}{dash}</div>'

    def __repr__(self) -> str:
        return f"FeatureBrowser(n_latents={self.n_latents}, n_matches={self.n_matches}, page={self.page})"
