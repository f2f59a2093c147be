"""Train an SAE on a batch stream (the activation store, a disk cache, or synthetic data).

    trainer = Trainer(sae, store, TrainConfig(total_tokens=2_000_000, out_dir="runs/l1"))
    trainer.run()            # progress bar, checkpoints, final SAE in runs/l1/sae, metrics in runs/l1/metrics.json

One loop, one event API: every step, evaluation, checkpoint, finish and failure is a `TrainEvent` passed to
the callbacks; the progress bar, the CLI and the training-monitor widget are all such callbacks.
Checkpoints are written atomically and hold everything that moves (SAE, Adam, schedule, RNG, dead-latent
counters, the store's buffer and position), so a run killed and resumed ends bit-identical on CPU.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import (check_digest_field, json_digest, load_checked_safetensors, remove_temp_files, replace_dir_atomic,
                     save_safetensors_atomic, write_json_atomic)
from .config_io import read_json
from .faults import fault_point
from .persistence import save_sae
from .sae import SAE, TRITON_ARCHS
from .step_graph import StepGraph, dead_capacity, padded_dead_latents

CHECKPOINTS, LATEST = "checkpoints", "latest.json"
STEP_DIR = re.compile(r"step_\d{8}")


@dataclass
class TrainConfig:
    total_tokens: int
    lr: float = 1e-3
    lr_warmup_steps: int = 50
    lr_decay: str = "cosine"             # over the last `lr_decay_fraction` of steps: cosine | linear | none
    lr_decay_fraction: float = 0.2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    dead_window_tokens: int = 1_000_000  # a latent is dead if it has not fired in this many tokens
    init_tokens: int = 16384             # sample for the normalisation scale and the b_dec geometric median
    b_dec_init: str = "geometric_median"
    checkpoint_every: int = 0            # steps; 0 = only at the end
    checkpoint_minutes: float = 10.0     # also after this much wall time since the last one (0 = never by time)
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    autocast_bf16: bool = False          # CUDA only
    cuda_graph: bool = True              # CUDA + the Triton kernels: replay each step as one CUDA graph (False: debug)
    out_dir: str | None = None
    progress: bool = True

    def __post_init__(self):
        if self.total_tokens < 1:
            raise ValueError(f"total_tokens={self.total_tokens} must be >= 1")
        if self.lr_decay not in ("cosine", "linear", "none"):
            raise ValueError(f"lr_decay={self.lr_decay!r} is not one of ('cosine', 'linear', 'none')")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.checkpoint_every < 0 or not self.checkpoint_minutes >= 0 or self.keep_checkpoints < 1:
            raise ValueError(f"checkpoint_every={self.checkpoint_every} and checkpoint_minutes="
                             f"{self.checkpoint_minutes} must be >= 0, keep_checkpoints={self.keep_checkpoints} >= 1")
        self.adam_betas = tuple(self.adam_betas)


@dataclass
class TrainEvent:
    kind: str                      # "step" | "eval" | "checkpoint" | "finished" | "failed"
    step: int
    tokens: int
    total_tokens: int
    metrics: dict[str, float] = field(default_factory=dict)
    path: str | None = None
    error: BaseException | None = None


class TrainingDiverged(RuntimeError):
    """The loss or the parameters stopped being finite."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, I/O error); the message names the last good one."""


class ProgressBar:
    """tqdm progress (terminal and Jupyter alike) driven by the events, in tokens."""

    def __init__(self):
        self.bar = None

    def __call__(self, ev: TrainEvent) -> None:
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(total=ev.total_tokens, initial=ev.tokens, unit="tok", unit_scale=True, desc="training SAE")
        if ev.kind == "step":
            self.bar.update(ev.tokens - self.bar.n)
            m = ev.metrics
            self.bar.set_postfix(loss=f"{m['loss']:.4g}", l0=f"{m['l0']:.1f}", ev=f"{m['explained_variance']:.3f}",
                                 dead=f"{m['dead_fraction']:.2f}", refresh=False)
        elif ev.kind in ("finished", "failed"):
            self.bar.update(ev.tokens - self.bar.n)
            self.bar.close()


# ----------------------------------------------------------------------------------------------- state <-> files
def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts, lists, tensors, numbers) into safetensors-ready tensors and a JSON skeleton."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj.detach().clone().contiguous()}, {"__tensor__": prefix}
    if isinstance(obj, dict):
        tensors, tree = {}, {}
        for k, v in obj.items():
            t, tree[str(k)] = flatten_state(v, f"{prefix}.{k}" if prefix else str(k))
            tensors.update(t)
        return tensors, {"__dict__": tree, "__int_keys__": all(isinstance(k, int) for k in obj) and bool(obj)}
    if isinstance(obj, (list, tuple)):
        tensors, items = {}, []
        for i, v in enumerate(obj):
            t, node = flatten_state(v, f"{prefix}.{i}")
            tensors.update(t)
            items.append(node)
        return tensors, {"__list__": items, "__tuple__": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {}, obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix!r}: only tensors, numbers, strings, lists, dicts")


def unflatten_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict) and "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if isinstance(tree, dict) and "__dict__" in tree:
        d = {k: unflatten_state(v, tensors) for k, v in tree["__dict__"].items()}
        return {int(k): v for k, v in d.items()} if tree["__int_keys__"] else d
    if isinstance(tree, dict) and "__list__" in tree:
        items = [unflatten_state(v, tensors) for v in tree["__list__"]]
        return tuple(items) if tree["__tuple__"] else items
    return tree


def checkpoint_dirs(out_dir: str | os.PathLike) -> list[Path]:
    """The run's complete checkpoint folders, newest first. Folders are moved into place whole, so each one listed
    was fully written; `latest.json` is only a note for people (a kill between the two leaves it one behind)."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name)), reverse=True)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(out_dir)
    return dirs[0] if dirs else None


def read_checkpoint(ckpt: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state.json's content, the nested state) of one checkpoint folder, every file checked: a damaged or
    hand-edited file is a `ValueError` naming it."""
    ckpt = Path(ckpt)
    for name in ("state.json", "state.safetensors"):
        if not (ckpt / name).is_file():
            raise ValueError(f"{ckpt / name} is missing: not a complete checkpoint")
    meta = read_json(ckpt / "state.json")
    if not isinstance(meta, dict) or not {"tree", "sae_config", "history"} <= set(meta):
        raise ValueError(f"{ckpt / 'state.json'} is not a checkpoint's state (tree, sae_config, history)")
    # checkpoints from before digests have neither; a misnamed key is damage, not such an old checkpoint
    digested = check_digest_field(ckpt / "state.json", meta.keys(), "sha256")
    if digested and json_digest({k: v for k, v in meta.items() if k != "sha256"}) != meta["sha256"]:
        raise ValueError(f"{ckpt / 'state.json'} is corrupt: it does not match the digest written with it")
    tensors = load_checked_safetensors(ckpt / "state.safetensors", require_digest=digested)
    try:
        state = unflatten_state(meta["tree"], tensors)
        int(state["step"]), int(state["tokens"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{ckpt / 'state.json'} does not describe {ckpt / 'state.safetensors'}: {e!r}") from None
    return meta, state


def remove_orphans(out_dir: str | os.PathLike) -> list[Path]:
    """Delete what an interrupted write leaves in a run folder: temp files, staging and swapped-out folders."""
    out = Path(out_dir)
    gone = [*remove_temp_files(out), *remove_temp_files(out / "sae"), *remove_temp_files(out / CHECKPOINTS)]
    root = out / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and (p.name.endswith(".staging") or p.name.endswith(".old")):
                shutil.rmtree(p)
                gone.append(p)
    return gone


# ----------------------------------------------------------------------------------------------- trainer
class Trainer:
    """The training loop. `run()` trains until `total_tokens` (or `request_stop()`), resuming if asked."""

    def __init__(self, sae: SAE, store, cfg: TrainConfig, callbacks: list[Callable[[TrainEvent], None]] | None = None,
                 metadata: dict[str, Any] | None = None, parallel=None):
        self.sae, self.store, self.cfg = sae, store, cfg
        # data-parallel (sae_widgets.distributed.DataParallel): the store serves this rank's slice of each global batch
        # and `store.batch_size` is the global batch; None is the single-process path
        self.parallel = parallel
        self.callbacks = list(callbacks or [])
        if cfg.progress:
            self.callbacks.append(ProgressBar())
        self.metadata = metadata or {}
        self.device = next(sae.parameters()).device
        self.batch_tokens = store.batch_size
        self.total_steps = max(1, math.ceil(cfg.total_tokens / self.batch_tokens))
        fused = self.device.type == "cuda"  # fused Adam: a device-side lr, skip (found_inf) and clip (grad_scale)
        self.opt = torch.optim.Adam(sae.parameters(), lr=self._lr_value(cfg.lr), betas=cfg.adam_betas,
                                    eps=cfg.adam_eps, fused=fused, capturable=fused)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.lr_factor)
        self.step = 0
        self.tokens = 0
        self.tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=self.device)
        self.initialized = False
        self.history: list[dict[str, float]] = []
        self._stop = False
        self._pending_check = None  # (finite, loss, grad norm, step, tokens) of the last step, checked at the next sync
        self._last_checkpoint: Path | None = None
        self._checkpoint_clock = time.monotonic()
        self.out_dir = Path(cfg.out_dir) if cfg.out_dir else None
        self._dead_capacity = 0
        self._graph = StepGraph(self._device_step) if self._use_graph() else None

    # -- schedule
    def _lr_value(self, lr: float) -> float | torch.Tensor:
        """The optimizer's lr: a device tensor under fused Adam, so a captured step reads the scheduled value."""
        return torch.tensor(float(lr), device=self.device) if self.device.type == "cuda" else float(lr)

    def lr_factor(self, step: int) -> float:
        cfg, n = self.cfg, self.total_steps
        if step < cfg.lr_warmup_steps:
            return (step + 1) / cfg.lr_warmup_steps
        decay_start = int(n * (1 - cfg.lr_decay_fraction))
        if cfg.lr_decay == "none" or step < decay_start:
            return 1.0
        frac = (step - decay_start) / max(1, n - decay_start)
        return 0.5 * (1 + math.cos(math.pi * frac)) if cfg.lr_decay == "cosine" else 1.0 - frac

    def request_stop(self) -> None:
        """Ask the loop to stop after the current step (it writes a checkpoint first). Thread-safe enough: a flag."""
        self._stop = True

    def _emit(self, ev: TrainEvent) -> None:
        for cb in self.callbacks:
            cb(ev)

    def _event(self, kind: str, **kw) -> TrainEvent:
        return TrainEvent(kind=kind, step=self.step, tokens=self.tokens, total_tokens=self.cfg.total_tokens, **kw)

    # -- data
    def _next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = self.store.next_batch()
        x, y = b if isinstance(b, tuple) else (b, None)
        return x.to(self.device), (y.to(self.device) if y is not None else None)

    def _initialize(self) -> None:
        xs, ys, n = [], [], 0
        while n < self.cfg.init_tokens:
            x, y = self._next()
            if self.parallel is not None:  # data-parallel: every rank initialises from the whole global batches
                x, y = self.parallel.all_gather_rows(x), (self.parallel.all_gather_rows(y) if y is not None else None)
            xs.append(x)
            ys.append(y)
            n += len(x)
        y_all = torch.cat(ys) if ys[0] is not None else None
        self.sae.initialize(torch.cat(xs), y_all, b_dec=self.cfg.b_dec_init)
        if self.parallel is not None:
            self.parallel.broadcast_module(self.sae)  # rank 0's weights everywhere, bit for bit
        self.initialized = True

    # -- one step
    def _use_graph(self) -> bool:
        cfg, sae = self.cfg, self.sae
        return (cfg.cuda_graph and self.device.type == "cuda" and sae.cfg.arch in TRITON_ARCHS
                and sae.cfg.backend != "torch" and (self.parallel is None or self.parallel.capturable))

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimiser step; returns the step's metrics as tensors (converted only when logged).

        The step waits for the GPU once, at its start, to count the dead latents (the aux-k loss's size). The rest
        (`_device_step`) never waits, so on CUDA it is replayed as one CUDA graph. A non-finite loss or gradient
        never reaches the weights: on CUDA fused Adam skips that update on the device and the next sync raises
        TrainingDiverged; elsewhere the check runs before the update.
        """
        n_dead = int((self.tokens_since_fired >= self.cfg.dead_window_tokens).sum())
        self.raise_if_diverged()
        x, y = self._next()
        if self._graph is not None:
            self._dead_capacity = dead_capacity(n_dead, self.sae.cfg.d_sae, self._dead_capacity)
            metrics = self._graph((x, y), (self._dead_capacity,))
        else:
            metrics = self._device_step(x, y, n_dead)
        finite = metrics.pop("_finite")
        self._pending_check = (finite, metrics["loss"], metrics["grad_norm"], self.step, self.tokens)
        self.sched.step()
        self.step += 1
        self.tokens += len(x) * (self.parallel.world_size if self.parallel is not None else 1)  # global tokens
        return metrics

    def _device_step(self, x: torch.Tensor, y: torch.Tensor | None, n_dead: int) -> dict[str, torch.Tensor]:
        """Loss, backward, clip, Adam and the dead-latent counters, with no host sync (on CUDA); 0-dim metrics out.

        `n_dead` is the dead-latent list's size (padded with −1 when it is a graph's fixed capacity).
        """
        cfg, target = self.cfg, (y if y is not None else x)
        dead = padded_dead_latents(self.tokens_since_fired, cfg.dead_window_tokens, n_dead)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.autocast_bf16 and self.device.type == "cuda",
                            cache_enabled=False):
            loss, parts = self.sae.training_loss(x, y, step=self.step, dead_latents=dead)
        self.opt.zero_grad(set_to_none=True)
        fired, var, n = parts.pop("_fired"), None, len(x)
        if self.parallel is None:
            loss.backward()
        else:  # data-parallel: gradients averaged over ranks during backward; loss, metrics, fired mask made global
            with self.parallel.averaging_gradients(self.sae.parameters()):
                loss.backward()
            target_n = target.float() * self.sae.out_scale
            parts, fired, var = self.parallel.reduce_step_stats(self.sae, parts, fired, target_n)
            loss, n = parts["loss"], n * self.parallel.world_size  # n: tokens in the global batch
        self.sae.remove_parallel_grad()
        params = [p for p in self.sae.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        finite = torch.isfinite(loss + grad_norm)
        if self.opt.defaults.get("fused"):  # clip and skip inside fused Adam's one kernel: no extra pass, no sync
            self.opt.grad_scale = ((grad_norm + 1e-6) / cfg.grad_clip).clamp_min(1.0)
            self.opt.found_inf = (~finite).float()
        else:
            torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, grad_norm)
            if not bool(finite):
                self._pending_check = (finite, loss.detach(), grad_norm.detach(), self.step, self.tokens)
                self.raise_if_diverged()
        self.opt.step()
        self.sae.normalize_decoder()
        self.tokens_since_fired += n
        self.tokens_since_fired.masked_fill_(fired, 0)
        if var is None:  # Σ_d of the per-dimension variance, in one fused pass (scaled after)
            var = target.float().var(0, correction=0).sum() * self.sae.out_scale ** 2
        metrics = dict(parts)
        full = parts.get("mse_full", parts["mse"])  # matryoshka's "mse" sums its prefix losses
        metrics["explained_variance"] = 1.0 - full / var.clamp_min(1e-12)
        metrics["dead_fraction"] = (self.tokens_since_fired >= cfg.dead_window_tokens).float().mean()
        metrics["grad_norm"] = grad_norm.detach()
        metrics["_finite"] = finite
        return metrics

    def raise_if_diverged(self) -> None:
        """Raise TrainingDiverged if the last step's loss or gradient norm was not finite (its update was not applied)."""
        if self._pending_check is None:
            return
        finite, loss, grad_norm, step, tokens = self._pending_check
        self._pending_check = None
        if not bool(finite):
            what = f"loss became {loss.item()}" if not torch.isfinite(loss) else f"gradient norm became {grad_norm.item()}"
            raise TrainingDiverged(f"{what} at step {step} (tokens {tokens:,}); "
                                   f"last good checkpoint: {self._last_checkpoint or 'none written'}")

    # -- the loop
    def run(self, resume: bool = False) -> SAE:
        if self.out_dir is not None and (self.parallel is None or self.parallel.is_writer):
            remove_orphans(self.out_dir)
        if resume:
            self.load_checkpoint()
            print(f"[sae_widgets] resuming from step {self.step} ({self.tokens:,} tokens) of "
                  f"{self.total_steps} ({self.cfg.total_tokens:,} tokens): {self._last_checkpoint}", file=sys.stderr)
        if not resume:
            torch.manual_seed(self.cfg.seed)
        try:
            if not self.initialized:
                self._initialize()
            if self.out_dir is not None:
                self.check_free_space()
            self.sae.train()
            t0, tok0 = time.perf_counter(), self.tokens
            self._checkpoint_clock = time.monotonic()
            while self.tokens < self.cfg.total_tokens and not self._stop:
                fault_point("train.step")
                m = self.train_step()
                if self.step % self.cfg.log_every == 0 or self.tokens >= self.cfg.total_tokens:
                    m = {k: float(v) for k, v in m.items()}
                    m["lr"] = float(self.sched.get_last_lr()[0])
                    m["tokens_per_s"] = (self.tokens - tok0) / max(time.perf_counter() - t0, 1e-9)
                    self.history.append({"step": self.step, "tokens": self.tokens, **m})
                    self._emit(self._event("step", metrics=m))
                if self._checkpoint_due() and self.tokens < self.cfg.total_tokens:
                    self.save_checkpoint()
        except BaseException as e:  # KeyboardInterrupt too: report, keep the last good checkpoint, re-raise
            self._emit(self._event("failed", error=e))
            raise
        self.raise_if_diverged()
        self.sae.eval()
        if self.out_dir is not None:
            self.save_checkpoint()
            if self.parallel is None or self.parallel.is_writer:
                save_sae(self.sae, self.out_dir / "sae", training=self.training_record())
        self._emit(self._event("finished", path=str(self.out_dir / "sae") if self.out_dir else None,
                               metrics=self.history[-1] if self.history else {}))
        return self.sae

    def training_record(self) -> dict[str, Any]:
        return {"train_config": asdict(self.cfg), "steps": self.step, "tokens": self.tokens,
                "final": self.history[-1] if self.history else {}, **self.metadata}

    # -- checkpoints
    def _checkpoint_due(self) -> bool:
        """Every `checkpoint_every` steps, and after `checkpoint_minutes` of wall time (so a short run is safe too)."""
        cfg = self.cfg
        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
            return True
        return bool(cfg.checkpoint_minutes) and time.monotonic() - self._checkpoint_clock >= 60 * cfg.checkpoint_minutes

    def checkpoint_bytes(self) -> int:
        """The size of one checkpoint of this run (its safetensors file; the JSON beside it is small)."""
        def size(obj: Any) -> int:
            if isinstance(obj, torch.Tensor):
                return obj.numel() * obj.element_size()
            items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
            return sum(size(v) for v in items)

        return size(self.state())

    def check_free_space(self) -> None:
        """Before the first write: the run keeps `keep_checkpoints` checkpoints and writes one more before it drops
        the oldest, plus the final SAE; say now, not at the first checkpoint, if the disk cannot hold that."""
        if self.parallel is not None and not self.parallel.is_writer:
            return
        one = self.checkpoint_bytes()
        need = (self.cfg.keep_checkpoints + 1) * one + one // 2
        self.out_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.out_dir).free
        if free < need:
            raise CheckpointWriteError(
                28, f"{self.out_dir} has {free / 2**20:,.0f} MiB free, but this run's checkpoints take "
                    f"{one / 2**20:,.0f} MiB each (the activation buffer is most of it) and it keeps "
                    f"{self.cfg.keep_checkpoints} plus the one being written: it needs {need / 2**20:,.0f} MiB. Free "
                    f"space, choose another folder, or lower the buffer size (--buffer-size)")

    def state(self) -> dict[str, Any]:
        st = {
            "sae": self.sae.state_dict(), "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "rng": {"torch": torch.get_rng_state()}, "tokens_since_fired": self.tokens_since_fired,
            "store": self.store.state_dict(), "step": self.step, "tokens": self.tokens, "initialized": self.initialized,
        }
        if torch.cuda.is_available():
            st["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        return st

    def save_checkpoint(self) -> Path:
        self.raise_if_diverged()  # a checkpoint is only ever written from good weights
        if self.out_dir is None:
            raise ValueError("TrainConfig.out_dir is not set: nowhere to write checkpoints")
        root = self.out_dir / CHECKPOINTS
        name = f"step_{self.step:08d}"
        if self.parallel is None or self.parallel.is_writer:  # data-parallel: rank 0 writes, the others wait for it
            try:
                self._write_checkpoint(root, name)
            except OSError as e:
                shutil.rmtree(root / f".{name}.staging", ignore_errors=True)
                raise CheckpointWriteError(
                    e.errno, f"could not write checkpoint {root / name}: {e.strerror or e}; "
                             f"{self.last_good_checkpoint_line()}") from e
        if self.parallel is not None:
            self.parallel.barrier()
        self._last_checkpoint = root / name
        self._checkpoint_clock = time.monotonic()
        self._emit(self._event("checkpoint", path=str(root / name)))
        return root / name

    def _write_checkpoint(self, root: Path, name: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        staging = root / f".{name}.staging"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        tensors, tree = flatten_state(self.state())
        save_safetensors_atomic(staging / "state.safetensors", tensors)
        meta = {"tree": tree, "sae_config": self.sae.cfg.to_dict(), "train_config": asdict(self.cfg),
                "history": self.history}
        write_json_atomic(staging / "state.json", {**meta, "sha256": json_digest(meta)})
        fault_point("checkpoint.staged", staging)
        replace_dir_atomic(staging, root / name)
        fault_point("checkpoint.placed", root / name)
        write_json_atomic(root / LATEST, {"dir": name, "step": self.step, "tokens": self.tokens})
        for old in checkpoint_dirs(self.out_dir)[self.cfg.keep_checkpoints:]:
            fault_point("checkpoint.prune", old)
            shutil.rmtree(old)

    def last_good_checkpoint_line(self) -> str:
        """Which checkpoint a run can continue from, for error messages."""
        last = self._last_checkpoint or latest_checkpoint(self.out_dir)
        if last is None:
            return "no checkpoint was written yet, so a rerun starts from the beginning"
        return f"the last good checkpoint is {last}; free space, then resume from it"

    def load_checkpoint(self, path: str | os.PathLike | None = None) -> None:
        """Restore a checkpoint: `path`, or the run's newest one that reads cleanly (a damaged newer one is named in
        a warning and skipped, since an older one resumes to the same result)."""
        candidates = [Path(path)] if path else checkpoint_dirs(self.out_dir) if self.out_dir else []
        if not candidates:
            raise FileNotFoundError(f"no checkpoint to resume from in {self.out_dir}")
        problems = []
        for ckpt in candidates:
            try:
                meta, st = read_checkpoint(ckpt)
                break
            except ValueError as e:
                problems.append(str(e))
                if path is None:
                    warnings.warn(f"skipping damaged checkpoint {ckpt}: {e}", stacklevel=2)
        else:
            raise ValueError(f"no usable checkpoint in {self.out_dir or path}: {'; '.join(problems)}")
        now = self.sae.cfg.to_dict()
        if meta["sae_config"] != now:
            diff = {k: (v, now.get(k)) for k, v in meta["sae_config"].items() if now.get(k) != v}
            raise ValueError(f"checkpoint {ckpt} is for another SAE config (checkpoint, now): {diff}")
        self.sae.load_state_dict(st["sae"])
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        for g in self.opt.param_groups:  # a checkpoint from another device: the lr kind this optimizer needs
            g["lr"] = self._lr_value(g["lr"])
            if "initial_lr" in g:
                g["initial_lr"] = float(g["initial_lr"])
        self.sched.base_lrs = [float(lr) for lr in self.sched.base_lrs]
        self.sched._last_lr = [float(lr) for lr in self.sched._last_lr]
        torch.set_rng_state(st["rng"]["torch"])
        if "cuda" in st["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["rng"]["cuda"])
        self.tokens_since_fired = st["tokens_since_fired"].to(self.device)
        self.store.load_state_dict(st["store"])
        self.step, self.tokens, self.initialized = st["step"], st["tokens"], st["initialized"]
        self.history = meta["history"]
        self._last_checkpoint = ckpt
        if self._graph is not None:  # the capture reads the tensors just replaced
            self._graph.reset()
