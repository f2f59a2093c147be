"""SteeringPanel and TrainingMonitor in a real browser: JupyterLab on loopback, Debian's headless chromium.

The notebook mirrors the widgets' Python-side traitlets into state/*.json (as tests/test_widgets_browser.py does),
so what a click did is checked from Python's side. Screenshots go to test-artifacts/monitor_steering_browser/.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from browser_harness import RECORD_CELL, LabServer, open_notebook, read_state, wait_until  # noqa: E402

from sae_widgets.widgets._common import display_token  # noqa: E402

TESTS = Path(__file__).parent
ARTIFACTS = TESTS.parent / "test-artifacts" / "monitor_steering_browser"

CELLS = [
    RECORD_CELL,
    """import torch
from sae_widgets.models import load_model
from sae_widgets.sae import SAE, SAEConfig
from sae_widgets.widgets import SteeringPanel
model = load_model(device="cpu")
torch.manual_seed(0)
sae = SAE(SAEConfig(arch="topk", d_in=256, d_sae=512, k=8, hook="blocks.1.hook_resid_post")).eval()
panel = SteeringPanel(model, sae, prompt="The whale and the ship")
panel.temperature, panel.max_new_tokens = 0.0, 8
panel.add_latent(3, 0.0, "add")
record(panel, "panel", "history")
record(panel, "panel", "edits")
panel""",
    """from sae_widgets.synthetic import SyntheticActivations
from sae_widgets.train import Trainer, TrainConfig
from sae_widgets.widgets import TrainingMonitor
torch.manual_seed(0)
store = SyntheticActivations(d_in=16, n_features=32, batch_size=64, mean_active=3, seed=0)
trainer = Trainer(SAE(SAEConfig(arch="topk", d_in=16, d_sae=32, k=4)), store,
                  TrainConfig(total_tokens=64 * 1_000_000, progress=False, log_every=1, init_tokens=128, out_dir="run"))
monitor = TrainingMonitor(trainer, refresh_s=0.25)
record(monitor, "monitor", "status")
record(monitor, "monitor", "checkpoint")
monitor.start()
monitor""",
]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, browser):
    root = tmp_path_factory.mktemp("lab")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "monitor_steering.ipynb")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    server = LabServer(root, log_path=ARTIFACTS / "jupyter-lab.log")
    try:
        server.wait_ready()
        context, page, log = open_notebook(browser, server, "monitor_steering.ipynb")
        page.evaluate("async () => { await window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
        page.wait_for_function("document.querySelectorAll('.sae-root.sae-steer, .sae-root.sae-monitor').length >= 2",
                               timeout=180_000)
        yield page, root, log
        context.close()
    finally:
        server.stop()


def test_training_monitor_charts_update_live_and_stop_writes_a_checkpoint(lab):
    from sae_widgets.train import latest_checkpoint

    page, root, log = lab
    mon = page.locator(".sae-root.sae-monitor")
    assert mon.locator("svg.sae-chart").count() == 6
    wait_until(lambda: int(mon.get_attribute("data-points") or 0) > 0, timeout=60)
    line = mon.locator('.sae-tm-chart[data-metric="loss"] polyline.sae-line')
    first = line.get_attribute("points")
    first_counts = mon.locator(".sae-tm-counts").text_content()
    time.sleep(1.5)                                                  # refresh_s=0.25: several updates by now
    assert line.get_attribute("points") != first
    assert mon.locator(".sae-tm-counts").text_content() != first_counts
    assert "ETA" in first_counts and mon.locator(".sae-tm-status").text_content() == "running"
    mon.locator("button.sae-tm-pause").click()
    wait_until(lambda: read_state(root, "monitor", "status") == "paused", timeout=60)
    mon.locator("button.sae-tm-resume").click()
    wait_until(lambda: read_state(root, "monitor", "status") == "running", timeout=60)
    page.screenshot(path=str(ARTIFACTS / "training_monitor_running.png"))
    mon.locator("button.sae-tm-stop").click()
    wait_until(lambda: read_state(root, "monitor", "status") == "stopped", timeout=60)
    ckpt = latest_checkpoint(root / "run")
    assert ckpt is not None and (ckpt / "state.safetensors").is_file()
    assert read_state(root, "monitor", "checkpoint") == str(Path("run") / "checkpoints" / ckpt.name)
    mon.locator(".sae-tm-status", has_text="stopped").wait_for()
    mon.locator("table.sae-tm-final tbody tr").first.wait_for()
    assert mon.locator("button.sae-tm-stop").is_disabled()
    mon.screenshot(path=str(ARTIFACTS / "training_monitor_stopped.png"))


def test_steering_panel_generate_shows_a_steered_completion(lab):
    page, root, log = lab
    panel = page.locator(".sae-root.sae-steer")
    assert panel.locator('.sae-sp-edits tr[data-latent="3"]').count() == 1
    strength = panel.locator(".sae-sp-strength")
    strength.fill("60")
    strength.press("Enter")
    wait_until(lambda: read_state(root, "panel", "edits") == [{"latent": 3, "mode": "add", "value": 60.0}], timeout=60)
    panel.locator("button.sae-sp-generate").click()
    history = wait_until(lambda: read_state(root, "panel", "history"), timeout=120)
    run = history[0]
    base, steered = panel.locator(".sae-sp-baseline .sae-tok"), panel.locator(".sae-sp-steered .sae-tok")
    steered.first.wait_for()
    assert base.all_text_contents() == [display_token(t) for t in run["baseline"]["tokens"]]
    assert steered.all_text_contents() == [display_token(t) for t in run["steered"]["tokens"]]
    assert "".join(steered.all_text_contents()) != "".join(base.all_text_contents())
    assert panel.locator("button.sae-sp-run").count() == 1
    panel.screenshot(path=str(ARTIFACTS / "steering_panel.png"))
    assert log.external() == [] and log.blocked == []


HEADLESS_CELLS = [
    """import torch
