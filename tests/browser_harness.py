"""Helpers of the widget tests: a deterministic stand-in for the feature statistics, a JupyterLab server,
and headless Debian chromium driven by Playwright.

`StandInStats` follows the statistics contract of `sae_widgets.feature_stats` (d_sae, n_tokens, feature(i),
columns(), token_strings) with values drawn from a seeded generator; its vocabulary holds hostile token text
(markup, `</script>`, right-to-left marks) on purpose. Playwright is imported only by the browser helpers.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

XSS_TOKENS = ['<img src=x onerror="window.__sae_xss=1">', "</script><script>window.__sae_xss=2</script>",
              "\u202eevil\u202c", "a&amp;b", "\"'`"]
PLAIN_TOKENS = [" the", " whale", " of", " and", " to", " a", " in", ",", ".", " Ahab", " ship", " sea",
                " Congress", " nation", " people", " war", "\n", " I", " is", " was"]


class StandInStats:
    """Fake feature statistics with the contract's shapes and invariants (max_act = largest context act, ...)."""

    def __init__(self, d_sae: int = 64, *, n_tokens: int = 100_000, n_contexts: int = 5, ctx_len: int = 16,
                 n_quantiles: int = 3, per_quantile: int = 2, n_bins: int = 12, seed: int = 0, signed: bool = False):
        self.d_sae, self.n_tokens = d_sae, n_tokens
        self.n_contexts, self.ctx_len, self.n_quantiles, self.per_quantile = n_contexts, ctx_len, n_quantiles, per_quantile
        self.n_bins, self.seed, self.signed = n_bins, seed, signed
        self.token_strings = XSS_TOKENS + PLAIN_TOKENS
        rng = np.random.default_rng(seed)
        self._density = rng.beta(0.5, 30.0, size=d_sae)
        self._density[rng.random(d_sae) < 0.05] = 0.0  # a few dead latents
        self._max_act = np.where(self._density > 0, rng.gamma(2.0, 2.0, size=d_sae) + 0.5, 0.0)
        self._mean_act = self._max_act * rng.uniform(0.1, 0.4, size=d_sae)
        vocab = len(self.token_strings)
        self._top = [[self.token_strings[j] for j in rng.choice(vocab, size=3, replace=False)] for _ in range(d_sae)]
        self.feature_calls: list[int] = []  # which latents were asked for, in order (tests check laziness)

    def columns(self) -> dict:
        return {"latent": np.arange(self.d_sae), "density": self._density.copy(), "max_act": self._max_act.copy(),
                "mean_act": self._mean_act.copy(), "top_tokens": [list(t) for t in self._top]}

    def _context(self, rng, top: float, lo: float, hi: float, first_tokens=()) -> dict:
        ids = rng.integers(0, len(self.token_strings), size=self.ctx_len)
        tokens = list(first_tokens) + [self.token_strings[i] for i in ids[len(first_tokens):]]
        acts = rng.uniform(0, lo, size=self.ctx_len) * (rng.random(self.ctx_len) < 0.5)
        if self.signed:
            acts = acts * np.where(rng.random(self.ctx_len) < 0.3, -1.0, 1.0)
        peak = int(rng.integers(0, self.ctx_len))
        acts[peak] = min(top, rng.uniform(lo, hi)) if hi > lo else top
        return {"tokens": tokens, "acts": acts.tolist(), "peak": peak, "act": float(acts[peak])}

    def feature(self, i: int) -> dict:
        if not 0 <= i < self.d_sae:
            raise IndexError(f"latent {i} out of range 0..{self.d_sae - 1}")
        self.feature_calls.append(i)
        rng = np.random.default_rng([self.seed, i])
        m = float(self._max_act[i])
        edges = np.linspace(0.0, max(m, 1e-6), self.n_bins + 1)
        counts = (rng.geometric(0.3, size=self.n_bins) * 10)[::-1].astype(int) if m > 0 else np.zeros(self.n_bins, int)
        tops = sorted(np.linspace(m, m * 0.6, self.n_contexts), reverse=True)
        contexts = [self._context(rng, t, t * 0.5, t, XSS_TOKENS if k == 0 else ()) for k, t in enumerate(tops)]
        for c, t in zip(contexts, tops):  # the top contexts peak exactly at their listed act
            c["acts"][c["peak"]] = float(t)
            c["act"] = float(t)
        qs = np.linspace(0.0, m * 0.6, self.n_quantiles + 1)
        quantiles = [{"lo": float(a), "hi": float(b),
                      "contexts": [self._context(rng, float(b), float(a), float(b)) for _ in range(self.per_quantile)]}
                     for a, b in zip(qs[:-1], qs[1:])]
        vocab = self.token_strings
        pos = sorted((float(v) for v in rng.uniform(0.1, 2.0, size=5)), reverse=True)
        neg = sorted(float(v) for v in -rng.uniform(0.1, 2.0, size=5))
        return {"latent": int(i), "density": float(self._density[i]), "max_act": m, "mean_act": float(self._mean_act[i]),
                "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
                "top_contexts": contexts, "quantiles": quantiles,
                "logits": {"positive": [{"token": vocab[(i + k) % len(vocab)], "value": v} for k, v in enumerate(pos)],
                           "negative": [{"token": vocab[(i + 7 + k) % len(vocab)], "value": v} for k, v in enumerate(neg)]},
                "top_tokens": list(self._top[i])}


