"""What every widget shares: its front-end source, the colour scale, number formatting, JSON cleaning and the
live-plus-static display.

Each widget's ESM is `js/common.js` followed by `js/<widget>.js` (anywidget loads one module per widget from
a string, so relative imports would not resolve). The colour and number rules below are the same formulas as
in `js/common.js`, so the static HTML looks like the live widget.
"""
from __future__ import annotations

import html
import math
import uuid
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from importlib import resources
from typing import Any

import anywidget
import numpy as np
import traitlets

SEQUENTIAL_RGB = (230, 85, 13)   # non-negative values: white -> orange
POSITIVE_RGB = (178, 24, 43)     # signed values: blue <- white -> red
NEGATIVE_RGB = (33, 102, 172)
MAX_ALPHA = 0.85                 # the strongest colour still leaves black text readable


@lru_cache(maxsize=None)
def _js_file(name: str) -> str:
    return (resources.files("sae_widgets") / "js" / name).read_text(encoding="utf-8")


def widget_esm(name: str) -> str:
    """The ESM source of one widget: the shared helpers, then the widget's own `render`."""
    return _js_file("common.js") + "\n" + _js_file(f"{name}.js")


def widget_css() -> str:
    return _js_file("widgets.css")


def token_color(value: float, scale: float, signed: bool) -> str:
    """Background of a token: alpha grows with |value| / scale (same formula as `tokenColor` in common.js)."""
    if value is None or not math.isfinite(value) or scale <= 0 or (value <= 0 and not signed):
        return "transparent"
    t = min(1.0, abs(value) / scale) * MAX_ALPHA
    alpha = math.floor(t * 1000 + 0.5) / 1000
    if alpha <= 0:
        return "transparent"
    r, g, b = (POSITIVE_RGB if value > 0 else NEGATIVE_RGB) if signed else SEQUENTIAL_RGB
    return f"rgba({r}, {g}, {b}, {alpha:g})"


BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


def display_token(token: str) -> str:
    """Token text as shown: newlines and tabs become visible marks, and bidirectional controls (which would
    silently reorder the text) show as [U+XXXX]; everything else stays literal (displayToken in common.js)."""
    out = token.replace("\n", "\u21b5").replace("\t", "\u2192")
    for ch in BIDI_CONTROLS:
        out = out.replace(ch, f"[U+{ord(ch):04X}]")
    return out


def fixed(v: float, decimals: int) -> str:
    """`v` with `decimals` digits, ties away from zero on the exact binary value, as JavaScript's toFixed."""
    return str(Decimal(v).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP))


def exponential(v: float, decimals: int) -> str:
    """`v` as d.dd…e±x, rounded as JavaScript's toExponential."""
    e = math.floor(math.log10(abs(v)))
    mant = Decimal(v).scaleb(-e).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)
    if abs(mant) >= 10:  # 9.995 rounds up to 10.00: one more digit of exponent
        e += 1
        mant = Decimal(v).scaleb(-e).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)
    return f"{mant}e{e:+d}"


def fmt(v: Any) -> str:
    """A short number: 3 significant digits, exponent form outside [1e-3, 1e4) (same rule as `fmt` in common.js)."""
    if v is None:
        return "–"
    v = float(v)
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-3:
        return exponential(v, 2)
    s = fixed(v, max(0, 2 - math.floor(math.log10(a))))
    return s.rstrip("0").rstrip(".") if "." in s else s


def fmt_percent(p: Any) -> str:
    return "–" if p is None else fmt(float(p) * 100) + "%"


def esc(text: Any) -> str:
    """HTML-escape anything shown in the static rendering (token text is untrusted)."""
    return html.escape(str(text), quote=True)


def jsonable(obj: Any) -> Any:
    """Plain JSON values for the comm: numpy scalars and arrays become Python ones, non-finite floats None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if obj is None or isinstance(obj, str):
        return obj
    if hasattr(obj, "tolist"):  # torch tensors and the like
        return jsonable(obj.tolist())
    raise TypeError(f"cannot send a {type(obj).__name__} to the widget front-end: {obj!r}")


def check_choice(name: str, value, choices) -> object:
    """A traitlet's validation against a fixed set of values."""
    if value not in choices:
        raise traitlets.TraitError(f"{name}={value!r} is not one of {tuple(choices)}")
    return value


def check_optional_index(name: str, i: int, n: int) -> int:
    """A selection traitlet's validation: -1 (none) or a position in 0..n-1."""
    if not -1 <= i < n:
        raise traitlets.TraitError(f"{name}={i} is out of range: -1 (none) or 0..{n - 1}")
    return i


class LiveStaticWidget(anywidget.AnyWidget):
    """An anywidget that also shows a `text/html` rendering of its current state.

    Displaying one puts two outputs in the cell: the live widget, and the static HTML under a display id that is
    updated whenever the state changes. JupyterLab hides the static copy as soon as the live view renders (the
    front-end adds a CSS rule for its own `_static_id`). An exported notebook (`jupyter nbconvert --to html`) cannot run
    the widget with no kernel and no network, but keeps the static copy, which needs neither.
    """

    _static_traits: tuple[str, ...] = ()  # changes to these re-render the static copy
    _static_id = traitlets.Unicode().tag(sync=True)  # ties the static copy to its live view

    @traitlets.default("_static_id")
    def _new_static_id(self):
        return uuid.uuid4().hex

    def __init__(self, **kwargs):
        self._static_handles = []  # one per display of this widget
        super().__init__(**kwargs)
        if self._static_traits:
            self.observe(lambda _change: self.refresh_static(), names=list(self._static_traits))

    def static_html(self) -> str:  # pragma: no cover - every widget overrides it
        raise NotImplementedError

    def static_document(self) -> str:
        """The static HTML output: the widget's CSS and its current state, tagged with `_static_id`."""
        return (f'<div class="sae-static" data-sae-static="{esc(self._static_id)}"><style>{widget_css()}</style>'
                f"{self.static_html()}</div>")

    def refresh_static(self) -> None:
        if self._static_handles:
            doc = self.static_document()
            for handle in self._static_handles:
                handle.update({"text/html": doc}, raw=True)

    def _ipython_display_(self):
        from IPython.display import display

        bundle = self._repr_mimebundle_()
        data, metadata = bundle if isinstance(bundle, tuple) else (bundle, {})
        display(data, metadata=metadata, raw=True)
        self._static_handles.append(display({"text/html": self.static_document()}, raw=True, display_id=True))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