from sae_widgets.sae import SAE, SAEConfig
from sae_widgets.synthetic import SyntheticActivations
from sae_widgets.train import Trainer, TrainConfig
from sae_widgets.widgets import TrainingMonitor
torch.manual_seed(0)
store = SyntheticActivations(d_in=16, n_features=32, batch_size=64, mean_active=3, seed=0)
trainer = Trainer(SAE(SAEConfig(arch="topk", d_in=16, d_sae=32, k=4)), store,
                  TrainConfig(total_tokens=64 * 200, progress=False, log_every=1, init_tokens=128, out_dir="run"))
monitor = TrainingMonitor(trainer, refresh_s=0.1)
monitor.start()
monitor""",
    """sae = monitor.wait()
assert sae is trainer.sae and monitor.status == "finished" and trainer.tokens == 64 * 200
print("trained", trainer.step, "steps")""",
]


def test_papermill_runs_the_monitor_headless_and_the_export_shows_it(tmp_path, browser):
    """No front-end at all: papermill runs start() then wait(); the exported HTML keeps the finished monitor."""
    import subprocess

    from browser_harness import isolated_jupyter_env

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in HEADLESS_CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "monitor.ipynb")
    env = isolated_jupyter_env(tmp_path / ".jupyter")
    out = subprocess.run([sys.executable, "-m", "papermill", "monitor.ipynb", "executed.ipynb", "--no-progress-bar"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    executed = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    assert "trained 200 steps" in "".join(o.get("text", "") for o in executed.cells[1].outputs)
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", "executed.ipynb"], cwd=tmp_path,
                   env=env, check=True, capture_output=True, timeout=120)
    page = browser.new_page()
    page.goto((tmp_path / "executed.html").as_uri())
    static = page.locator(".sae-static .sae-monitor")
    assert static.count() == 1 and static.is_visible()
    assert static.locator(".sae-tm-status").text_content() == "finished"   # the updated copy, not the first
    assert static.locator("svg.sae-chart polyline.sae-line").count() == 6
    assert static.locator("table.sae-tm-final tbody tr").count() == 8
    page.screenshot(path=str(ARTIFACTS / "exported_monitor.png"), full_page=True)
    page.context.close()
