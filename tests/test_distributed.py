"""Data-parallel training under torchrun (gloo, 2 CPU processes) against one process with the same global batch.

The reference is the plain single-process run. Parameters, dead-latent counters (in tokens) and logged metrics of the
2-rank run must match it to float rounding. Resuming on another world size (2 -> 1, 1 -> 2) must continue the same
run. A rank that raises must name itself and leave the last checkpoint loadable. A batch the world size does not
divide must be a clear error. torchrun's workers use one thread each, so the in-process references do too: then the
only differences left are the order of sums across ranks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file

from sae_widgets.activations import ActivationStore, ModelRows, write_activation_cache
from sae_widgets.distributed import DataParallel, RankShardedCache, ShardedModelRows
from sae_widgets.runs import RunConfig, train_run
from sae_widgets.token_sources import EmbeddedCorpus
from sae_widgets.train import latest_checkpoint

HOOK = "blocks.0.hook_resid_post"
PAIR = ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")
STEPS, BATCH = 16, 64
# d_sae 512 with k 4 on 64-token batches and a 128-token dead window: latents die and revive, so the aux-k loss and
# the token-unit counters take part; model_batch_size 5 splits 3 + 2 windows over two ranks (unequal shares)
RUN = dict(hook=HOOK, arch="topk", d_sae=512, k=4, tokens=BATCH * STEPS, batch_size=BATCH, buffer_size=256, n_ctx=16,
           model_batch_size=5, dead_window_tokens=128, checkpoint_every=8, eval_tokens=256, lr_warmup_steps=2,
           progress=False, device="cpu")
TOL = 1e-5  # max |Δ parameter|; measured: about 1e-7


@contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def checkpoint(run_dir, step: int) -> tuple[dict[str, torch.Tensor], dict]:
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    return load_file(ckpt / "state.safetensors"), json.loads((ckpt / "state.json").read_text())


def final_sae(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "sae" / "sae.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str = "") -> float:
    keys = [k for k in a if k.startswith(prefix) and a[k].is_floating_point()]
    assert keys and all(k in b for k in keys)
    return max(float((a[k] - b[k]).abs().max()) for k in keys)


def assert_same_history(h_ref: list[dict], h_dp: list[dict], upto: int) -> None:
    """Logged metrics are global means over the ranks (token-weighted), so they equal the single process's."""
    ref = [h for h in h_ref if h["step"] <= upto]
    dp = [h for h in h_dp if h["step"] <= upto]
    assert ref and [h["step"] for h in ref] == [h["step"] for h in dp]  # logged every 10 steps, and at the end
    for a, b in zip(ref, dp):
        assert a["tokens"] == b["tokens"]
        for key in ("loss", "mse", "l0", "explained_variance", "dead_fraction", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


@pytest.fixture(scope="module")
def caches(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    single = write_activation_cache(model, HOOK, root / "single", n_tokens=4096, n_ctx=16, model_batch_size=8,
                                    shard_tokens=1000, show_progress=False)
    pair = write_activation_cache(model, PAIR, root / "pair", n_tokens=1500, n_ctx=16, model_batch_size=8,
                                  shard_tokens=700, show_progress=False)
    return single, pair


# ----------------------------------------------------------------------------------------------- data, in process
@pytest.mark.parametrize("which", ["single", "pair"])
def test_rank_slices_of_the_cache_are_the_single_process_batches(caches, which):
    cache = caches[0] if which == "single" else caches[1]
    ref = ActivationStore.from_cache(cache, batch_size=BATCH, buffer_size=256, seed=3, show_progress=False)
    world2 = [RankShardedCache(cache, DataParallel(rank=r, world_size=2), batch_size=BATCH, buffer_size=256, seed=3)
              for r in range(2)]
    world1 = RankShardedCache(cache, DataParallel(), batch_size=BATCH, buffer_size=256, seed=3, prefetch=False)
    as_tuple = (lambda b: b) if which == "pair" else (lambda b: (b,))
    for i in range(100):  # past the end of the cache: the second epoch comes from the same shuffle
        want = as_tuple(ref.next_batch())
        halves = [as_tuple(s.next_batch()) for s in world2]
        whole = as_tuple(world1.next_batch())
        for j, w in enumerate(want):
            assert halves[0][j].shape[0] == BATCH // 2
            assert torch.equal(torch.cat([halves[0][j], halves[1][j]]), w), (i, j)
            assert torch.equal(whole[j], w), (i, j)
        if i == 60:  # a checkpoint of rank 0 of two resumes a world of one on the very same batch sequence
            state = world2[0].state_dict()
            world1 = RankShardedCache(cache, DataParallel(), batch_size=BATCH, buffer_size=256, seed=3)
            world1.load_state_dict(state)
    assert ref.rows.epoch >= 1
    with pytest.raises(ValueError, match="single-process run"):  # a plain store's state is rows, not row numbers
        world1.load_state_dict(ref.state_dict())
    with pytest.raises(ValueError, match="data-parallel run"):
        ref.load_state_dict(world1.state_dict())


class ThreadRank:
    """Rank `rank` of two, each in a thread of this process: all_gather_rows swaps shares through a barrier."""

    def __init__(self, rank: int, shares: dict, barrier):
        self.rank, self.world_size, self.shares, self.barrier = rank, 2, shares, barrier

    def all_gather_rows(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        assert len(rows) == counts[self.rank] and sum(counts) == 5 * 16  # every position of 3 + 2 windows
        self.shares[self.rank] = rows
        self.barrier.wait()
        out = torch.cat([self.shares[0], self.shares[1]])
        self.barrier.wait()
        return out


@pytest.mark.parametrize("factor", [None, 1.2])
def test_model_batches_split_over_ranks_give_the_single_process_rows(model, factor):
    """factor 1.2 drops many rows as 'massive': the median must be the whole model batch's on every rank."""
    import threading

    from sae_widgets.models import load_model

    kw = dict(n_ctx=16, prepend_bos=True, keep_bos_rows=False, model_batch_size=5, dtype=torch.float32,
              massive_norm_factor=factor)
    plain = ModelRows(model, [HOOK], EmbeddedCorpus("train"), **kw)
    # each rank its own copy of the model, as in torchrun: hooks live on the model, so two threads running one
    # model at once would capture each other's activations; a timeout turns a rank's error into a failure, not a hang
    shares, barrier = {}, threading.Barrier(2, timeout=120)
    sharded = [ShardedModelRows(ThreadRank(r, shares, barrier), m, [HOOK], EmbeddedCorpus("train"), **kw)
               for r, m in enumerate([model, load_model(device="cpu")])]
    for _ in range(3):
        want = plain.next_rows()
        got, errors = [None, None], []

        def run(r):
            try:
                got[r] = sharded[r].next_rows()
            except BaseException as e:  # re-raised below, in the test's thread
                errors.append(e)
                barrier.abort()

        threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        assert len(shares[0]) == 3 * 16 and len(shares[1]) == 2 * 16  # 3 + 2 windows
        for g in got:
            assert torch.equal(g, want)
    assert all(s.windows_done == plain.windows_done for s in sharded)
    assert all(s.counts == plain.counts for s in sharded)
    assert (plain.counts["dropped_massive_norm"] > 0) == (factor is not None)


# ----------------------------------------------------------------------------------------------- torchrun, gloo
def test_world_size_that_does_not_divide_the_batch_is_a_clear_error(caches, tmp_path):
    with pytest.raises(ValueError, match=r"batch_size=64 does not divide by the world size 3 .* e\.g\. 63 or 66"):
        DataParallel(rank=0, world_size=3).local_batch_size(64)
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({**RUN, "batch_size": 63, "cache": str(caches[0])}))
    bad = torchrun("-m", "sae_widgets", "train", "--config", str(cfg), "--out", str(tmp_path / "r"))
    assert bad.returncode != 0
    assert "batch_size=63 does not divide by the world size 2" in bad.stderr and "e.g. 62 or 64" in bad.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


DIE = """
import sys
import torch.distributed as dist
from sae_widgets.config_io import read_json
from sae_widgets.runs import RunConfig, train_run

def die(ev):
    if ev.kind == "step" and ev.step == 10 and dist.get_rank() == 1:
        raise RuntimeError("rank 1 stops here on purpose")

train_run(RunConfig.from_dict(read_json(sys.argv[1])), callbacks=[die])
"""


def test_two_ranks_match_one_process_and_a_dead_rank_leaves_the_last_checkpoint(tmp_path):
    """From a live model: each rank runs the model on its share of every model batch. Rank 1 raises at step 10: the
    run stops with its error, the step-8 checkpoint equals one process's, and a single process finishes the run."""
    with one_thread():
        train_run(RunConfig(**RUN, out=str(tmp_path / "single")))
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({**RUN, "out": str(tmp_path / "dp")}))
    (tmp_path / "die.py").write_text(DIE)
    dead = torchrun(str(tmp_path / "die.py"), str(cfg))
    assert dead.returncode != 0
    assert "rank 1 of 2 failed at step 10" in dead.stderr and "rank 1 stops here on purpose" in dead.stderr
    assert "the last complete checkpoint is" in dead.stderr and "step_00000008" in dead.stderr
    assert latest_checkpoint(tmp_path / "dp").name == "step_00000008" and not (tmp_path / "dp" / "sae").exists()

    ref, _ = checkpoint(tmp_path / "single", 8)
    got, _ = checkpoint(tmp_path / "dp", 8)
    assert max_diff(ref, got, "sae.") < TOL
    assert torch.equal(ref["tokens_since_fired"], got["tokens_since_fired"])  # global token counts on every rank
    assert int(got["tokens_since_fired"].max()) >= RUN["dead_window_tokens"], "no latent went dead: counters untested"

    with one_thread():  # no torchrun: the run folder says it was data-parallel, so it resumes as a world of one
        train_run(RunConfig.load(tmp_path / "dp"), resume=True)
    assert max_diff(final_sae(tmp_path / "single"), final_sae(tmp_path / "dp")) < TOL
    ref16, ref16_meta = checkpoint(tmp_path / "single", 16)
    got16, got16_meta = checkpoint(tmp_path / "dp", 16)
    assert torch.equal(ref16["tokens_since_fired"], got16["tokens_since_fired"])
    assert_same_history(ref16_meta["history"], got16_meta["history"], upto=16)


class StopAfterCheckpoint(Exception):
    pass


def stop_after_step_8_checkpoint(ev):
    if ev.kind == "checkpoint" and ev.step == 8:
        raise StopAfterCheckpoint


def test_a_one_process_run_resumes_on_two_ranks(caches, tmp_path):
    """From a disk cache: a data-parallel run of one process (the row-number store, no torchrun), stopped after its
    step-8 checkpoint, is bit-identical to the plain run there; torchrun with two ranks finishes it like the plain
    run."""
    cache = str(caches[0])
    with one_thread():
        train_run(RunConfig(**RUN, cache=cache, out=str(tmp_path / "single")))
        with pytest.raises(StopAfterCheckpoint):
            train_run(RunConfig(**RUN, cache=cache, out=str(tmp_path / "dp")), callbacks=[stop_after_step_8_checkpoint],
                      parallel=DataParallel())
    ref, _ = checkpoint(tmp_path / "single", 8)
    got, _ = checkpoint(tmp_path / "dp", 8)
    assert max_diff(ref, got, "sae.") == 0.0 and torch.equal(ref["tokens_since_fired"], got["tokens_since_fired"])
    assert json.loads((tmp_path / "dp" / "run_config.json").read_text()) == asdict(RunConfig(**RUN, cache=cache,
                                                                                             out=str(tmp_path / "dp")))

    done = torchrun("-m", "sae_widgets", "train", "--resume", str(tmp_path / "dp"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("explained_variance") == 1  # rank 0 alone evaluates and prints
    assert max_diff(final_sae(tmp_path / "single"), final_sae(tmp_path / "dp")) < TOL
    ref16, ref_meta = checkpoint(tmp_path / "single", 16)
    got16, got_meta = checkpoint(tmp_path / "dp", 16)
    assert torch.equal(ref16["tokens_since_fired"], got16["tokens_since_fired"])
    assert_same_history(ref_meta["history"], got_meta["history"], upto=16)
