"""`export_html` writes a notebook that a browser opens with no network, and still shows every widget.

One small notebook is executed once by nbclient (as papermill does: the widget state is saved) on the embedded
model, a seeded random SAE and real `FeatureStats` of 512 tokens. It shows FeatureDashboard, FeatureBrowser,
PromptExplorer, SteeringPanel and a finished TrainingMonitor, and its last cell writes what each widget holds to
expect.json, the reference the page is checked against. nbconvert's default export of the same notebook is the
"before": it points the browser at cdnjs and unpkg.
"""
from __future__ import annotations

import html.parser
import json
import re
import shutil
import sys
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from browser_harness import isolated_jupyter_env  # noqa: E402

from sae_widgets.notebook_export import export_html  # noqa: E402
from sae_widgets.widgets._common import display_token  # noqa: E402

CELLS = [
    """import json, torch
from sae_widgets.feature_stats import FeatureStats
from sae_widgets.models import load_model
from sae_widgets.sae import SAE, SAEConfig
from sae_widgets.synthetic import SyntheticActivations
from sae_widgets.token_sources import EmbeddedCorpus
from sae_widgets.train import Trainer, TrainConfig
from sae_widgets.widgets import FeatureBrowser, FeatureDashboard, PromptExplorer, SteeringPanel, TrainingMonitor
model = load_model(device="cpu")
torch.manual_seed(0)
sae = SAE(SAEConfig(arch="topk", d_in=256, d_sae=128, k=4, hook="blocks.1.hook_resid_post")).eval()
stats = FeatureStats.compute(model, sae, EmbeddedCorpus("val"), n_tokens=512, n_ctx=32, show_progress=False)""",
    """dash = FeatureDashboard(stats, latent=int(stats.columns()["density"].argmax()))
dash""",
    """browser = FeatureBrowser(stats, page_size=5)
browser""",
    """explorer = PromptExplorer(model, sae, stats, text="Call me Ishmael.")
explorer""",
    """panel = SteeringPanel(model, sae, stats, prompt="The whale and the ship")
panel.temperature, panel.max_new_tokens = 0.0, 4
panel.add_latent(3, 5.0, "add")
panel.generate()
panel""",
    """torch.manual_seed(0)
store = SyntheticActivations(d_in=16, n_features=32, batch_size=64, mean_active=3, seed=0)
trainer = Trainer(SAE(SAEConfig(arch="topk", d_in=16, d_sae=32, k=4)), store,
                  TrainConfig(total_tokens=64 * 20, progress=False, log_every=1, init_tokens=128))
monitor = TrainingMonitor(trainer, refresh_s=0.05)
monitor.start()
monitor""",
    """monitor.wait()
with open("expect.json", "w") as f:
    json.dump({"dash_latent": dash.latent, "dash_context": stats.feature(dash.latent)["top_contexts"][0]["tokens"],
               "browser_rows": browser.visible_latents(), "explorer_tokens": explorer.tokens,
               "baseline": panel.current["baseline"]["tokens"], "steered": panel.current["steered"]["tokens"],
               "monitor_status": monitor.status, "monitor_final": len(monitor.final_metrics)}, f)""",
]
HEADING = "Offline export of every widget"
WIDGET_STATE_KEY = "application/vnd.jupyter.widget-state+json"
# what nbconvert's default `lab` template makes a browser fetch
CDN = ("https://cdnjs.cloudflare.com/ajax/libs/require.js/", "https://cdnjs.cloudflare.com/ajax/libs/mathjax/",
       "https://unpkg.com/@jupyter-widgets/html-manager@")


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> Path:
    """The notebook executed by nbclient in an isolated Jupyter environment (its kernel is this interpreter)."""
    import nbclient

    folder = tmp_path_factory.mktemp("export")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {HEADING}\n\nInline math $x^2$ stays as its source.")]
    nb.cells += [nbformat.v4.new_code_cell(c) for c in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in isolated_jupyter_env(folder / ".jupyter").items():
            if key.startswith("JUPYTER_") or key == "HF_HUB_OFFLINE":
                mp.setenv(key, value)
        nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                resources={"metadata": {"path": str(folder)}}).execute()
    assert WIDGET_STATE_KEY in nb.metadata.get("widgets", {}), "nbclient saved no widget state: the test proves nothing"
    path = folder / "widgets.ipynb"
    nbformat.write(nb, path)
    return path



