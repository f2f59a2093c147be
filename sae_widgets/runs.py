"""A training run from one flat config: model + store + SAE + trainer, written to an output folder.

The CLI (`sae-widgets train`), the notebooks and the training monitor all start runs through `train_run`, so a
run is reproducible from its `run_config.json` alone and `--resume DIR` needs nothing else.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import write_json_atomic
from .config_io import read_json, strict_from_dict
from .sae import SAE, SAEConfig
from .train import Trainer, TrainConfig

RUN_CONFIG = "run_config.json"
SAE_DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class RunConfig:
    hook: str
    arch: str = "topk"
    d_sae: int = 4096
    k: int | None = 32
    tokens: int = 2_000_000
    out: str = "runs/sae"
    model: str | None = None           # None: the embedded default model
    out_hook: str | None = None        # set for a transcoder
    cache: str | None = None           # read activations from this disk cache instead of running the model
    split: str = "train"               # embedded corpus split
    n_ctx: int = 128
    batch_size: int = 4096
    buffer_size: int = 65536
    model_batch_size: int = 32
    lr: float = 1e-3
    lr_warmup_steps: int = 50
    dead_window_tokens: int = 1_000_000
    sparsity_coeff: float | None = None
    sparsity_warmup_steps: int = 0
    matryoshka_prefixes: list[int] | None = None
    normalize: bool = True
    checkpoint_every: int = 100
    eval_tokens: int = 65536
    seed: int = 0
    device: str | None = None
    # "auto": bf16 autocast on CUDA (fp32 master weights, as sparsify trains), fp32 on CPU; or "float32" / "bfloat16"
    sae_dtype: str = "auto"
    model_dtype: str = "float32"       # the language model's weights: float32, bfloat16 or float16
    progress: bool = True

    def __post_init__(self):
        if self.arch in ("relu", "jumprelu"):
            self.k = None
        if self.sae_dtype not in SAE_DTYPES:
            raise ValueError(f"sae_dtype={self.sae_dtype!r} is not one of {SAE_DTYPES}")
        from .models import model_dtype

        model_dtype(self.model_dtype)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return strict_from_dict(cls, d, "run")

    @classmethod
    def load(cls, path: str | os.PathLike) -> RunConfig:
        path = Path(path)
        if path.is_dir():
            path = path / RUN_CONFIG
        if not path.is_file():
            raise FileNotFoundError(f"no run config at {path}")
        d = read_json(path)
        d.setdefault("sae_dtype", "float32")  # runs from before this field trained in fp32, and resume in fp32
        return cls.from_dict(d)

    @property
    def torch_device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def sae_config(self, d_in: int, d_out: int, model_name: str) -> SAEConfig:
        extra = {"matryoshka_prefixes": self.matryoshka_prefixes} if self.matryoshka_prefixes else {}
        return SAEConfig(arch=self.arch, d_in=d_in, d_out=d_out, d_sae=self.d_sae, k=self.k, hook=self.hook,
                         out_hook=self.out_hook, model_name=model_name, normalize=self.normalize,
                         sparsity_coeff=self.sparsity_coeff, sparsity_warmup_steps=self.sparsity_warmup_steps, **extra)

    def train_config(self) -> TrainConfig:
        return TrainConfig(total_tokens=self.tokens, lr=self.lr, lr_warmup_steps=self.lr_warmup_steps,
                           dead_window_tokens=self.dead_window_tokens, checkpoint_every=self.checkpoint_every,
                           seed=self.seed, out_dir=self.out, progress=self.progress, autocast_bf16=self.sae_bf16,
                           init_tokens=min(16384, max(self.batch_size, self.tokens // 8)))

    @property
    def sae_bf16(self) -> bool:
        """Whether the SAE trains under bf16 autocast: 'auto' means on CUDA; 'bfloat16' needs CUDA."""
        cuda = torch.device(self.torch_device).type == "cuda"
        if self.sae_dtype == "bfloat16" and not cuda:
            raise ValueError(f"sae_dtype='bfloat16' trains under CUDA autocast, but the device is {self.torch_device}; "
                             f"use sae_dtype='auto' or 'float32' on CPU")
        return self.sae_dtype == "bfloat16" or (self.sae_dtype == "auto" and cuda)


def build_store(cfg: RunConfig, model, split: str | None = None):
    from .activations import ActivationStore
    from .token_sources import EmbeddedCorpus

    hooks = cfg.hook if cfg.out_hook is None else (cfg.hook, cfg.out_hook)
    device = cfg.torch_device
    if cfg.cache:
        return ActivationStore.from_cache(cfg.cache, batch_size=cfg.batch_size, buffer_size=cfg.buffer_size,
                                          seed=cfg.seed, device=device, show_progress=cfg.progress)
    return ActivationStore(model, hooks, EmbeddedCorpus(split or cfg.split), n_ctx=cfg.n_ctx, batch_size=cfg.batch_size,
                           model_batch_size=cfg.model_batch_size, buffer_size=cfg.buffer_size, seed=cfg.seed,
                           device=device, show_progress=cfg.progress)


def build_run(cfg: RunConfig, callbacks=None, parallel=None) -> tuple[Any, Any, Trainer]:
    """(model, store, trainer) for `cfg`; the model is None when training from a disk cache.

    With `parallel` (a `distributed.DataParallel`) the device is this rank's and the store serves its slice of each
    global batch."""
    from .models import load_model

    device = cfg.torch_device if parallel is None else parallel.device
    model = None if cfg.cache else load_model(cfg.model, device=device, dtype=cfg.model_dtype)
    if parallel is None:
        store = build_store(cfg, model)
    else:
        from .distributed import data_parallel_store

        store = data_parallel_store(cfg, model, parallel, device)
    model_name = getattr(model, "sae_widgets_name", None) or (store.rows.describe().get("model") if cfg.cache else None)
    torch.manual_seed(cfg.seed)
    sae = SAE(cfg.sae_config(store.d_in, store.d_out, model_name)).to(device)
    trainer = Trainer(sae, store, cfg.train_config(), callbacks=callbacks, metadata={"run_config": asdict(cfg)},
                      parallel=parallel)
    return model, store, trainer


def train_run(cfg: RunConfig, resume: bool = False, callbacks=None, parallel=None) -> dict[str, Any] | None:
    """Train (or resume) the run, evaluate the result, write `metrics.json`; returns the metrics.

    Under torchrun the run is data-parallel (sae_widgets.distributed): rank 0 writes the files and evaluates, the other
    ranks return None. A data-parallel run resumed without torchrun continues in this process as a world of one.
    `parallel` (a `distributed.DataParallel`) overrides that choice.
    """
    from .distributed import FailureReport, data_parallel_for_run, mark_data_parallel

    out = Path(cfg.out)
    if not resume and (out / "checkpoints").exists():
        raise FileExistsError(f"{out} already holds a run; resume it with --resume {out} or choose another --out")
    parallel = parallel or data_parallel_for_run(out, resume, torch.device(cfg.torch_device).type)
    if parallel is not None and parallel.world_size > 1:
        cfg = dataclasses.replace(cfg, progress=cfg.progress and parallel.is_writer)
        callbacks = [*(callbacks or []), FailureReport(parallel, out)]
    if parallel is None or parallel.is_writer:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / RUN_CONFIG, asdict(cfg))
        if parallel is not None:
            mark_data_parallel(out, parallel)
    try:
        model, store, trainer = build_run(cfg, callbacks, parallel)
        sae = trainer.run(resume=resume)
    except BaseException:
        if parallel is not None:
            parallel.close_after_error()
        raise
    if parallel is not None and not parallel.is_writer:
        parallel.close()
        return None
    result = evaluate_run(cfg, sae, model)
    if parallel is not None:
        parallel.close()
    return result


def evaluate_run(cfg: RunConfig, sae: SAE, model=None, n_tokens: int | None = None) -> dict[str, Any]:
    """Metrics on the held-out split ('val') of the embedded corpus (or the cache), written to `metrics.json`."""
    from .metrics import evaluate

    eval_cfg = RunConfig.from_dict({**asdict(cfg), "progress": False, "buffer_size": max(cfg.batch_size, 8192)})
    store = build_store(eval_cfg, model, split="val" if not cfg.cache else None)
    result = evaluate(model, sae, store, n_tokens or cfg.eval_tokens)
    write_json_atomic(Path(cfg.out) / "metrics.json", result.to_dict())
    return {"metrics": result.metrics, "table": result.table()}
