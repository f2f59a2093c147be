"""The command line: help, hooks, info, parameter errors, and a real JupyterLab serving the quickstart."""
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sae_widgets import __version__
from sae_widgets.cli import QUICKSTART, packaged_notebook, parse_parameters, UsageError, working_copy


def cli(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "sae_widgets", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_subcommands():
    r = cli("--help")
    assert r.returncode == 0, r.stderr
    for name in ("quickstart", "hooks", "info", "cache"):
        assert name in r.stdout


def test_console_script_is_installed():
    r = subprocess.run([str(Path(sys.executable).parent / "sae-widgets"), "quickstart", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--headless" in r.stdout and "--no-browser" in r.stdout and "--ip" in r.stdout


def test_hooks_lists_hook_names():
    r = cli("hooks")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "n_layers=4" in lines[0] and "d_model=256" in lines[0]
    assert {"blocks.3.hook_resid_post", "blocks.0.attn.hook_z", "blocks.1.hook_resid_post"} <= set(lines[1:])


def test_info():
    r = cli("info")
    assert r.returncode == 0, r.stderr
    assert f"sae_widgets {__version__}" in r.stdout
    assert "sotu-moby-4l: 4 layers, d_model 256" in r.stdout
    for dist in ("torch", "triton", "transformer_lens"):
        assert f"\n{dist} " in r.stdout
    assert "device " in r.stdout


@pytest.mark.parametrize("args, named", [
    (["-p", "n_batches", "two"], "'two'"),
    (["-p", "n_batches", "2.5"], "'2.5'"),
    (["-p", "nbatches", "2"], "'nbatches'"),
])
def test_bad_parameter_is_named(tmp_path, args, named):
    r = cli("quickstart", "--headless", "--out", str(tmp_path), *args)
    assert r.returncode != 0
    assert named in r.stderr and "error" in r.stderr
    assert not (tmp_path / QUICKSTART).exists()  # rejected before anything ran


def test_parse_parameters_types():
    defaults = {"model_name": None, "hook": "a", "n_batches": 4, "lr": 1e-3}
    got = parse_parameters([["hook", "blocks.2.hook_resid_post"], ["n_batches", "3"], ["lr", "2"],
                            ["model_name", "None"]], defaults)
    assert got == {"hook": "blocks.2.hook_resid_post", "n_batches": 3, "lr": 2, "model_name": None}
    with pytest.raises(UsageError, match="True"):
        parse_parameters([["n_batches", "True"]], defaults)


def test_working_copy_keeps_user_edits(tmp_path):
    nb = working_copy(tmp_path)
    assert nb.read_bytes() == packaged_notebook().read_bytes()
    nb.write_text(nb.read_text().replace("n_batches = 4", "n_batches = 7"))
    assert "n_batches = 7" in working_copy(tmp_path).read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, token=None):
    req = urllib.request.Request(url, headers={"Authorization": f"token {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_interactive_quickstart_serves_notebook(tmp_path):
    port, token, work = _free_port(), secrets.token_hex(16), tmp_path / "work"
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "ws"))
    log = open(tmp_path / "lab.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "sae_widgets", "quickstart", "--no-browser", "--port", str(port),
                             "--out", str(work), "--ip", "127.0.0.1", f"--IdentityProvider.token={token}"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"JupyterLab exited with {proc.returncode}:\n{(tmp_path / 'lab.log').read_text()}"
            try:
                if _get(f"{base}/api/status", token)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"no answer in 60 s:\n{(tmp_path / 'lab.log').read_text()}"
            time.sleep(0.5)

        status, body = _get(f"{base}/api/contents/{QUICKSTART}", token)
        assert status == 200, body
        model = json.loads(body)
        assert model["type"] == "notebook"
        assert any("parameters" in c["metadata"].get("tags", []) for c in model["content"]["cells"])
        assert (work / QUICKSTART).read_bytes() == packaged_notebook().read_bytes()
        assert _get(f"{base}/api/contents/{QUICKSTART}")[0] == 403  # the token we passed is enforced
        status, page = _get(f"{base}/lab/tree/{QUICKSTART}", token)
        assert status == 200 and b"JupyterLab" in page
        # the page a browser would be sent to opens the notebook itself (the CLI exec'd into the server: same pid)
        opener = tmp_path / "runtime" / f"jpserver-file-to-run-{proc.pid}-open.html"
        assert f"lab/tree/{QUICKSTART}" in opener.read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_cache_writes_a_resumable_disk_cache(tmp_path):
    out = tmp_path / "cache"
    r = cli("cache", "--hook", "blocks.0.ln2.hook_normalized", "--hook", "blocks.0.hook_mlp_out", "--tokens", "300",
            "--n-ctx", "16", "--model-batch-size", "4", "--device", "cpu", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_rows"] == 300 and manifest["n_ctx"] == 16
    assert manifest["hooks"] == ["blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"]
    assert "300 rows" in r.stdout
    bad = cli("cache", "--hook", "blocks.9.hook_resid_post", "--tokens", "10", "--device", "cpu", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "layer 9, but the model has 4 layers" in bad.stderr
