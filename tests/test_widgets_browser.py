"""The widgets in a real browser: JupyterLab served on loopback, Debian's headless chromium driven by Playwright.

One lab server and one browser serve the whole module. The notebook (browser_harness.widget_notebook) mirrors
the widgets' Python-side traitlets into state/*.json, so a click in the page is checked from Python's side.
The same notebook, executed with papermill and exported with `jupyter nbconvert --to html`, must still show
every widget with no kernel and no network. Screenshots go to test-artifacts/widgets_browser/.
"""
from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from browser_harness import (  # noqa: E402
    HIGHLIGHT_TOKENS, XSS_TOKENS, LabServer, RequestLog, StandInStats, brute_force_page, read_state, wait_until,
    isolated_jupyter_env, open_notebook, widget_notebook,
)

from sae_widgets.widgets._common import display_token  # noqa: E402

TESTS = Path(__file__).parent
ARTIFACTS = TESTS.parent / "test-artifacts" / "widgets_browser"
# what nbconvert's own HTML template asks a CDN for (require.js, MathJax, the widget html-manager); the export
# must show the widgets with all of them blocked
NBCONVERT_TEMPLATE_CDN = ("https://cdnjs.cloudflare.com/ajax/libs/require.js/",
                          "https://cdnjs.cloudflare.com/ajax/libs/mathjax/",
                          "https://unpkg.com/@jupyter-widgets/html-manager@")


class LabSession:
    """The open notebook: the page, the lab server, the request log and the notebook's state folder."""

    def __init__(self, page, lab: LabServer, log: RequestLog, root: Path):
        self.page, self.lab, self.log, self.state_dir = page, lab, log, root / "state"
        self.timings: dict[str, float] = {}
        self.highlight_colors: list[str] = []

    def state(self, name: str, trait: str):
        return read_state(self.state_dir.parent, name, trait)

    def wait_state(self, name: str, trait: str, want, timeout: float = 20.0):
        try:
            wait_until(lambda: self.state(name, trait) == want, timeout)
        except AssertionError:
            got = self.state(name, trait)
            raise AssertionError(f"Python-side {name}.{trait} is {got!r}, expected {want!r}") from None
        return want

    def wait_until(self, condition, timeout: float = 20.0):
        return wait_until(condition, timeout)

    def kernel(self, code: str) -> str:
        """Run `code` in the notebook's kernel (not as a cell) and return the reply status."""
        return self.page.evaluate("""async (code) => {
            const k = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
            const reply = await k.requestExecute({ code, store_history: false }).done;
            return reply.content.status; }""", code)

    def shot(self, name: str, locator=None) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (locator or self.page).screenshot(path=str(ARTIFACTS / f"{name}.png"))


@pytest.fixture
def report(capsys):
    """Print a measured figure even under pytest's output capture, and keep it in timings.json."""
    def emit(key: str, value, line: str):
        with capsys.disabled():
            print(f"\n[widgets-browser] {line}")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / "timings.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data[key] = value
        path.write_text(json.dumps(data, indent=1))
    return emit


