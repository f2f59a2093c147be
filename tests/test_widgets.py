"""Python side of the widgets: traitlet sync, the browser's sort/filter/paging against a brute-force reference,
the prompt explorer against a direct model + SAE run, and the escaped static HTML fallback."""
from __future__ import annotations

import html.parser
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import traitlets

sys.path.insert(0, str(Path(__file__).parent))
from browser_harness import XSS_TOKENS, StandInStats, brute_force_page  # noqa: E402

from sae_widgets.widgets import FeatureBrowser, FeatureDashboard, TokenHighlighter  # noqa: E402
from sae_widgets.widgets._common import display_token, fmt, jsonable, token_color  # noqa: E402
from sae_widgets.widgets.latent_table import SORT_KEYS, LatentTable  # noqa: E402
from sae_widgets.widgets.token_highlighter import normalize_acts  # noqa: E402


# ------------------------------------------------------------------------------------------ helpers
def front_end_update(widget, **state):
    """Deliver a state update the way the browser's comm message arrives in the kernel."""
    widget._handle_msg({"content": {"data": {"method": "update", "state": state, "buffer_paths": []}}, "buffers": []})


class SentMessages:
    """Records what the kernel sends to the front-end over a widget's comm."""

    def __init__(self, widget):
        self.states: list[dict] = []
        widget.comm.send = lambda data=None, buffers=None, **kw: self.states.append((data or {}).get("state", {}))

    def keys(self) -> set[str]:
        return {k for s in self.states for k in s}


class Elements(html.parser.HTMLParser):
    """Tags in a document, and the text of every `sae-tok` span (entities decoded, as a browser would show it)."""

    def __init__(self, doc: str):
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.token_texts: list[str] = []
        self.titles: list[str] = []
        self._in_tok = 0
        self._buf: list[str] = []
        self.feed(doc)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        a = dict(attrs)
        if "title" in a:
            self.titles.append(a["title"])
        if tag == "span" and "sae-tok" in (a.get("class") or "").split():
            self._in_tok, self._buf = 1, []

    def handle_endtag(self, tag):
        if tag == "span" and self._in_tok:
            self.token_texts.append("".join(self._buf))
            self._in_tok = 0

    def handle_data(self, data):
        if self._in_tok:
            self._buf.append(data)


SAFE_TAGS = {"div", "span", "style", "svg", "rect", "title", "text", "line", "table", "thead", "tbody", "tr", "th",
             "td", "b"}


# ------------------------------------------------------------------------------------------ formatting rules
def test_token_color_hand_computed():
    assert token_color(1.0, 2.0, False) == "rgba(230, 85, 13, 0.425)"   # 0.5 * 0.85
    assert token_color(4.0, 2.0, False) == "rgba(230, 85, 13, 0.85)"    # clipped at the scale
    assert token_color(-1.0, 2.0, True) == "rgba(33, 102, 172, 0.425)"  # negative side of the diverging palette
    assert token_color(2.0, 2.0, True) == "rgba(178, 24, 43, 0.85)"
    assert token_color(-1.0, 2.0, False) == "transparent"               # sequential palette: nothing below zero
    assert token_color(0.0, 2.0, True) == "transparent"
    assert token_color(float("nan"), 2.0, True) == "transparent"
    assert token_color(1.0, 0.0, False) == "transparent"


def test_fmt_hand_computed():
    assert [fmt(v) for v in (0, 1, 1.5, 0.125, 12.345, 999.4, 0.001, 12345.0, 0.00012, -3.14159, None)] == \
        ["0", "1", "1.5", "0.125", "12.3", "999", "0.001", "1.23e+4", "1.20e-4", "-3.14", "–"]


def test_fixed_and_exponential_round_ties_away_from_zero_like_javascript():
    from sae_widgets.widgets._common import exponential, fixed

    # 0.125 and 2.5 are exact binary values: JavaScript's (0.125).toFixed(2) is "0.13", Python's format "0.12"
    assert [fixed(0.125, 2), fixed(-0.125, 2), fixed(2.5, 0), fixed(0.1, 2), fixed(1.005, 2)] == \
        ["0.13", "-0.13", "3", "0.10", "1.00"]                      # 1.005 is 1.00499999… in binary
    assert [exponential(12345.0, 2), exponential(99960.0, 2), exponential(0.000125, 2)] == \
        ["1.23e+4", "1.00e+5", "1.25e-4"]


def test_display_token_marks_newlines_only():
    assert display_token("a\nb\tc <d>") == "a\u21b5b\u2192c <d>"