class FetchedURLs(html.parser.HTMLParser):
    """http(s) URLs a browser loads from a page: src/href/srcset/poster/data attributes (not <a href>, a link the
    reader may follow), CSS url(...) and @import in <style> and style=, and any http(s) URL in a <script>
    (scripts can fetch what they name; counted conservatively)."""

    ATTRS = {"src", "href", "srcset", "poster", "data", "background"}
    CSS_URL = re.compile(r"""(?:url\(\s*|@import\s+)['"]?(https?://[^'")\s]+)""", re.I)
    ANY_URL = re.compile(r"https?://[^'\"`\s<>)]+", re.I)

    def __init__(self, doc: str):
        super().__init__(convert_charrefs=True)
        self.urls: list[str] = []
        self._in: str | None = None
        self.feed(doc)

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            value = value or ""
            if name == "style":
                self._css(value)
            elif name in self.ATTRS and tag != "a" and re.match(r"\s*https?:", value, re.I):
                self.urls.append(value.strip())
        self._in = tag if tag in ("style", "script") else None

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in == "style":
            self._css(data)
        elif self._in == "script":
            self.urls += self.ANY_URL.findall(data)

    def _css(self, text: str):
        self.urls += self.CSS_URL.findall(re.sub(r"/\*.*?\*/", "", text, flags=re.S))


def fetched_urls(doc: str) -> list[str]:
    return FetchedURLs(doc).urls


@pytest.fixture(scope="module")
def offline_html(executed) -> Path:
    return export_html(executed, executed.with_name("offline.html"))


# ------------------------------------------------------------------------------------------ without a browser
def test_export_has_no_remote_url_and_keeps_every_static_copy(executed, offline_html):
    doc = offline_html.read_text(encoding="utf-8")
    assert fetched_urls(doc) == []
    # stricter: apart from links in the CSS's comments and the SVG namespace (an identifier, never fetched), no
    # http(s) string is left anywhere (the notebook has no <a href> links of its own; those would be kept)
    rest = re.sub(r"/\*.*?\*/", "", doc, flags=re.S).replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert re.findall(r"https?://[^\s\"'<>]+", rest) == []
    assert doc.count('class="sae-static"') == 5
    assert "application/vnd.jupyter.widget-view+json" not in doc and WIDGET_STATE_KEY not in doc
    assert "<script" not in doc                                        # nothing to run at all
    assert "FeatureDashboard(" not in doc                              # the live views' text/plain went too
    assert nbformat.read(executed, as_version=4).metadata["widgets"]  # the notebook on disk is left as it was
    assert export_html(executed) == executed.with_suffix(".html") and executed.with_suffix(".html").is_file()