def brute_force_page(cols, *, sort_by, descending, query, min_density, max_density, page, page_size):
    """The feature browser's page by plain Python loops: (latents shown, number of matches, page shown)."""
    rows = []
    for i in range(len(cols["latent"])):
        tops = cols["top_tokens"][i]
        tops = [tops] if isinstance(tops, str) else tops  # the real statistics give one "a / b / c" string
        if query.strip() and not any(query.strip().lower() in t.lower() for t in tops):
            continue
        d = float(cols["density"][i])
        if (min_density is not None and d < min_density) or (max_density is not None and d > max_density):
            continue
        v = float(cols[sort_by][i])
        rows.append((math.isnan(v), 0.0 if math.isnan(v) else (-v if descending else v), int(cols["latent"][i])))
    rows.sort()
    n_pages = max(1, math.ceil(len(rows) / page_size))
    page = min(max(0, page), n_pages - 1)
    return [r[2] for r in rows[page * page_size:(page + 1) * page_size]], len(rows), page


# ------------------------------------------------------------------------------------------ servers, browser
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_local_url(url: str) -> bool:
    """True for requests that stay on this machine (loopback hosts, or data:/blob:/about:/file: URLs)."""
    p = urlparse(url)
    if p.scheme in ("data", "blob", "about", "file"):
        return True
    return p.hostname in LOCAL_HOSTS


def isolated_jupyter_env(folder: Path) -> dict[str, str]:
    """The environment with Jupyter's per-user folders moved into `folder`: no kernelspec or setting of the
    user's own can change what the tests run (the kernel is this interpreter's `python3`)."""
    return dict(os.environ, JUPYTER_CONFIG_DIR=str(folder / "config"), JUPYTER_DATA_DIR=str(folder / "data"),
                JUPYTER_RUNTIME_DIR=str(folder / "runtime"), HF_HUB_OFFLINE="1")


class LabServer:
    """`jupyter lab` on a free loopback port, with a token, in `root`; stopped by `stop()` (its own process only)."""

    def __init__(self, root: Path, *, python: str = sys.executable, log_path: Path | None = None):
        self.root, self.port = Path(root), free_port()
        self.token = os.urandom(12).hex()
        self.url = f"http://127.0.0.1:{self.port}"
        config = self.root.parent / f"{self.root.name}-jupyter"  # outside the served folder
        env = dict(isolated_jupyter_env(config), JUPYTERLAB_SETTINGS_DIR=str(config / "settings"),
                   JUPYTERLAB_WORKSPACES_DIR=str(config / "workspaces"))
        self.log_path = log_path or self.root / "jupyter-lab.log"
        (config / "config" / "labconfig").mkdir(parents=True, exist_ok=True)  # no "Jupyter news?" toast
        write_json(config / "config" / "labconfig" / "page_config.json",
                   {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}})
        (config / "settings" / "@jupyterlab" / "notebook-extension").mkdir(parents=True, exist_ok=True)
        write_json(config / "settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings",
                   {"windowingMode": "none"})  # every cell stays rendered, scrolled into view or not
        self._log = open(self.log_path, "wb")
        cmd = [python, "-m", "jupyter", "lab", "--allow-root", "--no-browser", "--ServerApp.open_browser=False",
               f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
               "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               "--expose-app-in-browser"]
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        raise TimeoutError(f"jupyter lab did not answer in {timeout} s: {self.log_path.read_text()[-3000:]}")

    def notebook_url(self, name: str) -> str:
        return f"{self.url}/lab/tree/{name}?token={self.token}&reset"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError("chromium is not installed; `bash scripts/run.sh test` installs Debian's chromium")
    return path


class RequestLog:
    """Every request the browser makes; anything not on this machine is recorded and aborted."""

    def __init__(self):
        self.urls: list[str] = []
        self.blocked: list[str] = []

    def attach(self, context) -> None:
        context.on("request", lambda req: self.urls.append(req.url))

        def route(r):
            if is_local_url(r.request.url):
                r.continue_()
            else:
                self.blocked.append(r.request.url)
                r.abort()
        context.route("**/*", route)

    def external(self) -> list[str]:
        return [u for u in self.urls if not is_local_url(u)]


def wait_until(condition, timeout: float = 20.0):
    """Poll `condition` until it returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := condition():
            return got
        time.sleep(0.05)
    raise AssertionError(f"condition not met in {timeout} s")


def read_state(root: Path, name: str, trait: str):
    """The traitlet value a notebook's `record(widget, name, trait)` last wrote under root/state (None before)."""
    p = root / "state" / f"{name}.{trait}.json"
    return json.loads(p.read_text()) if p.exists() else None


def open_notebook(browser, server: "LabServer", name: str):
    """(context, page, request log): the notebook open in JupyterLab with its kernel idle, ready to run cells."""
    context = browser.new_context(viewport={"width": 1300, "height": 1000})
    log = RequestLog()
    log.attach(context)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(server.notebook_url(name))
    page.wait_for_function("window.jupyterapp && window.jupyterapp.shell.currentWidget"
                           " && window.jupyterapp.shell.currentWidget.sessionContext", timeout=60_000)
    page.evaluate("""async () => {
        const ctx = window.jupyterapp.shell.currentWidget.sessionContext;
        await ctx.ready;
        while (!ctx.session || !ctx.session.kernel || ctx.session.kernel.status !== "idle")
            await new Promise((r) => setTimeout(r, 100)); }""")
    return context, page, log


RECORD_CELL = """import json, os
from pathlib import Path
STATE = Path("state")
STATE.mkdir(exist_ok=True)

def record(widget, name, trait):
    \"\"\"Write widget.trait to state/name.trait.json on every change (the test reads it from outside).\"\"\"
    def write(change=None):
        p = STATE / f"{name}.{trait}.json"
        p.with_suffix(".tmp").write_text(json.dumps(getattr(widget, trait)))
        os.replace(p.with_suffix(".tmp"), p)
    widget.observe(write, trait)
    write()
"""


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1))