def test_jsonable_cleans_numpy_and_non_finite():
    out = jsonable({"a": np.float32(1.5), "b": np.arange(3), "c": [np.nan, np.inf, 2], "d": np.int64(4)})
    assert out == {"a": 1.5, "b": [0, 1, 2], "c": [None, None, 2], "d": 4}
    json.dumps(out, allow_nan=False)
    with pytest.raises(TypeError, match="object"):
        jsonable({"x": object()})


# ------------------------------------------------------------------------------------------ token highlighter
def test_highlighter_accepts_values_or_per_token_top_lists():
    values, top = normalize_acts(["a", "b"], [0.5, -1.0])
    assert values == [0.5, -1.0] and top is None
    values, top = normalize_acts(["a", "b", "c"], [[(3, 1.0), (5, -2.0)], [{"latent": 7, "value": 0.25}], []])
    assert values == [-2.0, 0.25, 0.0]                     # the strongest |value| colours the token
    assert top == [[[5, -2.0], [3, 1.0]], [[7, 0.25]], []]
    dense = np.array([[0.0, 2.0, -3.0, 0.5], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # [n_tokens, d_sae]
    values, top = normalize_acts(["a", "b", "c"], dense, k=2)
    assert values == [-3.0, 0.0, 1.0] and top == [[[2, -3.0], [1, 2.0]], [], [[0, 1.0]]]
    import torch
    assert normalize_acts(["a", "b", "c"], torch.tensor(dense), k=2) == (values, top)
    w = TokenHighlighter(["x", "y"], np.array([0.0, 3.0]))
    assert (w.scale, w.signed) == (3.0, False)
    w = TokenHighlighter(["x", "y"], [1.0, -3.0])
    assert (w.scale, w.signed) == (3.0, True)


@pytest.mark.parametrize("acts, match", [
    ([1.0], "acts has 1 entries but there are 2 tokens"),
    (np.zeros((3, 3)), r"acts has shape \(3, 3\): 3 rows but there are 2 tokens"),
    (np.zeros((2, 3, 1)), r"1-D \[n_tokens\] or 2-D \[n_tokens, d_sae\], got shape \(2, 3, 1\)"),
    ([[(1, 2, 3)], []], "neither a \\(latent, value\\) pair"),
    (["x", "y"], "one number per token"),
])
def test_highlighter_rejects_bad_acts(acts, match):
    with pytest.raises(ValueError, match=match):
        TokenHighlighter(["a", "b"], acts)


def test_highlighter_selection_syncs_both_ways():
    w = TokenHighlighter(["a", "b", "c"], [1.0, 2.0, 3.0])
    sent = SentMessages(w)
    seen = []
    w.observe(lambda ch: seen.append(ch["new"]), "selected_index")
    front_end_update(w, selected_index=2)                 # a click in the browser
    assert w.selected_index == 2 and w.selected_token == "c" and seen == [2]
    w.selected_index = 0                                   # set from Python: goes to the front-end
    assert {"selected_index": 0} in sent.states
    with pytest.raises(traitlets.TraitError, match=r"selected_index=3 is out of range: -1 \(none\) or 0..2"):
        w.selected_index = 3


# ------------------------------------------------------------------------------------------ dashboard
def test_dashboard_latent_change_sends_the_new_feature_without_a_sweep():
    stats = StandInStats(d_sae=40)
    w = FeatureDashboard(stats, latent=3, explanation="fires on whales")
    assert w.feature == jsonable(stats.feature(3)) and w.explanation == "fires on whales"
    sent = SentMessages(w)
    front_end_update(w, latent=11)                         # the ▶ button / number box in the widget
    assert w.feature["latent"] == 11 and w.feature == jsonable(stats.feature(11))
    assert "feature" in sent.keys()
    assert w.explanation == ""                             # latent 11 has no explanation yet
    front_end_update(w, explanation="commas")
    w.latent = 3                                           # from Python: back to latent 3 and its text
    assert w.explanation == "fires on whales" and w.feature["latent"] == 3
    assert w.explanations == {3: "fires on whales", 11: "commas"}
    assert stats.feature_calls == [3, 3, 11, 11, 3]        # one call per latent change (and the references above)


def test_dashboard_rejects_bad_latents():
    stats = StandInStats(d_sae=10)
    with pytest.raises(ValueError, match=r"latent=10 is out of range: valid latents are 0..9"):
        FeatureDashboard(stats, latent=10)
    w = FeatureDashboard(stats, latent=0)
    with pytest.raises(traitlets.TraitError, match=r"latent=-1 is out of range: valid latents are 0..9"):
        w.latent = -1
    assert w.latent == 0


def test_dashboard_rejects_a_feature_dict_missing_keys():
    class Broken(StandInStats):
        def feature(self, i):
            f = super().feature(i)
            del f["quantiles"]
            return f
    with pytest.raises(ValueError, match=r"lacks \['quantiles'\]"):
        FeatureDashboard(Broken(d_sae=4), latent=1)


# ------------------------------------------------------------------------------------------ browser table
@pytest.fixture(scope="module")
def big_stats():
    return StandInStats(d_sae=16_384, seed=1)


def test_latent_table_matches_brute_force(big_stats):
    cols = big_stats.columns()
    cols["density"] = np.round(cols["density"], 3)          # many ties: the tie-break by latent id matters
    cols["max_act"][::97] = np.nan                          # NaNs go last in both directions
    table = LatentTable(cols)
    rng = np.random.default_rng(0)
    cases = 0
    for sort_by in SORT_KEYS:
        for descending in (True, False):
            for query, lo, hi in [("", None, None), ("WHALE", None, None), ("<img", 0.001, None),
                                  ("\u202e", None, 0.02), (" a", 0.0, 0.0), ("no such token", None, None)]:
                for page in (0, 1, int(rng.integers(2, 50)), 10**6):
                    args = dict(sort_by=sort_by, descending=descending, query=query, min_density=lo,
                                max_density=hi, page=page, page_size=37)
                    got = table.page(**args)
                    want, n, want_page = brute_force_page(cols, **args)
                    assert got.latents.tolist() == want, args
                    assert (got.n_matches, got.page) == (n, want_page), args
                    cases += 1
    assert cases == len(SORT_KEYS) * 2 * 6 * 4


def test_latent_table_errors_name_the_bad_value(big_stats):
    table = LatentTable(big_stats.columns())
    with pytest.raises(ValueError, match=r"sort_by='size' is not one of \('latent', 'density', 'max_act', 'mean_act'\)"):
        table.page(sort_by="size")
    with pytest.raises(ValueError, match="page_size=0 must be >= 1"):
        table.page(page_size=0)
    with pytest.raises(ValueError, match=r"lacks \['mean_act'\]"):
        LatentTable({k: v for k, v in big_stats.columns().items() if k != "mean_act"})


def test_browser_sends_only_the_visible_page(big_stats):
    big_stats.feature_calls.clear()
    w = FeatureBrowser(big_stats, page_size=20)
    assert big_stats.feature_calls == []                    # no dashboard is computed up front
    cols = big_stats.columns()
    want, n, _ = brute_force_page(cols, sort_by="density", descending=True, query="", min_density=None,
                                  max_density=None, page=0, page_size=20)
    assert w.visible_latents() == want and w.n_matches == n == 16_384 and w.n_latents == 16_384
    assert len(json.dumps(w.rows)) < 5_000                  # 20 rows travel, not 16k
    sent = SentMessages(w)
    front_end_update(w, page=3)
    assert w.visible_latents() == brute_force_page(cols, sort_by="density", descending=True, query="",
                                                   min_density=None, max_density=None, page=3, page_size=20)[0]
    front_end_update(w, query="whale")                      # a new query starts at page 0
    want, n, _ = brute_force_page(cols, sort_by="density", descending=True, query="whale", min_density=None,
                                  max_density=None, page=0, page_size=20)
    assert (w.page, w.visible_latents(), w.n_matches) == (0, want, n)
    assert all(len(s.get("rows", [])) <= 20 for s in sent.states)
    front_end_update(w, sort_by="latent", descending=False, query="", min_density=0.05)
    assert w.visible_latents() == brute_force_page(cols, sort_by="latent", descending=False, query="",
                                                   min_density=0.05, max_density=None, page=0, page_size=20)[0]
    front_end_update(w, page=10**6)                         # past the end: clamped to the last page
    assert w.page == w.n_pages - 1


def test_browser_row_click_opens_that_dashboard(big_stats):
    w = FeatureBrowser(big_stats)
    latent = w.visible_latents()[4]
    front_end_update(w, selected_latent=latent)
    assert w.feature == jsonable(big_stats.feature(latent))
    assert w.open_dashboard().feature == w.feature                  # the same latent in a widget of its own
    front_end_update(w, selected_latent=-1)
    assert w.feature == {}
    with pytest.raises(ValueError, match="no latent is selected"):
        w.open_dashboard()
    with pytest.raises(traitlets.TraitError, match=r"latent=16384 is out of range: valid latents are 0..16383 \(or -1"):
        w.selected_latent = 16_384
    with pytest.raises(traitlets.TraitError, match="sort_by='size' is not one of"):
        w.sort_by = "size"
    with pytest.raises(traitlets.TraitError, match=r"sort_by='size' is not one of \('latent', 'density'"):
        FeatureBrowser(big_stats, sort_by="size")  # the constructor goes through the same validation
    with pytest.raises(traitlets.TraitError, match="page_size=0 must be >= 1"):
        FeatureBrowser(big_stats, page_size=0)


# ------------------------------------------------------------------------------------------ static fallback
def _check_static(doc: str, expected_tokens: list[str]):
    el = Elements(doc)
    assert el.tags <= SAFE_TAGS, el.tags - SAFE_TAGS       # token text never becomes markup
    for tok in expected_tokens:
        assert display_token(tok) in el.token_texts, tok   # and reads back literally
    assert "<img" not in doc and "<script" not in doc.lower()
    return el


def test_static_html_escapes_hostile_tokens():
    stats = StandInStats(d_sae=8)
    toks = XSS_TOKENS + ["line\nbreak"]
    w = TokenHighlighter(toks, list(range(len(toks))), top_latents=[[(1, 0.5)]] * len(toks))
    el = _check_static(w.static_document(), toks)
    assert el.token_texts == [display_token(t) for t in toks]
    assert any(t.startswith(XSS_TOKENS[0]) and "#1: 0.5" in t for t in el.titles)  # tooltip text in title=
    _check_static(FeatureDashboard(stats, latent=2, explanation="<b>bold?</b>").static_document(), XSS_TOKENS)
    assert "&lt;b&gt;bold?&lt;/b&gt;" in FeatureDashboard(stats, latent=2, explanation="<b>bold?</b>").static_html()
    b = FeatureBrowser(stats, sort_by="latent", descending=False)
    b.selected_latent = 1
    el = _check_static(b.static_document(), XSS_TOKENS)
    assert "8 of 8 latents" in b.static_html()


def test_static_copy_shows_the_current_state():
    stats = StandInStats(d_sae=8)
    w = FeatureDashboard(stats, latent=1)
    assert 'Latent 1</span>' in w.static_html()
    w.latent = 5
    assert 'Latent 5</span>' in w.static_html() and 'Latent 1</span>' not in w.static_html()
    h = TokenHighlighter(["a", "b"], [1.0, 2.0])
    h.selected_index = 1
    assert 'class="sae-tok sae-selected" data-index="1"' in h.static_html()


def test_display_publishes_the_widget_and_an_updatable_static_copy(monkeypatch):
    """`display(w)` gives two outputs; a later state change updates the static one by display id."""
    from IPython.core.interactiveshell import InteractiveShell

    published = []
    shell = InteractiveShell.instance()
    monkeypatch.setattr(shell.display_pub, "publish",
                        lambda data, metadata=None, transient=None, update=False, **kw:
                        published.append((data, transient or {}, update)))
    from IPython.display import display

    w = TokenHighlighter(["<b>", "x"], [1.0, 0.0])
    display(w)
    assert len(published) == 2
    (live, _, _), (static, transient, update) = published
    assert live["application/vnd.jupyter.widget-view+json"]["model_id"] == w.model_id
    assert "text/html" not in live and not update
    assert "&lt;b&gt;" in static["text/html"] and f'data-sae-static="{w._static_id}"' in static["text/html"]
    display_id = transient["display_id"]
    w.selected_index = 0
    data, transient, update = published[-1]
    assert update and transient["display_id"] == display_id and "sae-selected" in data["text/html"]


@pytest.mark.parametrize("saved_widget_state", [False, True])
def test_nbconvert_html_keeps_the_static_copy(monkeypatch, saved_widget_state):
    """nbconvert renders the widget view (a script that needs a CDN) when the notebook saved widget state, as
    papermill's do, and text/plain otherwise: either way the separate static output is in the HTML."""
    import nbformat
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.display import display
    from nbconvert import HTMLExporter

    outputs = []
    monkeypatch.setattr(InteractiveShell.instance().display_pub, "publish",
                        lambda data, metadata=None, **kw: outputs.append(
                            nbformat.v4.new_output("display_data", data=data, metadata=metadata or {})))
    w = TokenHighlighter(XSS_TOKENS, [1.0, -1.0, 0.5, 0.0, 2.0])
    display(w)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("w", outputs=outputs)])
    if saved_widget_state:
        nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {
            "version_major": 2, "version_minor": 0, "state": {w.model_id: {"model_name": "AnyModel", "model_module":
                                                                           "anywidget", "state": {}}}}}
    body, _ = HTMLExporter().from_notebook_node(nb)
    assert body.count('class="sae-static"') == 1 and XSS_TOKENS[0] not in body and XSS_TOKENS[1] not in body
    assert ('type="application/vnd.jupyter.widget-view+json"' in body) == saved_widget_state
    start = body.index('class="sae-static"')
    el = _check_static(body[start - 5:body.index("</div></div>", start) + 12], XSS_TOKENS)
    assert len(el.token_texts) == len(XSS_TOKENS)


