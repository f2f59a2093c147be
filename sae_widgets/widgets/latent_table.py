"""The feature browser's table logic: sort, filter and page all latents in Python, so only visible rows travel."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SORT_KEYS = ("latent", "density", "max_act", "mean_act")
NUMERIC_COLUMNS = ("density", "max_act", "mean_act")


def _top_token_lists(top_tokens, n: int) -> list[list[str]]:
    if len(top_tokens) != n:
        raise ValueError(f"columns()['top_tokens'] has {len(top_tokens)} entries for {n} latents")
    out = []
    for item in top_tokens:
        if isinstance(item, str):
            out.append([item])
        elif item is None:
            out.append([])
        else:
            out.append([str(t) for t in item])
    return out


@dataclass(frozen=True)
class Page:
    positions: np.ndarray  # row positions of this page's latents, in display order
    latents: np.ndarray    # their latent ids
    n_matches: int       # how many latents pass the filters
    page: int            # the page actually shown (clamped to the last one)
    n_pages: int


class LatentTable:
    """All latents' summary columns, with cached sort orders."""

    def __init__(self, columns: dict):
        missing = [c for c in ("latent", *NUMERIC_COLUMNS, "top_tokens") if c not in columns]
        if missing:
            raise ValueError(f"stats.columns() lacks {missing}; it must hold latent, density, max_act, mean_act, "
                             f"top_tokens")
        self.latent = np.asarray(columns["latent"], dtype=np.int64)
        n = self.latent.shape[0]
        self.numeric = {}
        for c in NUMERIC_COLUMNS:
            col = np.asarray(columns[c], dtype=np.float64)
            if col.shape != (n,):
                raise ValueError(f"columns()[{c!r}] has shape {col.shape}, expected ({n},)")
            self.numeric[c] = col
        self.top_tokens = _top_token_lists(columns["top_tokens"], n)
        self._search_text = ["\x00".join(t).lower() for t in self.top_tokens]
        self._orders: dict[tuple[str, bool], np.ndarray] = {}

    def __len__(self) -> int:
        return self.latent.shape[0]

    def order(self, sort_by: str, descending: bool) -> np.ndarray:
        """Row positions sorted by `sort_by` (ties by latent id, ascending; NaN last in either direction)."""
        if sort_by not in SORT_KEYS:
            raise ValueError(f"sort_by={sort_by!r} is not one of {SORT_KEYS}")
        key = (sort_by, bool(descending))
        if key not in self._orders:
            values = self.latent.astype(np.float64) if sort_by == "latent" else self.numeric[sort_by]
            nan = np.isnan(values)
            k = np.where(nan, 0.0, -values if descending else values)
            self._orders[key] = np.lexsort((self.latent, k, nan))
        return self._orders[key]

    def mask(self, query: str = "", min_density: float | None = None, max_density: float | None = None) -> np.ndarray:
        """Which rows pass: a top token containing `query` (case-insensitive), density within the bounds."""
        keep = np.ones(len(self), dtype=bool)
        q = query.strip().lower()
        if q:
            keep &= np.fromiter((q in s for s in self._search_text), dtype=bool, count=len(self))
        density = self.numeric["density"]
        if min_density is not None:
            keep &= density >= min_density
        if max_density is not None:
            keep &= density <= max_density
        return keep

    def page(self, *, sort_by: str = "density", descending: bool = True, query: str = "",
             min_density: float | None = None, max_density: float | None = None, page: int = 0,
             page_size: int = 25) -> Page:
        if page_size < 1:
            raise ValueError(f"page_size={page_size} must be >= 1")
        order = self.order(sort_by, descending)
        rows = order[self.mask(query, min_density, max_density)[order]]
        n_pages = max(1, -(-rows.shape[0] // page_size))
        page = min(max(0, int(page)), n_pages - 1)
        shown = rows[page * page_size:(page + 1) * page_size]
        return Page(shown, self.latent[shown], int(rows.shape[0]), page, n_pages)

    def row(self, position: int) -> dict:
        row = {"latent": int(self.latent[position])}
        for c in NUMERIC_COLUMNS:
            v = float(self.numeric[c][position])
            row[c] = v if np.isfinite(v) else None
        row["top_tokens"] = self.top_tokens[position][:8]
        return row

    def rows(self, positions: np.ndarray) -> list[dict]:
        return [self.row(int(p)) for p in positions]
