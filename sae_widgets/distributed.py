"""Data-parallel SAE training over torch.distributed: NCCL on GPUs, gloo on CPU, launched by torchrun.

    torchrun --nproc-per-node 2 -m sae_widgets train --config run.json      # one process per GPU

Why it is built this way:
- **Replicated weights, averaged gradients** (plain data parallelism). Even at d_sae 131,072 × d_in 768, W_enc and
  W_dec are 400 MB each in fp32 and the whole training state (weights, gradients, Adam) is 3.2 GB, so every GPU holds
  a full copy. FSDP or latent sharding would add communication to every step to save memory nobody lacks: the state
  costs 32·d_in bytes per latent, so sharding pays only past about 4 M latents at d_in 768 (about 1 M at d_in 4,096)
  on a 141 GB H200, half that on an 80 GB GPU. It is not implemented.
- **No DistributedDataParallel wrapper.** The trainer calls `sae.training_loss`, not `forward`, and on CUDA the
  gradients come from custom autograd functions (the Triton kernels); DDP only reduces gradients of work that went
  through its own `forward`. Instead `averaging_gradients` all-reduces each parameter's gradient asynchronously from a
  post-accumulate-grad hook the moment backward finishes it, so W_dec's reduction overlaps the encoder's backward, as
  DDP's buckets would. Only torch.distributed collectives are used.
- **N ranks = 1 process with the same global batch.** Each rank trains on the rank-th slice of every global batch (the
  batch size must divide by the world size), its mean-loss gradients are averaged, and clipping, the decoder-norm
  projection and Adam then run on identical averaged gradients on every rank. Initialisation (normalisation scales,
  geometric-median b_dec) sees the whole global sample on every rank, then rank 0's weights are broadcast.
- **Token units.** The 'fired' mask is all-reduced (a latent fired if it fired on any rank), and every rank's
  `tokens_since_fired` advances by the *global* batch's token count, so dead latents mean the same thing on 1 GPU or 8
  (sparsify advances its counters by the local count). Metrics (loss, mse, l0, ...) are token-weighted means over
  ranks and the explained variance uses the global batch's variance, all in one all-reduce per step.
- **Data.** From a disk cache (`RankShardedCache`), every rank runs the store's shuffle on row *indices* (the
  ActivationStore's own buffer, fed with indices instead of rows), so all ranks agree on the global batch without
  talking, then reads only its own rows from the memory-mapped shards: nothing but this rank's rows is loaded, so the
  cache may be larger than RAM. From a live model (`ShardedModelRows`), each rank runs the model on its share of every
  model batch and the rows are all-gathered, so every rank holds the same shuffle buffer. Either way the store's
  position is in global tokens, and a checkpoint resumes on any world size.
- **Checkpoints** are written by rank 0 only (atomically, as in the single-process trainer) while the others wait at
  a barrier. A run started under torchrun is marked in its folder (`data_parallel.json`); `sae-widgets train --resume`
  without torchrun continues it on one device with a world of one.
- **Failures.** The process group has a timeout (`SAE_WIDGETS_DIST_TIMEOUT_S`, default 600 s). A rank whose code
  raises prints the error, its rank and the last complete checkpoint; torchrun then stops the other ranks. Because
  only complete checkpoints are ever pointed to, the last one stays loadable whatever rank dies when.
- **Limits.** BatchTopK and Matryoshka select the top k·B latents of each rank's *local* batch (as data-parallel
  BatchTopK implementations do) and their inference threshold is averaged over ranks each step, so they match a single
  process only statistically; topk, abstopk, relu and jumprelu match it to float rounding.
"""
from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .activations import ActivationStore, CachedRows, HookWidths, ModelRows

MARKER = "data_parallel.json"
TIMEOUT_ENV = "SAE_WIDGETS_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600
SYNCED_BUFFERS = ("threshold",)  # batchtopk / matryoshka: the per-rank EMA of the inference threshold, averaged


def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun (it sets RANK, LOCAL_RANK and WORLD_SIZE)."""
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


# ----------------------------------------------------------------------------------------------- the process group
class DataParallel:
    """The process group as the trainer sees it: rank, world size, and the few collectives one step needs.

    A world of one (`DataParallel()`) needs no process group: every collective is then the identity. It is how a
    data-parallel run is resumed in a single process.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, device_type: str = "cpu"):
        self.rank, self.world_size, self.local_rank, self.device_type = rank, world_size, local_rank, device_type
        self.backend = dist.get_backend() if dist.is_initialized() else None
        self.owns_group = False  # set when from_torchrun started the process group: close() then ends it
        # gradients travel in this dtype (None: their own, fp32): torch.bfloat16 halves the all-reduce, as DDP's bf16
        # compression hook does, at the cost of rounding each rank's gradient to bf16 before averaging
        self.reduce_dtype: torch.dtype | None = None

    @classmethod
    def from_torchrun(cls, device_type: str, timeout_s: float | None = None) -> DataParallel:
        """Join the process group torchrun set up: NCCL when training on CUDA, gloo on CPU."""
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"data-parallel training runs on 'cpu' (gloo) or 'cuda' (NCCL), not {device_type!r}")
        if device_type == "cuda":
            n = torch.cuda.device_count()
            if local >= n:
                raise ValueError(f"LOCAL_RANK={local} but only {n} CUDA device(s) are visible: start torchrun with "
                                 f"--nproc-per-node {n} or fewer (one process per GPU)")
            torch.cuda.set_device(local)
            # NCCL's own choice for these 400 MB gradients was its low-latency protocol (RING_LL, 3.2 ms per tensor on
            # 2 H200s: 1.68x weak scaling); Simple gave 1.78x (docs/benchmarks.md). A user's setting wins.
            os.environ.setdefault("NCCL_PROTO", "Simple")
        started = not dist.is_initialized()
        if started:
            timeout = timeout_s if timeout_s is not None else float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
            extra = {"device_id": torch.device("cuda", local)} if device_type == "cuda" else {}
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timedelta(seconds=timeout),
                                    **extra)
        parallel = cls(rank, world, local, device_type)
        parallel.owns_group = started
        return parallel

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.device_type == "cuda" else torch.device("cpu")

    @property
    def capturable(self) -> bool:
        """Whether the trainer may replay its step as a CUDA graph: with a world of one (no collectives). With more
        ranks the step runs eagerly: on 2 H200s capturing the NCCL collectives too gained 2 % and made the process
        group hang at teardown."""
        return self.world_size == 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes every file (checkpoints, the SAE, metrics); the others only train."""
        return self.rank == 0

    def local_batch_size(self, batch_size: int) -> int:
        """This rank's share of a global batch; a clear error when the world size does not divide it."""
        w = self.world_size
        if batch_size % w:
            lower, upper = batch_size - batch_size % w, batch_size + w - batch_size % w
            choices = f"{lower} or {upper}" if lower else f"{upper}"
            raise ValueError(f"batch_size={batch_size} does not divide by the world size {w} (torchrun "
                             f"--nproc-per-node): every rank trains on an equal slice of each global batch; use a "
                             f"multiple of {w}, e.g. {choices}")
        return batch_size // w

    def rank_slice(self, batch_size: int) -> slice:
        b = self.local_batch_size(batch_size)
        return slice(self.rank * b, (self.rank + 1) * b)

    # -- collectives
    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(**({"device_ids": [self.local_rank]} if self.backend == "nccl" else {}))

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank, bit for bit."""
        if self.world_size > 1:
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src=0)

    def all_gather_rows(self, x: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
        """Every rank's rows, concatenated in rank order; `counts` gives each rank's row count when they differ."""
        if self.world_size == 1:
            return x
        counts = counts or [len(x)] * self.world_size
        if len(x) != counts[self.rank]:
            raise RuntimeError(f"rank {self.rank} has {len(x)} rows to gather, expected {counts[self.rank]}")
        pad = max(counts)
        mine = torch.zeros(pad, *x.shape[1:], dtype=x.dtype, device=x.device)
        mine[: len(x)] = x
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine)
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    @contextmanager
    def averaging_gradients(self, params: Iterable[torch.nn.Parameter]):
        """Within the block, each gradient is all-reduced (averaged) as soon as backward has finished it; on leaving
        the block every reduction has completed (on CUDA: is ordered before any later work on the stream)."""
        if self.world_size == 1:
            yield
            return
        works, w, nccl = [], self.world_size, self.backend == "nccl"

        def reduce(p: torch.Tensor) -> None:
            g = p.grad if self.reduce_dtype in (None, p.grad.dtype) else p.grad.to(self.reduce_dtype)
            if nccl:
                works.append((dist.all_reduce(g, op=dist.ReduceOp.AVG, async_op=True), p.grad, g))
            else:  # gloo has no AVG
                g.div_(w)
                works.append((dist.all_reduce(g, op=dist.ReduceOp.SUM, async_op=True), p.grad, g))

        handles = [p.register_post_accumulate_grad_hook(reduce) for p in params if p.requires_grad]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        for work, grad, g in works:
            work.wait()
            if g is not grad:
                grad.copy_(g)

    def reduce_step_stats(self, sae: torch.nn.Module, parts: dict[str, torch.Tensor], fired: torch.Tensor,
                          target: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """One all-reduce for the step's bookkeeping: (global token-weighted metrics, global fired mask, global
        variance of the target). Also averages the SYNCED_BUFFERS (BatchTopK's threshold) over ranks."""
        n_local = target.shape[0]
        keys = sorted(parts)
        t = target.detach().float()
        mean_local = t.mean(0)
        m2_local = ((t - mean_local) ** 2).sum()  # centred per rank, combined below (Chan et al.): no cancellation
        synced = [b for name, b in sae.named_buffers() if name in SYNCED_BUFFERS]
        f64 = dict(dtype=torch.float64, device=t.device)
        n_tensor = torch.full((), float(n_local), **f64)  # (a fill, not a copy from the host: CUDA-graph safe)
        sums = torch.stack([parts[k].detach().double() * n_local for k in keys]
                           + [m2_local.double(), n_local * mean_local.double().pow(2).sum(), n_tensor])
        flat = torch.cat([fired.double(), mean_local.double() * n_local, sums,
                          *[b.detach().double().reshape(-1) for b in synced]])
        if self.world_size > 1:
            dist.all_reduce(flat)
        d_sae, d, k = fired.numel(), t.shape[1], len(keys)
        fired_all, sum_t, rest = flat[:d_sae], flat[d_sae:d_sae + d], flat[d_sae + d:]
        m2, between, n = rest[k], rest[k + 1], rest[k + 2]
        out = {key: (rest[i] / n).to(parts[key].dtype) for i, key in enumerate(keys)}
        var = ((m2 + between - sum_t.pow(2).sum() / n) / n).float()  # Σ M2_r + Σ n_r‖m_r‖² − n‖m‖², over n
        offset = k + 3
        for b in synced:
            b.copy_((rest[offset:offset + b.numel()] / self.world_size).view_as(b))
            offset += b.numel()
        return out, fired_all > 0, var

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def close_after_error(self) -> None:
        """On gloo, leave the group so the error, not an abort in its teardown, ends the process. On NCCL, leave it to
        the process's exit (the communicator is aborted then): a peer may be gone mid-collective."""
        if self.backend == "gloo":
            self.close()


def data_parallel_for_run(out_dir: str | os.PathLike, resume: bool, device_type: str) -> DataParallel | None:
    """How `train_run` trains: under torchrun, data-parallel; resuming a run that was data-parallel, a world of one
    (its checkpoints hold the data-parallel store); otherwise None, the plain single-process path."""
    if launched_by_torchrun():
        return DataParallel.from_torchrun(device_type)
    if resume and (Path(out_dir) / MARKER).is_file():
        return DataParallel(device_type=device_type)
    return None


def mark_data_parallel(out_dir: str | os.PathLike, parallel: DataParallel) -> None:
    from .atomic import write_json_atomic

    path = Path(out_dir) / MARKER
    if not path.is_file():
        write_json_atomic(path, {"started_with_world_size": parallel.world_size})


class FailureReport:
    """A trainer callback: when training fails on this rank, say so on stderr with the rank and the last checkpoint."""

    def __init__(self, parallel: DataParallel, out_dir: str | os.PathLike | None):
        self.parallel, self.out_dir = parallel, out_dir

    def __call__(self, ev) -> None:
        if ev.kind != "failed":
            return
        from .train import latest_checkpoint

        last = latest_checkpoint(self.out_dir) if self.out_dir else None
        p = self.parallel
        print(f"sae-widgets train: rank {p.rank} of {p.world_size} failed at step {ev.step} (tokens {ev.tokens:,}): "
              f"{type(ev.error).__name__}: {ev.error}\n  the last complete checkpoint is {last or 'none'}"
              f"{'; continue with --resume ' + str(self.out_dir) if last else ''}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- data: slices
class RankSlice:
    """This rank's rows of each global batch of a store that every rank runs in lockstep (same seed, same rows)."""

    def __init__(self, store, parallel: DataParallel):
        self.store, self.parallel = store, parallel
        self.batch_size = store.batch_size  # global: the trainer counts tokens per step over all ranks
        self._slice = parallel.rank_slice(store.batch_size)

    def next_batch(self):
        b = self.store.next_batch()
        return tuple(t[self._slice] for t in b) if isinstance(b, tuple) else b[self._slice]

    def state_dict(self) -> dict[str, Any]:
        return self.store.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.store.load_state_dict(state)

    def __getattr__(self, name: str):  # d_in, d_out, hooks, rows, ... of the global store
        if name == "store":
            raise AttributeError(name)
        return getattr(self.store, name)


class ShardedModelRows(ModelRows):
    """The model's row stream, with each model batch's windows split over the ranks and the rows all-gathered: every
    rank gets the very rows one process would, for 1/N of the model's compute.

    Every position's row is gathered, then the row filter runs on the whole model batch on every rank alike: its
    massive-norm median is the batch's, as in one process, and every rank keeps the same rows."""

    def __init__(self, parallel: DataParallel, *args, **kwargs):
        self.parallel = parallel
        super().__init__(*args, **kwargs)

    def next_rows(self) -> torch.Tensor:
        windows = [next(self._windows) for _ in range(self.model_batch_size)]
        self.windows_done += len(windows)
        w, r = self.parallel.world_size, self.parallel.rank
        counts = [len(c) for c in np.array_split(np.arange(len(windows)), w)]
        start = sum(counts[:r])
        mine = windows[start:start + counts[r]]
        width = sum(self.d_hooks)
        if mine:
            acts = torch.cat(self.run(torch.tensor(mine, dtype=torch.long, device=self.model.cfg.device)), dim=-1)
            acts = acts.to(self.dtype).reshape(-1, width)
        else:  # more ranks than windows in a model batch
            acts = torch.empty(0, width, dtype=self.dtype, device=self.model.cfg.device)
        acts = self.parallel.all_gather_rows(acts, [c * self.n_ctx for c in counts])
        tokens = torch.tensor(windows, dtype=torch.long, device=self.model.cfg.device)
        return self.select(tokens, acts.reshape(len(windows), self.n_ctx, width))


# ----------------------------------------------------------------------------------------------- data: disk cache
_NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # bf16: raw bits


def memory_map_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as memory maps: nothing is read until rows are indexed (copy-on-write
    mapping, so the file is never modified)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _NUMPY_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {meta['dtype']}; activation caches hold "
                             f"{sorted(_NUMPY_DTYPES)}")
        start, _ = meta["data_offsets"]
        arr = np.memmap(path, dtype=_NUMPY_DTYPES[meta["dtype"]], mode="c", offset=8 + n + start,
                        shape=tuple(meta["shape"]))
        t = torch.from_numpy(arr)
        out[name] = t.view(torch.bfloat16) if meta["dtype"] == "BF16" else t
    return out


class MappedCache:
    """Rows of a disk cache by global row number, read through memory maps (only the rows asked for are read)."""

    def __init__(self, cache_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, pin_memory: bool = False):
        self.info = CachedRows(cache_dir, dtype=dtype, device="cpu")  # checks the manifest and that it is complete
        self.dir, self.dtype, self.pin_memory = Path(cache_dir), dtype, pin_memory
        self.hooks, self.d_hooks = list(self.info.hooks), list(self.info.d_hooks)
        self.shard_rows = [s["n_rows"] for s in self.info.manifest["shards"]]
        self.starts = torch.tensor([0, *np.cumsum(self.shard_rows).tolist()], dtype=torch.long)
        self.n_rows = int(self.starts[-1])
        self._maps: dict[int, list[torch.Tensor]] = {}

    def describe(self) -> dict[str, Any]:
        return self.info.describe()

    def _shard(self, i: int) -> list[torch.Tensor]:
        if i not in self._maps:
            maps = memory_map_safetensors(self.dir / self.info.manifest["shards"][i]["file"])
            self._maps[i] = [maps[h] for h in self.hooks]
        return self._maps[i]

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """[len(rows), sum(d_hooks)] in `dtype`, hooks side by side (as the cache store serves them)."""
        out = torch.empty(len(rows), sum(self.d_hooks), dtype=self.dtype, pin_memory=self.pin_memory)
        if not len(rows):
            return out
        if int(rows.min()) < 0 or int(rows.max()) >= self.n_rows:
            raise IndexError(f"row numbers must lie in [0, {self.n_rows}) for cache {self.dir}")
        shard = torch.searchsorted(self.starts, rows, right=True) - 1
        for s in shard.unique().tolist():
            where = (shard == s).nonzero().squeeze(1)
            local, order = (rows[where] - self.starts[s]).sort()  # ascending: forward reads through the map
            where = where[order]
            col = 0
            for src, width in zip(self._shard(s), self.d_hooks):
                out[where, col:col + width] = src.index_select(0, local).to(self.dtype)
                col += width
        return out


class CacheRowNumbers:
    """The row stream of `CachedRows` as row *numbers* (one int64 column): shard by shard, looping at the end."""

    hooks, d_hooks, stop_at_layer = ["row_number"], [1], None

    def __init__(self, shard_rows: list[int]):
        self.starts = [0, *np.cumsum(shard_rows).tolist()]
        self.shard, self.epoch = 0, 0

    def next_rows(self) -> torch.Tensor:
        if self.shard == len(self.starts) - 1:
            self.shard, self.epoch = 0, self.epoch + 1
        a, b = self.starts[self.shard], self.starts[self.shard + 1]
        self.shard += 1
        return torch.arange(a, b, dtype=torch.long)[:, None]

    def state(self) -> dict[str, int]:
        return {"shard": self.shard, "epoch": self.epoch}

    def load_state(self, state: dict[str, int]) -> None:
        self.shard, self.epoch = state["shard"], state["epoch"]


class RankShardedCache(HookWidths):
    """This rank's slice of every global batch that `ActivationStore.from_cache` (same batch size, buffer and seed)
    would serve, read from the memory-mapped shards.

    The shuffle is the ActivationStore's own buffer logic run on row numbers, identical on every rank and for any world
    size, so its state (saved in checkpoints) is in global rows. The next batch's rows are read in a background
    thread while the current one trains.
    """

    STATE_KEY = "data_parallel_cache"

    def __init__(self, cache_dir: str | os.PathLike, parallel: DataParallel, *, batch_size: int = 4096,
                 buffer_size: int = 65536, seed: int = 0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, prefetch: bool = True):
        self.parallel, self.device = parallel, torch.device(device)
        self._slice = parallel.rank_slice(batch_size)
        self.rows = MappedCache(cache_dir, dtype, pin_memory=self.device.type == "cuda")
        self.order = ActivationStore(None, "row_number", rows=CacheRowNumbers(self.rows.shard_rows),
                                     batch_size=batch_size, buffer_size=buffer_size, seed=seed, device="cpu",
                                     dtype=torch.long, show_progress=False)
        self.batch_size, self.buffer_size, self.seed = batch_size, buffer_size, seed
        self.hooks, self.d_hooks = self.rows.hooks, self.rows.d_hooks
        self.paired = len(self.hooks) == 2
        on_cuda = self.device.type == "cuda"  # the reader thread pins memory on this rank's GPU, not on cuda:0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-prefetch",
                                        initializer=torch.cuda.set_device if on_cuda else None,
                                        initargs=(self.device,) if on_cuda else ()) if prefetch else None
        self._ahead: tuple[torch.Tensor, Future | None] | None = None  # (global row numbers, read in flight)

    def _read_ahead(self, global_rows: torch.Tensor) -> None:
        mine = global_rows[self._slice]
        fut = self._pool.submit(self.rows.gather, mine) if self._pool is not None else None
        self._ahead = (global_rows, fut)

    def next_batch(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self._ahead is None:
            self._read_ahead(self.order.next_batch()[:, 0])
        global_rows, fut = self._ahead
        rows = fut.result() if fut is not None else self.rows.gather(global_rows[self._slice])
        self._read_ahead(self.order.next_batch()[:, 0])
        rows = rows.to(self.device, non_blocking=rows.is_pinned())
        return (rows[:, : self.d_hooks[0]], rows[:, self.d_hooks[0]:]) if self.paired else rows

    def state_dict(self) -> dict[str, Any]:
        return {self.STATE_KEY: self.order.state_dict(), "ahead": self._ahead[0] if self._ahead else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.STATE_KEY not in state:
            raise ValueError("this checkpoint was written by a single-process run reading the cache (its store state "
                             "holds rows, not row numbers); resume it without torchrun: sae-widgets train --resume DIR")
        self.order.load_state_dict(state[self.STATE_KEY])
        self._ahead = None
        if state.get("ahead") is not None:
            self._read_ahead(state["ahead"])


def data_parallel_store(cfg, model, parallel: DataParallel, device: torch.device, split: str | None = None):
    """The training store of a RunConfig for this rank: same global batches as `runs.build_store` would give."""
    if cfg.cache:
        return RankShardedCache(cfg.cache, parallel, batch_size=cfg.batch_size, buffer_size=cfg.buffer_size,
                                seed=cfg.seed, device=device)
    hooks = [cfg.hook] if cfg.out_hook is None else [cfg.hook, cfg.out_hook]
    parallel.local_batch_size(cfg.batch_size)  # fail before the model runs
    rows = ShardedModelRows(parallel, model, hooks, cfg.token_source(split), n_ctx=cfg.n_ctx, keep_bos_rows=False,
                            model_batch_size=cfg.model_batch_size, dtype=torch.float32, **cfg.row_options())
    store = ActivationStore(model, hooks[0] if len(hooks) == 1 else hooks, batch_size=cfg.batch_size,
                            model_batch_size=cfg.model_batch_size, buffer_size=cfg.buffer_size, seed=cfg.seed,
                            device=device, show_progress=cfg.progress and parallel.is_writer, rows=rows)
    return RankSlice(store, parallel)