# ------------------------------------------------------------------------------------------ prompt explorer
@pytest.fixture(scope="module")
def small_sae():
    import torch

    from sae_widgets.sae import SAE, SAEConfig

    torch.manual_seed(0)
    return SAE(SAEConfig(arch="topk", d_in=256, d_sae=512, k=8, hook="blocks.1.hook_resid_post")).eval()


def test_prompt_explorer_matches_a_direct_run(model, small_sae):
    import torch

    from sae_widgets.widgets import PromptExplorer

    stats = StandInStats(d_sae=512)
    text = "Call me Ishmael. The <b>whale</b>"
    w = PromptExplorer(model, small_sae, stats, text=text, k=3)
    # reference: transformer_lens's own tokenisation and cache, then the SAE
    toks = model.to_tokens(text, prepend_bos=True)
    _, cache = model.run_with_cache(toks, names_filter=["blocks.1.hook_resid_post"])
    f = small_sae.encode(cache["blocks.1.hook_resid_post"][0, 1:]).detach()
    assert w.tokens == model.to_str_tokens(text, prepend_bos=True)[1:]
    assert len(w.top_latents) == len(w.tokens) == f.shape[0]
    for t in range(f.shape[0]):
        want = torch.topk(f[t], 3)
        assert [lv[0] for lv in w.top_latents[t]] == want.indices.tolist()
        np.testing.assert_allclose([lv[1] for lv in w.top_latents[t]], want.values.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(w.values, f.max(1).values.numpy(), rtol=1e-4, atol=1e-5)  # strongest latent colours
    latent = w.top_latents[2][0][0]
    front_end_update(w, selected_index=2)
    front_end_update(w, selected_latent=latent)             # a click on that latent's button
    assert w.feature == jsonable(stats.feature(latent))
    np.testing.assert_allclose(w.values, f[:, latent].numpy(), rtol=1e-4, atol=1e-5)
    front_end_update(w, text="")                            # empty prompt: a message, not an exception
    assert w.tokens == [] and "empty" in w.error
    front_end_update(w, text="word " * 300)
    assert "the model's context is 256 tokens" in w.error
    _check_static(w.static_document(), [])


def test_prompt_explorer_needs_stats_of_the_same_sae(model, small_sae):
    from sae_widgets.widgets import PromptExplorer

    with pytest.raises(ValueError, match="stats describe 64 latents but the SAE has d_sae=512"):
        PromptExplorer(model, small_sae, StandInStats(d_sae=64))


# ------------------------------------------------------------------------------------------ with the real statistics
@pytest.fixture(scope="module")
def real_stats(model, small_sae):
    from sae_widgets.feature_stats import FeatureStats
    from sae_widgets.token_sources import EmbeddedCorpus

    return FeatureStats.compute(model, small_sae, EmbeddedCorpus("val"), n_tokens=2048, n_ctx=64, show_progress=False)


def test_widgets_on_real_feature_stats(model, small_sae, real_stats):
    from sae_widgets.widgets import PromptExplorer

    cols = real_stats.columns()
    b = FeatureBrowser(real_stats, page_size=30)
    assert b.visible_latents() == brute_force_page(cols, sort_by="density", descending=True, query="", min_density=None,
                                                   max_density=None, page=0, page_size=30)[0]
    word = cols["top_tokens"][b.visible_latents()[0]].split(" / ")[0]
    front_end_update(b, query=word, sort_by="max_act")
    want, n, _ = brute_force_page(cols, sort_by="max_act", descending=True, query=word, min_density=None,
                                  max_density=None, page=0, page_size=30)
    assert (b.visible_latents(), b.n_matches) == (want, n) and n >= 1
    latent = want[0]
    front_end_update(b, selected_latent=latent)
    assert b.feature == jsonable(real_stats.feature(latent))
    d = FeatureDashboard(real_stats, latent=latent)
    first = real_stats.feature(latent)["top_contexts"][0]
    el = _check_static(d.static_document(), first["tokens"])
    run = [display_token(t) for t in first["tokens"]]
    assert any(el.token_texts[i:i + len(run)] == run for i in range(len(el.token_texts)))  # the context, in order
    ex = PromptExplorer(model, small_sae, real_stats, text="The whale")
    front_end_update(ex, selected_latent=ex.top_latents[0][0][0])
    assert ex.feature == jsonable(real_stats.feature(ex.top_latents[0][0][0]))