def test_default_nbconvert_export_points_the_browser_at_cdns(executed, browser):
    """The "before": nbconvert's default HTML (what `jupyter nbconvert --to html` and the old run_headless
    wrote) asks cdnjs for require.js and MathJax and unpkg for the widget manager; a browser tries all three."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
    urls = fetched_urls(body)
    for cdn in CDN:
        assert any(u.startswith(cdn) for u in urls), (cdn, urls)
    path = executed.with_name("default.html")
    path.write_text(body, encoding="utf-8")
    aborted, failed, page = open_offline(browser, path)
    for cdn in CDN:
        assert any(u.startswith(cdn) for u in aborted), (cdn, aborted)
    page.context.close()


def test_export_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.ipynb: no such notebook file") as e:
        export_html(tmp_path / "missing.ipynb")
    assert "\n" not in str(e.value)
    (tmp_path / "notes.ipynb").write_text("these are not JSON", encoding="utf-8")
    with pytest.raises(ValueError, match=r"notes\.ipynb: not a Jupyter notebook") as e:
        export_html(tmp_path / "notes.ipynb")
    assert "\n" not in str(e.value)
    (tmp_path / "list.ipynb").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match=r"list\.ipynb: not a Jupyter notebook"):
        export_html(tmp_path / "list.ipynb")
    assert not list(tmp_path.glob("*.html"))


def test_only_our_live_views_are_dropped_another_widget_keeps_its_text(tmp_path):
    """Saved state tells our widgets (they sync `_static_id`) from others; with no saved state, our repr does."""
    view = "application/vnd.jupyter.widget-view+json"

    def out(model_id, text):
        return nbformat.v4.new_output("display_data", data={view: {"model_id": model_id, "version_major": 2,
                                                                   "version_minor": 0}, "text/plain": text})

    static = nbformat.v4.new_output("display_data", data={"text/html": '<div class="sae-static">copy</div>'})
    outputs = [out("ours", "MyWidget()"), static, out("slider", "IntSlider(value=3)"),
               out("unsaved", "FeatureDashboard(latent=1)")]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("w", outputs=outputs)])
    nb.metadata["widgets"] = {WIDGET_STATE_KEY: {"version_major": 2, "version_minor": 0, "state": {
        "ours": {"model_name": "AnyModel", "model_module": "anywidget", "state": {"_static_id": "abc"}},
        "slider": {"model_name": "IntSliderModel", "model_module": "@jupyter-widgets/controls",
                   "state": {"value": 3}}}}}
    nbformat.write(nb, tmp_path / "mixed.ipynb")
    doc = export_html(tmp_path / "mixed.ipynb").read_text(encoding="utf-8")
    assert "IntSlider(value=3)" in doc and '<div class="sae-static">copy</div>' in doc
    assert "MyWidget()" not in doc and "FeatureDashboard(" not in doc and view not in doc


# ------------------------------------------------------------------------------------------ in chromium
def open_offline(browser, path: Path):
    """(aborted, failed, page): `path` opened with every request that is not file: or data: aborted and recorded."""
    assert shutil.which("chromium"), "Debian's chromium is needed (bash scripts/run.sh test installs it)"
    context = browser.new_context(viewport={"width": 1300, "height": 1000})
    aborted: list[str] = []
    failed: list[str] = []

    def route(r):
        if r.request.url.startswith(("file:", "data:")):
            r.continue_()
        else:
            aborted.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.on("requestfailed", lambda req: failed.append(req.url))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    page.wait_for_timeout(300)  # scripts that load more on DOMContentLoaded (the widget manager) have run
    return aborted, failed, page


def tokens_of(locator) -> list[str]:
    return locator.locator(".sae-tok").all_text_contents()


def test_exported_page_loads_nothing_remote_and_shows_every_widget(executed, offline_html, browser):
    want = json.loads(executed.with_name("expect.json").read_text())
    aborted, failed, page = open_offline(browser, offline_html)
    assert aborted == [] and failed == []
    assert page.locator("h1").first.text_content().startswith(HEADING)
    assert "Inline math $x^2$ stays as its source." in page.locator("body").inner_text()  # no MathJax, by design
    static = page.locator(".sae-static")
    assert static.count() == 5 and all(static.nth(i).is_visible() for i in range(5))
    dash, browser_copy, explorer, panel, monitor = (static.nth(i) for i in range(5))
    assert dash.locator(".sae-dash-title").text_content() == f"Latent {want['dash_latent']}"
    first_context = dash.locator(".sae-top-contexts .sae-ctx").first
    assert tokens_of(first_context) == [display_token(t) for t in want["dash_context"]]
    rows = browser_copy.locator(".sae-browser tbody tr")
    assert [int(x) for x in rows.evaluate_all("rs => rs.map(r => r.dataset.latent)")] == want["browser_rows"]
    assert len(want["browser_rows"]) == 5 and rows.first.locator(".sae-chip").count() > 0
    assert tokens_of(explorer.locator(".sae-hl-line")) == [display_token(t) for t in want["explorer_tokens"]]
    assert "".join(want["explorer_tokens"]) == "Call me Ishmael."
    assert tokens_of(panel.locator(".sae-sp-baseline")) == [display_token(t) for t in want["baseline"]]
    assert tokens_of(panel.locator(".sae-sp-steered")) == [display_token(t) for t in want["steered"]]
    assert want["monitor_status"] == "finished" == monitor.locator(".sae-tm-status").text_content()
    assert monitor.locator("table.sae-tm-final tbody tr").count() == want["monitor_final"] > 0
    page.context.close()
