"""TokenHighlighter: tokens coloured by activation; hover shows the value and the top latents, click selects."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import traitlets

from ._common import LiveStaticWidget, check_optional_index, jsonable, widget_css, widget_esm
from .static_html import color_scale, tokens_html


def top_latent_lists(per_token, n_tokens: int) -> list[list[list[float]]]:
    """Per-token top latents as [[latent, value], ...] lists, strongest first; accepts (latent, value) pairs or
    {"latent", "value"} dicts."""
    if len(per_token) != n_tokens:
        raise ValueError(f"top latents are given for {len(per_token)} tokens, but there are {n_tokens} tokens")
    out = []
    for i, entries in enumerate(per_token):
        row = []
        for e in entries or ():
            if isinstance(e, dict):
                latent, value = e.get("latent"), e.get("value", e.get("act"))
            else:
                try:
                    latent, value = e
                except (TypeError, ValueError):
                    raise ValueError(f"token {i}: top-latent entry {e!r} is neither a (latent, value) pair nor a "
                                     f"dict with 'latent' and 'value'") from None
            row.append([int(latent), float(value)])
        row.sort(key=lambda lv: -abs(lv[1]))
        out.append(row)
    return out


def dense_top_latents(acts: np.ndarray, k: int) -> list[list[list[float]]]:
    """Per token (row), its k strongest non-zero latents by |value|, as [[latent, value], ...]."""
    k = min(k, acts.shape[1])
    idx = np.argsort(-np.abs(acts), axis=1, kind="stable")[:, :k]
    return [[[int(j), float(row[j])] for j in cols if row[j] != 0] for row, cols in zip(acts, idx)]


def normalize_acts(tokens: Sequence[str], acts, top_latents=None, k: int = 5) -> tuple[list[float | None], list | None]:
    """(per-token colouring values, per-token top latents) from any form of `acts`: one value per token; per
    token a list of (latent, value) pairs; or a dense [n_tokens, d_sae] array (its k strongest latents per token).
    With latents given, each token is coloured by its strongest one."""
    n = len(tokens)
    if hasattr(acts, "detach"):  # a torch tensor
        acts = acts.detach().float().cpu().numpy()
    if isinstance(acts, np.ndarray):
        arr = acts.astype(np.float64)
        if arr.ndim == 2:
            if arr.shape[0] != n:
                raise ValueError(f"acts has shape {arr.shape}: {arr.shape[0]} rows but there are {n} tokens")
            acts = dense_top_latents(arr, k)
        elif arr.ndim == 1:
            acts = arr.tolist()
        else:
            raise ValueError(f"acts as an array must be 1-D [n_tokens] or 2-D [n_tokens, d_sae], got shape {arr.shape}")
    acts = list(acts)
    if len(acts) != n:
        raise ValueError(f"acts has {len(acts)} entries but there are {n} tokens")
    pairs_given = n > 0 and all(isinstance(a, (list, tuple)) for a in acts)
    if pairs_given:
        if top_latents is not None:
            raise ValueError("acts already holds per-token top latents; do not pass top_latents as well")
        top = top_latent_lists(acts, n)
        values = [row[0][1] if row else 0.0 for row in top]
    else:
        try:
            values = [None if a is None else float(a) for a in acts]
        except (TypeError, ValueError):
            raise ValueError("acts must be one number per token, or per token a list of (latent, value) pairs") from None
        top = top_latent_lists(top_latents, n) if top_latents is not None else None
    values = [v if v is not None and math.isfinite(v) else None for v in values]
    return values, top


class TokenHighlighter(LiveStaticWidget):
    """Tokens coloured by activation: a sequential palette for non-negative values, a diverging one for signed.

    `acts`: one value per token, per-token (latent, value) lists, or a dense [n_tokens, d_sae] array (`k` strongest
    latents per token are kept for the tooltip). `selected_index` (-1: none) follows clicks in the browser and can be set from Python.
    """

    _esm = widget_esm("token_highlighter")
    _css = widget_css()
    _static_traits = ("tokens", "values", "top_latents", "selected_index", "scale", "signed")

    tokens = traitlets.List(traitlets.Unicode()).tag(sync=True)
    values = traitlets.List().tag(sync=True)                      # the number that colours each token (or None)
    top_latents = traitlets.List().tag(sync=True)                 # per token: [[latent, value], ...] or []
    scale = traitlets.Float(0.0).tag(sync=True)                   # |value| of the strongest colour
    signed = traitlets.Bool(False).tag(sync=True)                 # diverging palette
    selected_index = traitlets.Int(-1).tag(sync=True)

    def __init__(self, tokens: Sequence[str], acts, *, top_latents=None, k: int = 5, scale: float | None = None,
                 signed: bool | None = None, **kwargs):
        tokens = [str(t) for t in tokens]
        values, top = normalize_acts(tokens, acts, top_latents, k)
        auto_scale, auto_signed = color_scale([values])
        super().__init__(tokens=tokens, values=values, top_latents=jsonable(top or []),
                         scale=float(scale) if scale is not None else auto_scale,
                         signed=bool(signed) if signed is not None else auto_signed, **kwargs)

    @traitlets.validate("selected_index")
    def _check_selected(self, proposal):
        return check_optional_index("selected_index", proposal["value"], len(self.tokens))

    @property
    def selected_token(self) -> str | None:
        return self.tokens[self.selected_index] if self.selected_index >= 0 else None

    def static_html(self) -> str:
        sel = self.selected_index if self.selected_index >= 0 else None
        return (f'<div class="sae-hl">{tokens_html(self.tokens, self.values, scale=self.scale, signed=self.signed, top_latents=self.top_latents or None, selected=sel)}'
                "</div>")

    def __repr__(self) -> str:
        return f"TokenHighlighter(n_tokens={len(self.tokens)}, selected_index={self.selected_index})"
