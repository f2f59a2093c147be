"""Trainer: bit-identical resume after a kill, determinism, NaN guard, events, decoder-norm constraint, dead latents."""
from __future__ import annotations

import pytest
import torch

from sae_widgets.activations import ActivationStore
from sae_widgets.persistence import load_sae
from sae_widgets.sae import SAE, SAEConfig
from sae_widgets.train import Trainer, TrainConfig, TrainingDiverged, flatten_state, latest_checkpoint, unflatten_state

HOOK = "blocks.1.hook_resid_post"


def store(model, hook=HOOK):
    return ActivationStore(model, hook, n_ctx=16, batch_size=64, model_batch_size=4, buffer_size=256, show_progress=False)


def topk_cfg(arch="topk", **kw):
    return SAEConfig(arch=arch, d_in=256, d_sae=128, k=8 if arch not in ("relu", "jumprelu") else None, hook=HOOK, **kw)


def train_cfg(out, **kw):
    args = dict(total_tokens=64 * 12, checkpoint_every=4, dead_window_tokens=128, init_tokens=256, progress=False,
                log_every=1, out_dir=str(out))
    args.update(kw)
    return TrainConfig(**args)


def params(trainer):
    return {k: v.clone() for k, v in trainer.sae.state_dict().items()}


class Kill(Exception):
    pass


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_kill_and_resume_is_bit_identical(model, tmp_path, arch):
    torch.manual_seed(0)
    whole = Trainer(SAE(topk_cfg(arch)), store(model), train_cfg(tmp_path / "whole"))
    whole.run()

    def kill_at_step_6(ev):
        if ev.kind == "step" and ev.step == 6:
            raise Kill

    torch.manual_seed(0)
    cut = Trainer(SAE(topk_cfg(arch)), store(model), train_cfg(tmp_path / "cut"), callbacks=[kill_at_step_6])
    with pytest.raises(Kill):
        cut.run()
    assert latest_checkpoint(tmp_path / "cut").name == "step_00000004"
    resumed = Trainer(SAE(topk_cfg(arch)), store(model), train_cfg(tmp_path / "cut"))  # fresh objects, as after a kill
    resumed.run(resume=True)
    a, b = params(whole), params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert whole.history[-1]["loss"] == resumed.history[-1]["loss"]
    if arch == "topk":  # (a fresh JumpReLU fires every latent at its 0.001 initial threshold)
        assert float(whole.tokens_since_fired.max()) > 0, "dead-latent counters took part"
    for k, v in load_sae(tmp_path / "cut" / "sae").state_dict().items():
        assert torch.equal(v, a[k])


def test_same_seed_same_parameters_other_seed_differs(model, tmp_path):
    runs = []
    for i, seed in enumerate([3, 3, 4]):
        torch.manual_seed(seed)
        t = Trainer(SAE(topk_cfg()), store(model), train_cfg(tmp_path / str(i), total_tokens=64 * 5, seed=seed))
        t.run()
        runs.append(params(t))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not torch.equal(runs[0]["W_dec"], runs[2]["W_dec"])


class PoisonAt:
    """A store wrapper whose batch number `n` holds a NaN."""

    def __init__(self, inner, n):
        self.inner, self.n, self.count, self.batch_size = inner, n, 0, inner.batch_size

    def next_batch(self):
        self.count += 1
        x = self.inner.next_batch()
        if self.count == self.n:
            x = x.clone()
            x[0, 0] = float("nan")
        return x

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, s):
        self.inner.load_state_dict(s)


def test_nan_guard_names_the_step_and_keeps_the_last_good_checkpoint(model, tmp_path):
    torch.manual_seed(0)
    events = []
    # init consumes 4 batches (256 tokens); training step s reads batch 4 + s + 1
    t = Trainer(SAE(topk_cfg()), PoisonAt(store(model), 4 + 6 + 1), train_cfg(tmp_path), callbacks=[events.append])
    with pytest.raises(TrainingDiverged, match=r"at step 6 .*last good checkpoint: .*step_00000004"):
        t.run()
    assert [e.kind for e in events][-1] == "failed"
    good = latest_checkpoint(tmp_path)
    assert good.name == "step_00000004"
    resumed = Trainer(SAE(topk_cfg()), store(model), train_cfg(tmp_path))
    resumed.load_checkpoint()
    assert resumed.step == 4 and all(torch.isfinite(p).all() for p in resumed.sae.parameters())


def test_events_decoder_norm_and_dead_latents(model, tmp_path):
    events = []
    torch.manual_seed(0)
    t = Trainer(SAE(topk_cfg()), store(model), train_cfg(tmp_path, total_tokens=64 * 8, dead_window_tokens=64),
                callbacks=[events.append])
    sae = t.run()
    kinds = [e.kind for e in events]
    assert kinds.count("step") == 8 and kinds[-1] == "finished" and kinds.count("checkpoint") == 2  # step 4, then the final one (step 8, written once)
    assert events[-1].path.endswith("sae")
    step = [e for e in events if e.kind == "step"][-1].metrics
    for key in ("loss", "mse", "l0", "explained_variance", "dead_fraction", "lr", "tokens_per_s"):
        assert key in step
    assert step["l0"] == 8.0
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128), rtol=0, atol=1e-5)
    # counters are in tokens: a latent that never fired in 8 steps of 64 tokens has a count of 512
    never = t.tokens_since_fired == 512
    assert ((t.tokens_since_fired % 64) == 0).all()
    assert step["dead_fraction"] == pytest.approx(float((t.tokens_since_fired >= 64).float().mean()))
    assert never.sum() <= 128


def test_lr_schedule_warmup_and_decay(model):
    t = Trainer(SAE(topk_cfg()), store(model), TrainConfig(total_tokens=64 * 100, lr=1.0, lr_warmup_steps=10,
                                                           lr_decay="linear", lr_decay_fraction=0.2, progress=False))
    f = [t.lr_factor(s) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[50] == 1.0
    assert f[80] == pytest.approx(1.0) and f[90] == pytest.approx(0.5) and f[99] == pytest.approx(0.05)


def test_checkpoint_state_round_trip_is_exact():
    state = {"a": torch.randn(3), "opt": {"state": {0: {"step": torch.tensor(5.0)}}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]},
             "n": 7, "none": None}
    tensors, tree = flatten_state(state)
    back = unflatten_state(tree, tensors)
    assert torch.equal(back["a"], state["a"]) and back["opt"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert list(back["opt"]["state"]) == [0] and back["n"] == 7 and back["none"] is None
    with pytest.raises(TypeError, match="cannot checkpoint"):
        flatten_state({"bad": object()})


def test_bad_train_config_is_a_clear_error():
    with pytest.raises(ValueError, match="lr_decay='exp' is not one of"):
        TrainConfig(total_tokens=10, lr_decay="exp")
    with pytest.raises(ValueError, match="total_tokens=0"):
        TrainConfig(total_tokens=0)
    with pytest.raises(ValueError, match="arch='gated' is not one of"):
        SAEConfig(arch="gated", d_in=4, d_sae=8)
    with pytest.raises(ValueError, match="needs 1 <= k <= d_sae=8"):
        SAEConfig(arch="topk", d_in=4, d_sae=8, k=9)
