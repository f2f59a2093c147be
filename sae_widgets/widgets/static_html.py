"""Static HTML of the widgets' state: the same elements and classes as the front-ends build (js/common.js),
with every piece of text escaped, for notebooks exported with no kernel and no network."""
from __future__ import annotations

import math
from collections.abc import Sequence

from ._common import display_token, esc, fixed, fmt, fmt_percent, token_color

# same geometry as HIST in js/common.js
HIST_WIDTH, HIST_HEIGHT, HIST_LEFT, HIST_RIGHT, HIST_TOP, HIST_BOTTOM = 360, 120, 40, 8, 8, 20


def color_scale(value_lists: Sequence[Sequence[float | None]], scale_hint: float = 0.0) -> tuple[float, bool]:
    """(scale, signed) of a set of values: signed when any is negative, scaled by the largest |value|."""
    max_abs, signed = 0.0, False
    for values in value_lists:
        for v in values or ():
            if v is None or not math.isfinite(v):
                continue
            signed = signed or v < 0
            max_abs = max(max_abs, abs(v))
    return (scale_hint if scale_hint > 0 else max_abs), signed


def _tooltip_title(token: str, value: float | None, top: Sequence | None) -> str:
    lines = [f"{display_token(token)}: {fmt(value)}"]
    lines += [f"#{int(latent)}: {fmt(v)}" for latent, v in (top or ())]
    return "\n".join(lines)


def tokens_html(tokens: Sequence[str], values: Sequence[float | None] | None, *, scale: float, signed: bool,
                top_latents: Sequence | None = None, peak: int | None = None, selected: int | None = None) -> str:
    parts = []
    for i, tok in enumerate(tokens):
        v = values[i] if values is not None and i < len(values) else None
        cls = "sae-tok" + (" sae-peak" if peak == i else "") + (" sae-selected" if selected == i else "")
        title = _tooltip_title(tok, v, top_latents[i] if top_latents is not None and i < len(top_latents) else None)
        parts.append(f'<span class="{cls}" data-index="{i}" style="background-color: {token_color(v, scale, signed)}" '
                     f'title="{esc(title)}">{esc(display_token(tok))}</span>')
    return f'<span class="sae-tokens">{"".join(parts)}</span>'


def histogram_svg(hist: dict | None) -> str:
    edges = list((hist or {}).get("edges") or [])
    counts = list((hist or {}).get("counts") or [])
    w, ht = HIST_WIDTH, HIST_HEIGHT
    head = f'<svg class="sae-hist" width="{w}" height="{ht}" viewBox="0 0 {w} {ht}" role="img" xmlns="http://www.w3.org/2000/svg">'
    if not counts or len(edges) != len(counts) + 1:
        return head + f'<text x="{HIST_LEFT}" y="{ht / 2:g}" class="sae-axis">no activations</text></svg>'
    lo, hi = float(edges[0]), float(edges[-1])
    span = hi - lo if hi > lo else 1.0
    max_count = max(1, *counts)
    plot_w, plot_h = w - HIST_LEFT - HIST_RIGHT, ht - HIST_TOP - HIST_BOTTOM

    def x(e):
        return HIST_LEFT + (float(e) - lo) / span * plot_w

    bars = []
    for i, c in enumerate(counts):
        bh = c / max_count * plot_h
        x0 = x(edges[i])
        bw = max(0.5, x(edges[i + 1]) - x0 - 0.5)
        bars.append(f'<rect class="sae-bar" x="{fixed(x0, 2)}" y="{fixed(HIST_TOP + plot_h - bh, 2)}" '
                    f'width="{fixed(bw, 2)}" height="{fixed(bh, 2)}"><title>{esc(fmt(edges[i]))} to {esc(fmt(edges[i + 1]))}: {int(c)}</title></rect>')
    axis = (f'<line class="sae-axis-line" x1="{HIST_LEFT}" y1="{HIST_TOP + plot_h}" x2="{w - HIST_RIGHT}" y2="{HIST_TOP + plot_h}"></line>'
            f'<text class="sae-axis" x="{HIST_LEFT}" y="{ht - 4}">{esc(fmt(lo))}</text>'
            f'<text class="sae-axis" x="{w - HIST_RIGHT}" y="{ht - 4}" text-anchor="end">{esc(fmt(hi))}</text>'
            f'<text class="sae-axis" x="{HIST_LEFT - 4}" y="{HIST_TOP + 10}" text-anchor="end">{max_count}</text>'
            f'<text class="sae-axis" x="{HIST_LEFT - 4}" y="{HIST_TOP + plot_h}" text-anchor="end">0</text>')
    return head + "".join(bars) + axis + "</svg>"


