"""FeatureDashboard: one latent's statistics (header, histogram, top contexts, quantile bins, logit effects).

Changing `latent` (from Python or the widget's controls) sends that latent's feature dict; the statistics are
read from `stats`, never recomputed.
"""
from __future__ import annotations

import traitlets

from ._common import LiveStaticWidget, jsonable, widget_css, widget_esm
from .static_html import dashboard_html

FEATURE_KEYS = ("latent", "density", "max_act", "mean_act", "histogram", "top_contexts", "quantiles", "logits")


def check_latent(latent, d_sae: int) -> int:
    if isinstance(latent, bool) or not isinstance(latent, int) and not hasattr(latent, "__index__"):
        raise TypeError(f"latent must be an int, got {type(latent).__name__} {latent!r}")
    latent = int(latent)
    if not 0 <= latent < d_sae:
        raise ValueError(f"latent={latent} is out of range: valid latents are 0..{d_sae - 1}")
    return latent


def check_optional_latent(latent, d_sae: int) -> int:
    """A `selected_latent` traitlet's validation: a valid latent, or -1 for none."""
    if latent == -1:
        return latent
    try:
        return check_latent(latent, d_sae)
    except (TypeError, ValueError) as e:
        raise traitlets.TraitError(f"{e} (or -1 for none)") from None


def feature_payload(stats, latent: int) -> dict:
    """`stats.feature(latent)` as plain JSON, checked against the statistics contract."""
    feature = stats.feature(latent)
    missing = [k for k in FEATURE_KEYS if k not in feature]
    if missing:
        raise ValueError(f"stats.feature({latent}) lacks {missing}; a feature dict holds {FEATURE_KEYS}")
    return jsonable(feature)


class FeatureDashboard(LiveStaticWidget):
    """The dashboard of one latent of `stats`; `latent` and `explanation` sync both ways."""

    _esm = widget_esm("feature_dashboard")
    _css = widget_css()
    _static_traits = ("feature", "explanation")

    latent = traitlets.Int(0).tag(sync=True)
    d_sae = traitlets.Int(1).tag(sync=True)
    feature = traitlets.Dict().tag(sync=True)           # stats.feature(latent), sent by Python
    explanation = traitlets.Unicode("").tag(sync=True)  # free text about the latent, editable in the widget

    def __init__(self, stats, latent: int = 0, *, explanation: str = "", explanations: dict[int, str] | None = None,
                 **kwargs):
        self.stats = stats
        self.explanations = dict(explanations or {})  # latent -> explanation, kept as the user moves between latents
        latent = check_latent(latent, int(stats.d_sae))
        if explanation:
            self.explanations[latent] = explanation
        self._ready = False  # the observers below wait for the initial state
        super().__init__(d_sae=int(stats.d_sae), latent=latent, feature=feature_payload(stats, latent),
                         explanation=self.explanations.get(latent, ""), **kwargs)
        self._ready = True

    @traitlets.validate("latent")
    def _check_latent(self, proposal):
        try:
            return check_latent(proposal["value"], self.d_sae)
        except (TypeError, ValueError) as e:
            raise traitlets.TraitError(str(e)) from None

    @traitlets.observe("latent")
    def _latent_changed(self, change):
        if not self._ready:
            return
        with self.hold_trait_notifications():
            self.feature = feature_payload(self.stats, change["new"])
            self.explanation = self.explanations.get(change["new"], "")

    @traitlets.observe("explanation")
    def _explanation_changed(self, change):
        if self._ready:
            self.explanations[self.latent] = change["new"]

    def static_html(self) -> str:
        return dashboard_html(self.feature, self.explanation)

    def __repr__(self) -> str:
        return f"FeatureDashboard(latent={self.latent}, d_sae={self.d_sae})"
