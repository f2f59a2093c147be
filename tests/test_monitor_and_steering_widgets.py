"""TrainingMonitor and SteeringPanel on the Python side, with no front-end (as under papermill).

The monitor is checked against a plain `Trainer.run()` (same parameters bit for bit: it adds no training path),
hand-computed throttling and chart geometry, pause/resume/stop with the checkpoint on disk, and an error raised in
the training thread. The panel is checked against `generate` and an independent `run_with_cache` + `sae.encode`.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from sae_widgets.sae import SAE, SAEConfig
from sae_widgets.synthetic import SyntheticActivations
from sae_widgets.train import Trainer, TrainConfig, TrainEvent, latest_checkpoint
from sae_widgets.widgets import SteeringPanel, TrainingMonitor
from sae_widgets.widgets.training_monitor import chart_points, eta_seconds, line_chart_svg

sys.path.insert(0, str(Path(__file__).parent))
from browser_harness import StandInStats  # noqa: E402

HOOK = "blocks.1.hook_resid_post"


# ------------------------------------------------------------------------------------------ training monitor
def small_trainer(total_steps=30, out_dir=None, store=None, callbacks=None, **kw):
    torch.manual_seed(0)
    store = store or SyntheticActivations(d_in=16, n_features=32, batch_size=64, mean_active=3, seed=0)
    sae = SAE(SAEConfig(arch="topk", d_in=16, d_sae=32, k=4))
    cfg = TrainConfig(total_tokens=64 * total_steps, progress=False, log_every=1, init_tokens=128,
                      lr_warmup_steps=2, out_dir=str(out_dir) if out_dir else None, **kw)
    return Trainer(sae, store, cfg, callbacks=callbacks)


def wait_for(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"condition not met in {timeout} s")


def test_monitored_run_equals_plain_run_and_wait_returns_the_sae(tmp_path):
    plain = small_trainer()
    plain.run()
    trainer = small_trainer(out_dir=tmp_path)
    mon = TrainingMonitor(trainer, refresh_s=0.05)
    assert mon.start() is mon
    sae = mon.wait(timeout=120)
    assert sae is trainer.sae and mon.result() is sae
    for k, v in plain.sae.state_dict().items():
        assert torch.equal(v, sae.state_dict()[k]), k
    assert [r["loss"] for r in mon.rows] == [h["loss"] for h in plain.history]
    assert mon.status == "finished" and mon.error == ""
    assert mon.progress["tokens"] == mon.progress["total_tokens"] == 64 * 30 and mon.progress["fraction"] == 1.0
    assert mon.final_metrics["step"] == 30 and mon.final_metrics["loss"] == plain.history[-1]["loss"]
    assert mon.checkpoint == str(latest_checkpoint(tmp_path))
    assert len(mon.points) == 30 and mon.points[-1]["tokens"] == 64 * 30
    html = mon.static_html()
    assert html.count('class="sae-chart"') == 6 and "finished" in html and "sae-tm-final" in html
    with pytest.raises(RuntimeError, match="already started"):
        mon.start()


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def step_event(step):
    return TrainEvent("step", step=step, tokens=64 * step, total_tokens=64 * 100,
                      metrics={"loss": 1.0 / step, "l0": 4.0, "explained_variance": 0.5, "dead_fraction": 0.0,
                               "lr": 1e-3, "tokens_per_s": 640.0})


def test_updates_are_throttled_to_refresh_s():
    clock = FakeClock()
    mon = TrainingMonitor(small_trainer(total_steps=100), refresh_s=1.0, clock=clock)
    pushed_at = []
    mon.observe(lambda c: pushed_at.append(clock.t), "n_pushes")
    for i in range(10):  # one logged step every 0.3 s: pushes at 0.0, 1.2 and 2.4 only
        clock.t = 0.3 * i
        mon._on_event(step_event(i + 1))
    assert pushed_at == pytest.approx([0.0, 1.2, 2.4])
    assert len(mon.rows) == 10 and len(mon.points) == 9            # the last push carried rows 1..9
    # ETA at 640 tok/s with 64*9 of 6400 tokens done: (6400 - 576) / 640 s
    assert mon.progress["eta_s"] == pytest.approx((6400 - 576) / 640)


def test_real_run_refreshes_at_least_once_a_second(tmp_path):
    trainer = small_trainer(total_steps=120)
    mon = TrainingMonitor(trainer, refresh_s=0.25)
    stamps = []
    mon.observe(lambda c: stamps.append(time.monotonic()), "n_pushes")
    t0 = time.monotonic()
    mon.start().wait(timeout=120)
    elapsed = time.monotonic() - t0
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert len(stamps) <= elapsed / 0.25 + 2, (len(stamps), elapsed)   # throttled: not one push per step
    assert len(stamps) < len(mon.rows)
    assert max(gaps, default=0) <= 1.0, gaps


def test_chart_points_eta_and_chart_geometry_by_hand():
    rows = [{"i": i} for i in range(10)]
    assert [r["i"] for r in chart_points(rows, 4)] == [0, 3, 6, 9]
    assert [r["i"] for r in chart_points(rows, 20)] == list(range(10))
    with pytest.raises(ValueError, match="max_points=1"):
        chart_points(rows, 1)
    assert eta_seconds(100, 1100, 50.0) == 20.0 and eta_seconds(5, 10, None) is None
    # x 0..200 -> 52..240 (plot width 248 - 52 - 8 = 188); y 1..3 -> 92..8 (plot height 110 - 8 - 18 = 84)
    svg = line_chart_svg([0, 100, 200], [3.0, 2.0, 1.0], "loss")
    assert 'points="52.00,8.00 146.00,50.00 240.00,92.00"' in svg
    assert 'points="52.00,8.00 240.00,92.00"' in line_chart_svg([0, 100, 200], [3.0, None, 1.0], "loss")
    assert "no data yet" in line_chart_svg([0], [None], "<b>")
    assert "<title>&lt;b&gt;</title>" in line_chart_svg([0], [None], "<b>")


def test_pause_resume_and_stop_write_a_checkpoint(tmp_path):
    trainer = small_trainer(total_steps=100_000, out_dir=tmp_path)
    mon = TrainingMonitor(trainer, refresh_s=0.1)
    mon.start()
    wait_for(lambda: len(mon.rows) >= 3)
    mon._on_front_end_msg(mon, {"action": "pause"}, [])            # what the Pause button sends
    assert mon.status == "paused"
    time.sleep(0.3)                                                 # the thread reaches the gate
    held = trainer.step
    time.sleep(0.5)
    assert trainer.step == held, "training went on while paused"
    mon.resume()
    assert mon.status == "running"
    wait_for(lambda: trainer.step > held + 2)
    mon.pause()
    time.sleep(0.2)
    mon._on_front_end_msg(mon, {"action": "stop"}, [])              # stop while paused ends the run too
    sae = mon.wait(timeout=60)
    assert mon.status == "stopped" and trainer.tokens < trainer.cfg.total_tokens
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == f"step_{trainer.step:08d}" and (ckpt / "state.safetensors").is_file()
    assert mon.checkpoint == str(ckpt)
    assert (tmp_path / "sae").is_dir() and sae is trainer.sae
    mon._on_front_end_msg(mon, {"action": "explode"}, [])
    assert "explode" in mon.error and "pause" in mon.error


class FailingStore:
    """Synthetic batches until batch `n`, then an error (a disk or data-loader failure)."""

    def __init__(self, n):
        self.inner, self.n, self.i = SyntheticActivations(d_in=16, n_features=32, batch_size=64, seed=0), n, 0
        self.batch_size = 64

    def next_batch(self):
        self.i += 1
        if self.i == self.n:
            raise OSError("the <disk> went away")
        return self.inner.next_batch()

    def state_dict(self):
        return self.inner.state_dict()


def test_error_in_the_training_thread_shows_and_is_reraised():
    mon = TrainingMonitor(small_trainer(total_steps=100, store=FailingStore(8)), refresh_s=0.1)
    mon.start()
    with pytest.raises(OSError, match="went away"):
        mon.wait(timeout=60)
    with pytest.raises(OSError, match="went away"):
        mon.result()
    assert mon.status == "failed" and mon.error == "OSError: the <disk> went away"
    assert "the &lt;disk&gt; went away" in mon.static_html() and "<disk>" not in mon.static_html()
    assert threading.active_count() >= 1 and mon.done


def test_result_before_the_end_and_bad_settings():
    mon = TrainingMonitor(small_trainer())
    with pytest.raises(RuntimeError, match="not started"):
        mon.wait()
    with pytest.raises(RuntimeError, match="has not ended"):
        mon.result()
    with pytest.raises(ValueError, match="refresh_s=0"):
        TrainingMonitor(small_trainer(), refresh_s=0)


# ------------------------------------------------------------------------------------------ steering panel
@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    return SAE(SAEConfig(arch="topk", d_in=256, d_sae=512, k=8, hook=HOOK)).eval()


def reference_latents(model, sae, tokens):
    """Latents of every token through run_with_cache and sae.encode (not the steering module's reader)."""
    _, cache = model.run_with_cache(torch.tensor([tokens]), names_filter=HOOK)
    with torch.no_grad():
        return sae.encode(cache[HOOK][0].float()).double()


def test_generate_matches_generate_and_an_independent_latent_read(model, sae):
    from sae_widgets.generation import generate
    from sae_widgets.steering import LatentEdit

    panel = SteeringPanel(model, sae, prompt="The whale and the ship")
    panel.seed, panel.temperature, panel.max_new_tokens = 3, 1.0, 6
    base = generate(model, sae, panel.prompt, [], seed=3, max_new_tokens=6, temperature=1.0)
    f = reference_latents(model, sae, base.tokens)[len(base.prompt_tokens):]
    latent = int(f.sum(0).argmax())                                 # the latent the baseline text evokes most
    assert f[:, latent].max() > 0
    panel.add_latent(latent, 40.0, "add")
    run = panel.generate()
    steered = generate(model, sae, panel.prompt, [LatentEdit(latent, "add", 40.0)], seed=3, max_new_tokens=6,
                       temperature=1.0)
    assert run["baseline"]["text"] == base.completion and run["steered"]["text"] == steered.completion
    assert run["baseline"]["tokens"] == base.new_str_tokens
    assert run["baseline"]["values"] == pytest.approx(f[:, latent].tolist(), abs=1e-4)
    fs = reference_latents(model, sae, steered.tokens)[len(steered.prompt_tokens):, latent]
    assert run["steered"]["values"] == pytest.approx(fs.tolist(), abs=1e-4)
    assert run["baseline"]["latents"][0] == [[latent, pytest.approx(float(f[0, latent]), abs=1e-4)]]
    assert run["scale"] == pytest.approx(max(f[:, latent].abs().max(), fs.abs().max()).item(), abs=1e-4)
    assert run["latent_activations"][0]["baseline"] == pytest.approx(float(f[:, latent].mean()), abs=1e-4)
    assert panel.history == [run] and panel.selected == 0 and panel.current == run
    html = panel.static_html()
    assert "sae-sp-baseline" in html and "sae-sp-steered" in html


def test_history_select_and_latent_editing(model, sae):
    panel = SteeringPanel(model, sae, prompt="<script>x</script> sea")
    panel.temperature, panel.max_new_tokens = 0.0, 3
    first = panel.generate()                                        # no edits: steered == baseline
    assert first["steered"]["text"] == first["baseline"]["text"] and first["edits"] == []
    panel.add_latent(7, 5.0)
    panel.add_latent(9, None, "ablate")
    panel.add_latent(7, 2.0, "scale")                               # replaces latent 7, keeps its place
    assert panel.edits == [{"latent": 7, "mode": "scale", "value": 2.0}, {"latent": 9, "mode": "ablate", "value": 0.0}]
    panel.positions = "last"
    second = panel.generate()
    assert [e.to_dict()["positions"] for e in panel.latent_edits()] == ["last", "last"]
    assert second["edits"] == panel.edits and second["positions"] == "last" and panel.selected == 1
    assert panel.select(0) == first and panel.selected == 0 and panel.current["edits"] == []
    assert panel.select(-1) == second and panel.selected == 1
    with pytest.raises(ValueError, match=r"run 2 does not exist: the history holds 2 runs \(0..1\)"):
        panel.select(2)
    with pytest.raises(Exception, match="selected=5 is out of range"):
        panel.selected = 5
    panel.remove_latent(7)
    assert [r["latent"] for r in panel.edits] == [9]
    with pytest.raises(ValueError, match=r"latent 7 is not steered; steered latents: \[9\]"):
        panel.remove_latent(7)
    with pytest.raises(ValueError, match=r"latent=512 is out of range: valid latents are 0..511"):
        panel.add_latent(512, 1.0)
    with pytest.raises(ValueError, match="mode='boost' is not one of"):
        panel.add_latent(1, 1.0, "boost")
    with pytest.raises(Exception, match="positions='first' is not one of"):
        panel.positions = "first"
    panel._on_front_end_msg(panel, {"action": "add_latent", "latent": 9999, "value": 1.0}, [])  # a button's message
    assert "latent=9999 is out of range" in panel.error
    panel._on_front_end_msg(panel, {"action": "select", "index": 0}, [])
    assert panel.selected == 0 and panel.error == ""
    html = panel.static_html()
    assert "&lt;script&gt;x&lt;/script&gt;" in html and "<script>x" not in html


def test_search_latents_by_top_token_text(model, sae):
    stats = StandInStats(d_sae=512, seed=2)
    panel = SteeringPanel(model, sae, stats, max_matches=1000)
    cols = stats.columns()
    want = sorted((i for i in range(512) if any("whale" in t.lower() for t in cols["top_tokens"][i])),
                  key=lambda i: -cols["density"][i])
    panel.query = "WHALE"
    assert [m["latent"] for m in panel.matches] == want and want
    assert panel.matches[0]["top_tokens"] == " / ".join(cols["top_tokens"][want[0]])
    with pytest.raises(ValueError, match="needs stats"):
        SteeringPanel(model, sae).search_latents("whale")
    with pytest.raises(ValueError, match="stats describe 64 latents but the SAE has d_sae=512"):
        SteeringPanel(model, sae, StandInStats(d_sae=64))
