"""The quickstart notebook, run headless through the CLI the way a student or CI would."""
import html
import json
import math
import subprocess
import sys

import nbformat
import pytest

from sae_widgets.models import embedded_model_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    r = subprocess.run([sys.executable, "-m", "sae_widgets", "quickstart", "--headless", "--out", str(out),
                        "-p", "n_batches", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r, out


def test_executed_notebook_has_no_errors(run):
    r, out = run
    path = out / "00_quickstart.ipynb"
    assert f"executed notebook: {path}" in r.stdout
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert any("injected-parameters" in c.metadata.get("tags", []) and "n_batches = 2" in c.source for c in code)
    assert all(c.execution_count is not None for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]


def test_metrics(run):
    r, out = run
    metrics = json.loads((out / "quickstart_metrics.json").read_text())
    assert json.loads(r.stdout.split(f"metrics: {out / 'quickstart_metrics.json'}\n", 1)[1]) == metrics
    summary = json.loads((embedded_model_dir() / "training_summary.json").read_text())
    assert metrics["model"] == "sotu-moby-4l" and metrics["hook"] == "blocks.1.hook_resid_post"
    assert metrics["n_batches"] == 2 and metrics["batch_shape"] == [1024, 256]
    assert metrics["stop_at_layer"] == 2  # blocks 2 and 3 are not needed for blocks.1.hook_resid_post
    assert len(metrics["mean_norms"]) == 2 and all(math.isfinite(n) and n > 0 for n in metrics["mean_norms"])
    assert metrics["heldout_windows"] == summary["eval_subset_windows"]
    assert abs(metrics["heldout_loss"] - summary["val_loss_subset"]) < 1e-3
    assert metrics["heldout_loss"] < summary["unigram_val_loss_subset"]
    assert metrics["generated"].startswith("The whale") and len(metrics["generated"]) > len("The whale") + 10


def test_html_export_shows_generated_text(run):
    r, out = run
    path = out / "00_quickstart.html"
    assert f"html: {path}" in r.stdout
    metrics = json.loads((out / "quickstart_metrics.json").read_text())
    assert html.escape(metrics["generated"], quote=False) in path.read_text(encoding="utf-8")