def _logit_table(title: str, entries, cls: str) -> str:
    rows = "".join(f'<tr><td><span class="sae-tok">{esc(display_token(e["token"]))}</span></td>'
                   f'<td class="sae-num">{esc(fmt(e["value"]))}</td></tr>' for e in entries or ())
    return (f'<table class="sae-logit-table {cls}"><thead><tr><th>{title}</th><th>logit</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>")


def _context_row(ctx: dict, scale: float, signed: bool) -> str:
    return (f'<div class="sae-ctx"><span class="sae-ctx-act sae-num">{esc(fmt(ctx.get("act")))}</span>'
            f'{tokens_html(ctx.get("tokens") or [], ctx.get("acts") or [], scale=scale, signed=signed, peak=ctx.get("peak"))}</div>')


def feature_scale(feature: dict) -> tuple[float, bool]:
    """The colour scale of a feature's contexts (featureScale in js/common.js)."""
    lists = [c.get("acts") for c in feature.get("top_contexts") or ()]
    lists += [c.get("acts") for q in feature.get("quantiles") or () for c in q.get("contexts") or ()]
    scale, signed = color_scale(lists)
    max_act = feature.get("max_act")
    if max_act is not None and math.isfinite(max_act) and max_act > scale:
        scale = abs(max_act)
    return scale, signed


def dashboard_body_html(feature: dict) -> str:
    scale, signed = feature_scale(feature)
    logits = feature.get("logits") or {}
    quantiles = "".join(
        f'<div class="sae-qbin"><div class="sae-qbin-title">{esc(fmt(q.get("lo")))} \u2013 {esc(fmt(q.get("hi")))}</div>'
        + "".join(_context_row(c, scale, signed) for c in q.get("contexts") or ()) + "</div>"
        for q in feature.get("quantiles") or ())
    return (
        '<div class="sae-dash-body"><div class="sae-dash-stats">'
        f'<span class="sae-stat">density <b class="sae-density">{esc(fmt_percent(feature.get("density")))}</b></span>'
        f'<span class="sae-stat">max act <b class="sae-max-act">{esc(fmt(feature.get("max_act")))}</b></span>'
        f'<span class="sae-stat">mean act <b>{esc(fmt(feature.get("mean_act")))}</b></span></div>'
        '<div class="sae-dash-row">'
        f'<div class="sae-panel"><div class="sae-panel-title">Activation histogram</div>{histogram_svg(feature.get("histogram"))}</div>'
        '<div class="sae-panel"><div class="sae-panel-title">Logit effects</div><div class="sae-logits">'
        f'{_logit_table("positive", logits.get("positive"), "sae-pos")}{_logit_table("negative", logits.get("negative"), "sae-neg")}'
        '</div></div></div>'
        '<div class="sae-panel sae-top-contexts"><div class="sae-panel-title">Top contexts</div>'
        + "".join(_context_row(c, scale, signed) for c in feature.get("top_contexts") or ()) + "</div>"
        f'<div class="sae-panel sae-quantiles"><div class="sae-panel-title">Quantile bins</div>{quantiles}</div></div>'
    )


def dashboard_html(feature: dict, explanation: str = "") -> str:
    """A whole dashboard: title, explanation, body (the live widget adds navigation controls to the title)."""
    if not feature:
        return '<div class="sae-dash"></div>'
    expl = f'<div class="sae-expl">{esc(explanation)}</div>' if explanation else ""
    return (f'<div class="sae-dash"><div class="sae-dash-head"><span class="sae-dash-title">Latent '
            f'{int(feature["latent"])}</span></div>{expl}{dashboard_body_html(feature)}</div>')


def _table_row(r: dict, selected: int | None) -> str:
    cls = ' class="sae-selected-row"' if r["latent"] == selected else ""
    chips = "".join(f'<span class="sae-chip">{esc(display_token(t))}</span>' for t in r["top_tokens"])
    return (f'<tr data-latent="{int(r["latent"])}"{cls}><td class="sae-num">{int(r["latent"])}</td>'
            f'<td class="sae-num">{esc(fmt_percent(r["density"]))}</td><td class="sae-num">{esc(fmt(r["max_act"]))}</td>'
            f'<td class="sae-num">{esc(fmt(r["mean_act"]))}</td><td>{chips}</td></tr>')


def latent_table_html(rows: Sequence[dict], *, selected: int | None = None) -> str:
    body = "".join(_table_row(r, selected) for r in rows)
    return ('<table class="sae-table"><thead><tr><th>latent</th><th>density</th><th>max act</th><th>mean act</th>'
            f"<th>top tokens</th></tr></thead><tbody>{body}</tbody></table>")
