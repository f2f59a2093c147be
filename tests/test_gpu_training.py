"""GPU: every architecture trains in fp32 and with bf16 autocast, and the two agree. Runs where CUDA exists
(the lent GPU); CPU machines have no CUDA device, so there is nothing to run there."""
from __future__ import annotations

import pytest
import torch

from sae_widgets.sae import ARCHS, SAE, SAEConfig
from sae_widgets.synthetic import SyntheticActivations, recovery
from sae_widgets.train import Trainer, TrainConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def train(arch, bf16, steps=600):
    gen = SyntheticActivations(d_in=64, n_features=256, mean_active=5, batch_size=1024, seed=0, device="cuda")
    torch.manual_seed(0)
    k = 5 if arch not in ("relu", "jumprelu") else None
    sae = SAE(SAEConfig(arch=arch, d_in=64, d_sae=512, k=k, sparsity_coeff=2.0 if arch == "relu" else None)).cuda()
    tr = Trainer(sae, gen, TrainConfig(total_tokens=1024 * steps, lr=2e-3, progress=False, init_tokens=4096,
                                       dead_window_tokens=200_000, autocast_bf16=bf16, log_every=50))
    tr.run()
    return tr, recovery(sae.W_dec, gen.directions)


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_and_bf16_autocast_train_and_agree(arch):
    t32, r32 = train(arch, bf16=False)
    t16, r16 = train(arch, bf16=True)
    for t in (t32, t16):
        assert all(torch.isfinite(p).all() for p in t.sae.parameters())
    l32, l16 = t32.history[-1]["mse"], t16.history[-1]["mse"]
    assert abs(l16 - l32) / l32 < 0.15, f"{arch}: final mse fp32 {l32:.4f} vs bf16 {l16:.4f}"
    assert abs(r32 - r16) < 0.05, f"{arch}: recovery fp32 {r32:.3f} vs bf16 {r16:.3f}"
    if arch in ("topk", "relu"):
        assert r32 > 0.9 and r16 > 0.9, f"{arch}: recovery fp32 {r32:.3f}, bf16 {r16:.3f}"
    print(f"{arch}: mse fp32 {l32:.4f} bf16 {l16:.4f}; recovery fp32 {r32:.3f} bf16 {r16:.3f}")


def graph_run(cuda_graph, steps=240, out_dir=None, checkpoint_every=0, resume=False, total_steps=None):
    """TopK on synthetic data with a short dead window, so the dead-latent list (and the graph's capacity) moves."""
    gen = SyntheticActivations(d_in=64, n_features=256, mean_active=5, batch_size=1024, seed=0, device="cuda")
    torch.manual_seed(0)
    sae = SAE(SAEConfig(arch="topk", d_in=64, d_sae=2048, k=5, aux_k=64)).cuda()
    tr = Trainer(sae, gen, TrainConfig(total_tokens=1024 * (total_steps or steps), lr=2e-3, progress=False,
                                       init_tokens=4096, dead_window_tokens=2048, autocast_bf16=True, log_every=1,
                                       cuda_graph=cuda_graph, out_dir=out_dir, checkpoint_every=checkpoint_every))
    if total_steps is not None and not resume:  # stop early: the interrupted run
        tr.cfg.total_tokens = 1024 * steps
    tr.run(resume=resume)
    return tr


def test_cuda_graph_replay_equals_the_eager_step():
    """One captured step replayed from a state gives the same weights as the same step run eagerly from it."""
    from sae_widgets.step_graph import StepGraph

    tr = graph_run(True, steps=40)  # dead latents exist by now (window 2 steps)
    assert tr._dead_capacity > 0 and tr._graph.captures >= 1
    state = [tr.tokens_since_fired, *tr.sae.parameters(), *(t for s in tr.opt.state.values() for t in s.values())]
    saved = [t.detach().clone() for t in state]
    x, y = tr._next()
    eager = tr._device_step(x, y, tr._dead_capacity)
    after_eager = [t.detach().clone() for t in state]
    with torch.no_grad():
        for t, s in zip(state, saved):
            t.copy_(s)
    replayed = StepGraph(tr._device_step, warmup=0)((x, y), (tr._dead_capacity,))
    assert "aux_k" in replayed and torch.isclose(eager["loss"], replayed["loss"], rtol=1e-5)
    worst = max(((a.double() - b.double()).abs().max() / a.double().abs().max().clamp_min(1e-12)).item()
                for a, b in zip(after_eager, state))
    print(f"capacity {tr._dead_capacity}; loss eager {eager['loss']:.6f} graph {replayed['loss']:.6f}; "
          f"worst relative weight difference {worst:.2e}")
    assert worst < 1e-5, worst


def test_cuda_graph_training_follows_eager_training():
    """Over 240 steps (four captures as the dead list grows), the loss curve follows the eager run's."""
    eager, graphed = graph_run(False), graph_run(True)
    assert graphed._graph.captures >= 2, "the dead-list capacity should change"
    deads = [h["dead_fraction"] for h in graphed.history]
    assert max(deads) > 0.02, f"no dead latents, so the aux-k path was not exercised: {max(deads)}"
    rel = max(abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(eager.history, graphed.history))
    print(f"captures {graphed._graph.captures}; max dead fraction {max(deads):.3f}; max rel loss diff {rel:.2e}")
    assert rel < 3e-2, rel


def test_cuda_graph_run_resumes_from_a_checkpoint(tmp_path):
    """Stop at step 120 (checkpoint), resume in a fresh trainer (new capture), end where the uninterrupted run does."""
    full = graph_run(True, steps=240)
    graph_run(True, steps=120, total_steps=240, out_dir=str(tmp_path / "r"), checkpoint_every=120)
    resumed = graph_run(True, total_steps=240, out_dir=str(tmp_path / "r"), resume=True)
    assert resumed.step == full.step == 240
    rel = max(abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(full.history[120:], resumed.history[120:]))
    print(f"resumed vs uninterrupted: max rel loss diff {rel:.2e}")
    assert rel < 2e-2, rel


def test_the_cli_and_quickstart_configurations_train_through_the_kernels_on_cuda():
    """Acceptance: backend 'auto' (the default of SAEConfig, RunConfig and so of the CLI and the quickstart) runs the
    Triton kernels on CUDA, inside the captured step: the profiler must see the encoder and the sparse decoder."""
    from torch.profiler import ProfilerActivity, profile

    from sae_widgets.runs import RunConfig

    run = RunConfig(hook="blocks.1.hook_resid_post", d_sae=2048, k=16, tokens=4096 * 40, batch_size=4096,
                    progress=False, device="cuda")
    gen = SyntheticActivations(d_in=128, n_features=1024, mean_active=8, batch_size=4096, seed=0, device="cuda")
    sae = SAE(run.sae_config(128, 128, "synthetic")).cuda()
    assert sae.cfg.backend == "auto" and sae.uses_triton(torch.zeros(1, 128, device="cuda"))
    tr = Trainer(sae, gen, run.train_config())
    assert tr._graph is not None, "the TopK step on CUDA should be one CUDA graph"
    tr._initialize()
    for _ in range(3):
        tr.train_step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        tr.train_step()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    for kernel in ("_tile_top_kernel", "_merge_kernel", "_gather_sum_kernel", "_scatter_outer_kernel"):
        assert kernel in names, f"{kernel} did not run: {sorted(names)[:20]}"