# ------------------------------------------------------------------------------------------ the test notebook
HIGHLIGHT_TOKENS = XSS_TOKENS + [" Call", " me", " Ish", "mael", ".", "\n", " Some", " years", " ago", "\t", "-"]


def widget_notebook(tests_dir: Path, *, prompt: str = "Call me Ishmael.") -> dict:
    """A notebook that shows the four widgets and mirrors their Python-side traitlets into state/*.json.
    The prompt explorer runs on the real model, a seeded random SAE and real `FeatureStats` of it."""
    import nbformat

    cells = [
        RECORD_CELL,
        f"""import sys
sys.path.insert(0, {str(tests_dir)!r})
from browser_harness import HIGHLIGHT_TOKENS, StandInStats
from sae_widgets.widgets import FeatureBrowser, FeatureDashboard, TokenHighlighter""",
        """acts = [[(7, 2.5), (3, 1.0)], [(2, -1.5)], [(9, 0.75), (1, 0.5)], [], [(4, 3.0)]] + [
    [(i % 5, round(0.3 * i - 1.2, 2))] for i in range(len(HIGHLIGHT_TOKENS) - 5)]
hl = TokenHighlighter(HIGHLIGHT_TOKENS, acts)
record(hl, "hl", "selected_index")
hl""",
        """dash_stats = StandInStats(d_sae=256, n_contexts=20, ctx_len=64, n_quantiles=4, per_quantile=3, seed=3)
dash = FeatureDashboard(dash_stats, latent=3, explanation="fires near whales")
record(dash, "dash", "latent")
record(dash, "dash", "explanation")
dash""",
        """big_stats = StandInStats(d_sae=16_384, seed=1)
browser = FeatureBrowser(big_stats, page_size=15)
record(browser, "browser", "selected_latent")
record(browser, "browser", "query")
browser""",
        f"""import torch
from sae_widgets.feature_stats import FeatureStats
from sae_widgets.models import load_model
from sae_widgets.sae import SAE, SAEConfig
from sae_widgets.token_sources import EmbeddedCorpus
from sae_widgets.widgets import PromptExplorer
model = load_model(device="cpu")
torch.manual_seed(0)
sae = SAE(SAEConfig(arch="topk", d_in=256, d_sae=512, k=8, hook="blocks.1.hook_resid_post")).eval()
stats = FeatureStats.compute(model, sae, EmbeddedCorpus("val"), n_tokens=2048, n_ctx=64, show_progress=False)
explorer = PromptExplorer(model, sae, stats, text={prompt!r})
record(explorer, "explorer", "selected_latent")
record(explorer, "explorer", "tokens")
record(explorer, "explorer", "feature")
explorer""",
        """dash.latent = 5  # a later cell changes a widget: the static copy above must show latent 5""",
    ]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb
