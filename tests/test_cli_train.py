"""`sae-widgets train` / `eval` end to end, including a real SIGKILL in the middle of training and `--resume`."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

SMALL = ["--hook", "blocks.0.hook_resid_post", "--arch", "topk", "--d-sae", "64", "--k", "4", "--n-ctx", "16",
         "--batch-size", "64", "--buffer-size", "256", "--model-batch-size", "4", "--eval-tokens", "512",
         "--dead-window-tokens", "256", "--no-progress", "--device", "cpu"]


def train(*args, **kw):
    return subprocess.run([sys.executable, "-m", "sae_widgets", "train", *args], capture_output=True, text=True,
                          timeout=600, **kw)


def test_train_eval_and_resume_after_sigkill(tmp_path):
    steps = 400
    whole = train(*SMALL, "--tokens", str(64 * steps), "--checkpoint-every", "50", "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "explained_variance" in whole.stdout and "ce_loss_score" in whole.stdout
    metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert metrics["metrics"]["l0"] == 4.0

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "sae_widgets", "train", *SMALL, "--tokens", str(64 * steps),
                             "--checkpoint-every", "50", "--out", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run_dir / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    step_at_kill = json.loads(latest.read_text())["step"]
    assert 0 < step_at_kill < steps and not (run_dir / "sae").exists()

    resumed = train("--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(tmp_path / "whole" / "sae" / "sae.safetensors")
    b = load_file(run_dir / "sae" / "sae.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after kill at step {step_at_kill} and resume"

    ev = subprocess.run([sys.executable, "-m", "sae_widgets", "eval", str(run_dir), "--tokens", "512"],
                        capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert "fvu" in ev.stdout and "kl_div_score" in ev.stdout


def test_train_from_config_file_and_bad_input(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"hook": "blocks.0.hook_mlp_out", "arch": "relu", "d_sae": 64, "tokens": 64 * 6,
                               "n_ctx": 16, "batch_size": 64, "buffer_size": 256, "model_batch_size": 4,
                               "eval_tokens": 256, "progress": False, "device": "cpu"}))
    ok = train("--config", str(cfg), "--out", str(tmp_path / "r"))
    assert ok.returncode == 0, ok.stderr[-3000:]
    saved = json.loads((tmp_path / "r" / "run_config.json").read_text())
    assert saved["arch"] == "relu" and saved["out"] == str(tmp_path / "r")
    again = train("--config", str(cfg), "--out", str(tmp_path / "r"))
    assert again.returncode == 2 and "already holds a run" in again.stderr
    bad = train("--hook", "blocks.0.hook_resid_pots", "--out", str(tmp_path / "x"), "--no-progress")
    assert bad.returncode == 2 and "Did you mean 'blocks.0.hook_resid_post'" in bad.stderr
    arch = train("--hook", "blocks.0.hook_resid_post", "--arch", "gated", "--out", str(tmp_path / "y"))
    assert arch.returncode == 2 and "invalid choice: 'gated'" in arch.stderr and len(arch.stderr.splitlines()) == 1
    cfg.write_text(json.dumps({"hook": "blocks.0.hook_resid_post", "arch": "gated"}))
    arch_in_file = train("--config", str(cfg), "--out", str(tmp_path / "z"))
    assert arch_in_file.returncode == 2 and "arch='gated' is not one of" in arch_in_file.stderr
    assert not (tmp_path / "z").exists(), "a bad config must fail before anything is written"
    missing = train("--arch", "topk")
    assert missing.returncode == 2 and "--hook is required" in missing.stderr


def test_precision_flags_reach_the_model_and_the_trainer(tmp_path):
    from sae_widgets.runs import RunConfig, build_run

    base = dict(hook="blocks.0.hook_resid_post", d_sae=64, k=4, n_ctx=16, batch_size=64, buffer_size=256,
                model_batch_size=4, tokens=640, progress=False, device="cpu", out=str(tmp_path / "run"))
    model, store, trainer = build_run(RunConfig(**base, model_dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    x = store.next_batch()
    assert x.dtype == torch.float32 and torch.isfinite(x).all()  # the store hands the SAE fp32 rows
    assert trainer.cfg.autocast_bf16 is False  # "auto" on CPU is fp32
    assert RunConfig(**{**base, "device": "cuda"}).train_config().autocast_bf16 is True  # "auto" on CUDA is bf16
    assert RunConfig(**{**base, "device": "cuda", "sae_dtype": "float32"}).sae_bf16 is False
    with pytest.raises(ValueError, match="sae_dtype='bfloat16'.*use sae_dtype='auto' or 'float32'"):
        RunConfig(**base, sae_dtype="bfloat16").train_config()
    with pytest.raises(ValueError, match="model dtype 'int8' is not one of"):
        RunConfig(**base, model_dtype="int8")
    # a run written before the field existed trained in fp32 and resumes in fp32, also on CUDA
    old = {k: v for k, v in RunConfig(**{**base, "device": "cuda"}).__dict__.items() if k not in ("sae_dtype", "model_dtype")}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "run_config.json").write_text(json.dumps(old))
    assert RunConfig.load(tmp_path / "old").sae_bf16 is False

    r = train("--hook", "blocks.0.hook_resid_post", "--sae-dtype", "float16", "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "invalid choice: 'float16'" in r.stderr.strip().splitlines()[-1]