def _widget(session: LabSession, cls: str):
    return session.page.locator(f".sae-root.{cls}")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def lab(tmp_path_factory, browser, export_dir):
    t0 = time.monotonic()
    root = tmp_path_factory.mktemp("lab")
    nbformat.write(widget_notebook(TESTS), root / "widgets.ipynb")
    nbformat.write(widget_notebook(TESTS), export_dir / "widgets.ipynb")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # the papermill run for the export test goes on beside the lab session
    with open(export_dir / "papermill.log", "wb") as out:
        export = subprocess.Popen([sys.executable, "-m", "papermill", "widgets.ipynb", "executed.ipynb", "--cwd",
                                   str(export_dir), "--no-progress-bar"], cwd=export_dir, stdout=out,
                                  stderr=subprocess.STDOUT, env=isolated_jupyter_env(export_dir / ".jupyter"))
    server = LabServer(root, log_path=ARTIFACTS / "jupyter-lab.log")
    try:
        server.wait_ready()
        context, page, log = open_notebook(browser, server, "widgets.ipynb")
        session = LabSession(page, server, log, root)
        session.timings["lab and kernel ready"] = time.monotonic() - t0
        page.evaluate("async () => { await window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
        page.wait_for_function("document.querySelectorAll('.sae-root').length >= 4", timeout=120_000)
        session.wait_state("dash", "latent", 5, timeout=60)  # the last cell ran
        session.timings["all cells ran, widgets rendered"] = time.monotonic() - t0
        session.export_proc = export
        yield session
        context.close()
    finally:
        server.stop()
        if export.poll() is None:  # the export test did not get to wait for it
            export.kill()
            export.wait()


# ------------------------------------------------------------------------------------------ live widgets
def test_every_widget_renders_live_and_hides_its_static_copy(lab, report):
    page = lab.page
    for cls in ("sae-hl", "sae-dash", "sae-browser", "sae-explorer"):
        assert _widget(lab, cls).count() == 1 and _widget(lab, cls).is_visible(), cls
    assert page.locator(".sae-static").count() == 4
    assert not any(page.locator(".sae-static").nth(i).is_visible() for i in range(4))  # live view replaces it
    assert _widget(lab, "sae-hl").locator(".sae-tok").count() == len(HIGHLIGHT_TOKENS)
    dash = _widget(lab, "sae-dash")
    assert dash.locator(".sae-dash-title").text_content() == "Latent 5"
    assert dash.locator(".sae-top-contexts .sae-ctx").count() == 20
    assert dash.locator(".sae-top-contexts .sae-ctx").first.locator(".sae-tok").count() == 64
    assert dash.locator("svg.sae-hist rect.sae-bar").count() == 12
    assert dash.locator(".sae-logit-table.sae-pos tbody tr").count() == 5
    browser = _widget(lab, "sae-browser")
    assert browser.locator("tbody tr").count() == 15
    assert browser.locator(".sae-count").text_content() == "16384 of 16384 latents"
    tokens = lab.state("explorer", "tokens")
    assert "".join(tokens) == "Call me Ishmael."
    assert [t.text_content() for t in _widget(lab, "sae-explorer").locator(".sae-hl-line .sae-tok").all()] == tokens
    lab.highlight_colors = _widget(lab, "sae-hl").locator(".sae-tok").evaluate_all(
        "els => els.map(e => getComputedStyle(e).backgroundColor)")
    lab.shot("lab_notebook")
    report("session_s", {k: round(v, 1) for k, v in lab.timings.items()},
           "; ".join(f"{k}: {v:.1f} s" for k, v in lab.timings.items()))


def test_hostile_token_text_shows_literally_and_runs_nothing(lab):
    page = lab.page
    assert page.evaluate("window.__sae_xss") is None
    for root in page.locator(".sae-root").all():
        assert root.locator("img, script, iframe").count() == 0
    texts = _widget(lab, "sae-hl").locator(".sae-tok").all_text_contents()
    assert texts[:len(XSS_TOKENS)] == [display_token(t) for t in XSS_TOKENS]
    assert "[U+202E]evil[U+202C]" in texts
    ctx = _widget(lab, "sae-dash").locator(".sae-top-contexts .sae-ctx").first.locator(".sae-tok")
    assert ctx.nth(0).text_content() == XSS_TOKENS[0] and ctx.nth(1).text_content() == XSS_TOKENS[1]


def test_highlighter_hover_tooltip_and_click_selection(lab):
    hl = _widget(lab, "sae-hl")
    hl.locator(".sae-tok").nth(0).hover()
    tip = hl.locator(".sae-tooltip")
    tip.wait_for(state="visible")
    tok_box, tip_box = hl.locator(".sae-tok").nth(0).bounding_box(), tip.bounding_box()
    assert abs(tip_box["x"] - max(4, tok_box["x"])) < 2                  # right under the hovered token
    assert 0 <= tip_box["y"] - (tok_box["y"] + tok_box["height"]) < 8
    text = tip.text_content()
    assert "activation 2.5" in text and "#7" in text and "#3" in text   # token 0: latents 7 (2.5) and 3 (1.0)
    assert XSS_TOKENS[0].replace('"', '\\"') in text                      # the token itself, as text
    a, b = hl.bounding_box(), tip.bounding_box()
    x0, y0 = min(a["x"], b["x"]), min(a["y"], b["y"])
    lab.page.screenshot(path=str(ARTIFACTS / "highlighter_tooltip.png"), clip={
        "x": x0, "y": y0, "width": max(a["x"] + a["width"], b["x"] + b["width"]) - x0,
        "height": max(a["y"] + a["height"], b["y"] + b["height"]) - y0})
    hl.locator(".sae-tok").nth(6).click()
    lab.wait_state("hl", "selected_index", 6)                            # the click reached Python
    assert hl.locator(".sae-tok.sae-selected").get_attribute("data-index") == "6"
    assert lab.kernel("hl.selected_index = 2") == "ok"                   # and Python reaches the page
    page_sel = hl.locator(".sae-tok.sae-selected")
    page_sel.and_(hl.locator('[data-index="2"]')).wait_for()
    lab.wait_state("hl", "selected_index", 2)


def test_dashboard_navigation_explanation_and_render_time(lab, report):
    dash = _widget(lab, "sae-dash")
    slot = dash.locator(".sae-dash-slot")
    render_ms, round_trip_ms = [], []
    for expected in range(6, 12):
        t0 = time.perf_counter()
        dash.locator("button.sae-next").click()
        dash.locator(f'.sae-dash-slot[data-latent="{expected}"]').wait_for()
        round_trip_ms.append((time.perf_counter() - t0) * 1000)
        render_ms.append(float(slot.get_attribute("data-render-ms")))
        assert dash.locator(".sae-dash-title").text_content() == f"Latent {expected}"
    lab.wait_state("dash", "latent", 11)
    n_spans = slot.locator(".sae-ctx .sae-tok").count()
    assert n_spans == (20 + 4 * 3) * 64
    report("dashboard_render_ms", {"median": statistics.median(render_ms), "all": render_ms,
                                   "click_to_screen_median": statistics.median(round_trip_ms), "token_spans": n_spans},
           f"dashboard with 20 top contexts x 64 tokens (+ 4 quantile bins x 3 contexts; {n_spans} token spans): "
           f"render {statistics.median(render_ms):.1f} ms median (min {min(render_ms):.1f}, max {max(render_ms):.1f}); "
           f"click -> Python -> new dashboard on screen {statistics.median(round_trip_ms):.0f} ms median")
    box = dash.locator(".sae-expl-input")
    box.fill("whale <b>names</b>")
    box.press("Enter")
    lab.wait_state("dash", "explanation", "whale <b>names</b>")
    assert lab.kernel("dash.latent = 42") == "ok"
    dash.locator('.sae-dash-slot[data-latent="42"]').wait_for()
    assert dash.locator(".sae-dash-title").text_content() == "Latent 42"
    assert box.input_value() == ""                                       # latent 42 has no explanation yet
    lab.shot("dashboard", dash)


def test_browser_search_sort_and_row_click(lab):
    cols = StandInStats(d_sae=16_384, seed=1).columns()  # the notebook's statistics, rebuilt independently
    br = _widget(lab, "sae-browser")

    def shown():
        return [int(x) for x in br.locator("tbody tr").evaluate_all("rs => rs.map(r => r.dataset.latent)")]

    def expect(**kw):
        args = dict(sort_by="density", descending=True, query="", min_density=None, max_density=None, page=0,
                    page_size=15)
        args.update(kw)
        want, n, _ = brute_force_page(cols, **args)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and shown() != want:
            time.sleep(0.05)
        assert shown() == want, kw
        assert br.locator(".sae-count").text_content() == f"{n} of 16384 latents"

    br.locator(".sae-search").fill("WHALE")
    lab.wait_state("browser", "query", "WHALE")
    expect(query="WHALE")
    br.locator('th[data-key="max_act"]').click()
    expect(query="WHALE", sort_by="max_act")
    br.locator('th[data-key="max_act"]').click()                         # again: ascending
    expect(query="WHALE", sort_by="max_act", descending=False)
    br.locator("button.sae-next").click()
    expect(query="WHALE", sort_by="max_act", descending=False, page=1)
    row = br.locator("tbody tr").nth(3)
    latent = int(row.get_attribute("data-latent"))
    row.click()
    lab.wait_state("browser", "selected_latent", latent)
    br.locator(f'.sae-dash-slot[data-latent="{latent}"]').wait_for()
    assert br.locator(".sae-dash .sae-dash-title").text_content() == f"Latent {latent}"
    assert br.locator("tr.sae-selected-row").get_attribute("data-latent") == str(latent)
    lab.shot("feature_browser", br)


def test_prompt_explorer_run_click_token_then_latent(lab):
    ex = _widget(lab, "sae-explorer")
    prompt = "The whale and the ship"
    ex.locator("textarea.sae-prompt").fill(prompt)
    ex.locator("button.sae-run").click()
    tokens = lab.wait_until(lambda: (t := lab.state("explorer", "tokens")) and "".join(t) == prompt and t, timeout=30)
    line = ex.locator(".sae-hl-line .sae-tok")
    line.nth(len(tokens) - 1).wait_for()
    assert line.all_text_contents() == tokens
    line.nth(1).click()                                                  # " whale": its top latents as buttons
    chip = ex.locator(".sae-latent-chip").first
    chip.wait_for()
    latent = int(chip.get_attribute("data-latent"))
    chip.click()
    lab.wait_state("explorer", "selected_latent", latent)
    ex.locator(f'.sae-dash-slot[data-latent="{latent}"]').wait_for()
    feature = lab.wait_until(lambda: (f := lab.state("explorer", "feature")) and f["latent"] == latent and f)
    contexts = ex.locator(".sae-top-contexts .sae-ctx")
    assert contexts.count() == len(feature["top_contexts"]) > 0
    assert contexts.first.locator(".sae-tok").all_text_contents() == \
        [display_token(t) for t in feature["top_contexts"][0]["tokens"]]
    assert ex.locator(".sae-hint").text_content().startswith(f"colour: latent #{latent}")
    lab.shot("prompt_explorer", ex)


def test_no_request_left_localhost(lab):
    assert lab.log.urls, "the request log is empty: the recorder is not attached"
    assert lab.log.external() == [] and lab.log.blocked == []


# ------------------------------------------------------------------------------------------ static export
def test_exported_html_shows_every_widget_offline(lab, browser, export_dir, report):
    t0 = time.monotonic()
    rc = lab.export_proc.wait(timeout=240)
    assert rc == 0, (export_dir / "papermill.log").read_text()[-3000:]
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", "executed.ipynb"],
                   cwd=export_dir, check=True, capture_output=True)
    html_path = export_dir / "executed.html"
    shutil.copy(html_path, ARTIFACTS / "exported_notebook.html")
    context = browser.new_context(viewport={"width": 1300, "height": 1000})
    log = RequestLog()
    log.attach(context)
    page = context.new_page()
    page.goto(html_path.as_uri())
    page.wait_for_load_state("load")
    static = page.locator(".sae-static")
    assert static.count() == 4
    assert all(static.nth(i).is_visible() for i in range(4))
    assert page.evaluate("window.__sae_xss") is None
    assert page.locator(".sae-static img, .sae-static script").count() == 0
    hl = static.nth(0).locator(".sae-tok")
    assert hl.all_text_contents() == [display_token(t) for t in HIGHLIGHT_TOKENS]
    assert hl.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)") == lab.highlight_colors
    dash = static.nth(1)
    assert dash.locator(".sae-dash-title").text_content() == "Latent 5"      # the state after the last cell
    assert dash.locator(".sae-top-contexts .sae-ctx").count() == 20
    # the same chart and colours as the live dashboard on the same latent (drawn by JS there, by Python here)
    assert lab.kernel("dash.latent = 5") == "ok"
    live = _widget(lab, "sae-dash")
    live.locator('.sae-dash-slot[data-latent="5"]').wait_for()
    bars = "rs => rs.map(r => ['x', 'y', 'width', 'height'].map(a => Number(r.getAttribute(a))))"
    assert dash.locator("svg.sae-hist rect.sae-bar").evaluate_all(bars) == \
        live.locator("svg.sae-hist rect.sae-bar").evaluate_all(bars)
    assert len(dash.locator("svg.sae-hist rect.sae-bar").evaluate_all(bars)) == 12
    colors = "els => els.map(e => getComputedStyle(e).backgroundColor)"
    assert dash.locator(".sae-ctx .sae-tok").evaluate_all(colors) == live.locator(".sae-ctx .sae-tok").evaluate_all(colors)
    assert dash.locator(".sae-dash-body").text_content() == live.locator(".sae-dash-body").text_content()  # numbers too
    assert static.nth(2).locator("tbody tr").count() == 15
    assert "".join(static.nth(3).locator(".sae-tok").all_text_contents()) == "Call me Ishmael."
    page.screenshot(path=str(ARTIFACTS / "exported_html.png"), full_page=True)
    # anything the page asked for off this machine comes from nbconvert's template, none from the widgets
    assert all(u.startswith(NBCONVERT_TEMPLATE_CDN) for u in log.external()), log.external()
    report("export", {"seconds": round(time.monotonic() - t0, 1), "blocked": sorted(set(log.blocked))},
           f"export (papermill wait + nbconvert + checks) {time.monotonic() - t0:.1f} s; blocked requests of "
           f"nbconvert's template: {sorted(set(log.blocked))}")
    context.close()
