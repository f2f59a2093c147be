"""A training run from one flat config: model + store + SAE + trainer, written to an output folder.

The CLI (`sae-widgets train`), the notebooks and the training monitor all start runs through `train_run`, so a
run is reproducible from its `run_config.json` alone and `--resume DIR` needs nothing else.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import write_json_atomic
from .config_io import read_json, strict_from_dict
from .row_filter import DEFAULT_MASSIVE_NORM_FACTOR
from .sae import SAE, SAEConfig
from .train import Trainer, TrainConfig

RUN_CONFIG = "run_config.json"
SAE_DTYPES = ("auto", "float32", "bfloat16")


# CLI help of the fields that say which tokens and rows a run uses (`cli._run_flags`)
FIELD_HELP = {
    "tokenizer": "the tokenizer: a folder or cached hub name; 'none' loads the model without one (token ids only: "
                 "--tokens-file, --eval-tokens-file)",
    "tokens_file": "train on these token ids: a .safetensors file (one integer tensor) or .npy; 1-D = one stream, "
                   "2-D = one document per row",
    "eval_tokens_file": "evaluate on these token ids (default: the embedded corpus's 'val' split)",
    "prepend_bos": "start every window with the BOS token (its row is never trained on)",
    "bos_token": "the BOS token: a token string or an integer id (default: the tokenizer's real BOS, see "
                 "special_tokens.py)",
    "separator_token": "the token between joined documents: a token string or an integer id (default: the "
                       "tokenizer's real EOS)",
    "exclude_special_tokens": "drop rows of special tokens from training and metrics (default: on, as SAELens)",
    "exclude_token_ids": "more token ids whose rows are dropped",
    "massive_norm_factor": "drop rows whose norm exceeds this multiple of their model batch's median (attention "
                           "sinks); 0 keeps them",
}


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
    tokenizer: str | None = None       # None: the model's own; a tokenizer folder or hub name; "none": token ids only
    tokens_file: str | None = None     # train on these token ids (.safetensors / .npy) instead of the embedded corpus
    eval_tokens_file: str | None = None  # evaluate on these token ids (default: the embedded corpus's 'val' split)
    prepend_bos: bool = True           # start every window with BOS (its row is never trained on)
    bos_token: str | int | None = None       # a token string or integer id; None: the rule of special_tokens.py
    separator_token: str | int | None = None  # the token between joined documents, likewise
    exclude_special_tokens: bool = True      # drop rows of special tokens from training and metrics (as SAELens)
    exclude_token_ids: list[int] | None = None  # more token ids whose rows are dropped
    massive_norm_factor: float | None = DEFAULT_MASSIVE_NORM_FACTOR  # drop rows above this x their batch's median norm
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
    checkpoint_minutes: float = 10.0   # and after this much wall time since the last checkpoint (0: by steps only)
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
        for name in ("bos_token", "separator_token"):  # the CLI gives strings: digits name an id
            value = getattr(self, name)
            if isinstance(value, str) and value.strip().isdigit():
                setattr(self, name, int(value))
        from .row_filter import check_massive_norm_factor

        check_massive_norm_factor(self.massive_norm_factor)
        if self.sae_dtype not in SAE_DTYPES:
            raise ValueError(f"sae_dtype={self.sae_dtype!r} is not one of {SAE_DTYPES}")
        from .models import model_dtype

        model_dtype(self.model_dtype)
        self.check_sizes()

    def check_sizes(self) -> None:
        """Every number and the SAE/trainer configs checked now, before a model is loaded (seconds) or a store built."""
        positive = ("d_sae", "tokens", "n_ctx", "batch_size", "buffer_size", "model_batch_size", "eval_tokens",
                    "dead_window_tokens")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a whole number >= 1")
        if self.buffer_size < self.batch_size:
            raise ValueError(f"buffer_size={self.buffer_size} must be >= batch_size={self.batch_size} (the store "
                             f"shuffles batches out of its buffer)")
        self.sae_config(d_in=1, d_out=1, model_name=None)  # arch, k, prefixes: SAEConfig's own checks
        self.train_config()  # lr, checkpoint settings, precision on this device: TrainConfig's own checks
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
        if not isinstance(d, dict):
            raise ValueError(f"{path} must hold a JSON object of run settings, not {type(d).__name__}")
        d.setdefault("sae_dtype", "float32")  # runs from before this field trained in fp32, and resume in fp32
        # runs from before the row filter kept special-token and massive-norm rows, and resume with the same rows
        d.setdefault("exclude_special_tokens", False)
        d.setdefault("massive_norm_factor", None)
        # a run folder's config describes that folder: resuming or evaluating a moved or copied run works in the
        # folder given, never in the path the run was started with (relative to some other directory, or the original)
        d["out"] = str(path.parent)
        return cls.from_dict(d)

    def with_absolute_paths(self) -> RunConfig:
        """The input files (`tokens_file`, `eval_tokens_file`, `cache`, a local `model` or `tokenizer` folder) as
        absolute paths, so the saved config works from any directory."""
        def absolute(value):
            if value is None or not Path(value).expanduser().exists():
                return value  # a hub name, an embedded model, "none"
            return str(Path(value).expanduser().resolve())

        names = ("tokens_file", "eval_tokens_file", "cache", "model", "tokenizer")
        return dataclasses.replace(self, **{n: absolute(getattr(self, n)) for n in names})

    def row_options(self) -> dict[str, Any]:
        """The store's window and row-filter settings (ActivationStore / ModelRows keywords)."""
        return dict(prepend_bos=self.prepend_bos, bos_token=self.bos_token, separator_token=self.separator_token,
                    exclude_special_tokens=self.exclude_special_tokens, exclude_token_ids=self.exclude_token_ids,
                    massive_norm_factor=self.massive_norm_factor)

    def token_source(self, split: str | None = None):
        """The training tokens (split None: `tokens_file`, else the embedded corpus's `split`), or the evaluation
        tokens (split 'val': `eval_tokens_file`, else the embedded corpus's 'val' split)."""
        from .token_sources import EmbeddedCorpus, TokenFile

        if split is None and self.tokens_file:
            return TokenFile(self.tokens_file)
        if split == "val" and self.eval_tokens_file:
            return TokenFile(self.eval_tokens_file)
        return EmbeddedCorpus(split or self.split)

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
                           checkpoint_minutes=self.checkpoint_minutes,
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

    hooks = cfg.hook if cfg.out_hook is None else (cfg.hook, cfg.out_hook)
    device = cfg.torch_device
    if cfg.cache:
        return ActivationStore.from_cache(cfg.cache, batch_size=cfg.batch_size, buffer_size=cfg.buffer_size,
                                          seed=cfg.seed, device=device, show_progress=cfg.progress)
    return ActivationStore(model, hooks, cfg.token_source(split), n_ctx=cfg.n_ctx, batch_size=cfg.batch_size,
                           model_batch_size=cfg.model_batch_size, buffer_size=cfg.buffer_size, seed=cfg.seed,
                           device=device, show_progress=cfg.progress, **cfg.row_options())


def build_run(cfg: RunConfig, callbacks=None, parallel=None) -> tuple[Any, Any, Trainer]:
    """(model, store, trainer) for `cfg`; the model is None when training from a disk cache.

    With `parallel` (a `distributed.DataParallel`) the device is this rank's and the store serves its slice of each
    global batch."""
    from .models import load_model

    device = cfg.torch_device if parallel is None else parallel.device
    model = None if cfg.cache else load_model(cfg.model, device=device, dtype=cfg.model_dtype, tokenizer=cfg.tokenizer)
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

    from .train import checkpoint_dirs

    out = Path(cfg.out)
    if not resume and checkpoint_dirs(out):
        raise FileExistsError(f"{out} already holds a run; resume it with --resume {out} or choose another --out")
    if resume and not (out / RUN_CONFIG).is_file():
        raise FileNotFoundError(f"{out} holds no {RUN_CONFIG}: not a run folder to resume")
    if resume and not checkpoint_dirs(out):  # stopped before its first checkpoint: nothing to lose, start it over
        print(f"[sae_widgets] {out} holds no checkpoint yet: training it from the beginning", file=sys.stderr)
    if not resume:
        cfg = cfg.with_absolute_paths()
    parallel = parallel or data_parallel_for_run(out, resume, torch.device(cfg.torch_device).type)
    if parallel is not None and parallel.world_size > 1:
        cfg = dataclasses.replace(cfg, progress=cfg.progress and parallel.is_writer)
        callbacks = [*(callbacks or []), FailureReport(parallel, out)]
    if (parallel is None or parallel.is_writer) and not resume:  # a resumed run keeps the config it was started with
        try:
            out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out / RUN_CONFIG, asdict(cfg))
        except OSError as e:
            raise ValueError(f"out={str(out)!r} (--out) cannot be written: {e.strerror or e}"
                             f"{f' ({e.filename})' if e.filename else ''}; choose a folder you can write to") from None
    if parallel is not None and parallel.is_writer:
        mark_data_parallel(out, parallel)
    try:
        model, store, trainer = build_run(cfg, callbacks, parallel)
        sae = trainer.run(resume=resume and bool(checkpoint_dirs(out)))
    except BaseException:
        if parallel is not None:
            parallel.close_after_error()
        raise
    if parallel is not None and not parallel.is_writer:
        parallel.close()
        return None
    result = evaluate_run(cfg, sae, model, training_rows=getattr(store, "counts", {}))
    if parallel is not None:
        parallel.close()
    return result


def finite_or_null(obj: Any) -> Any:
    """NaN and infinities as JSON null (an undefined score, e.g. ce_loss_score at a hook whose ablation does not
    raise the loss), so metrics.json is strict JSON that every reader accepts."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def evaluate_run(cfg: RunConfig, sae: SAE, model=None, n_tokens: int | None = None,
                 training_rows: dict[str, int] | None = None) -> dict[str, Any]:
    """Metrics on the held-out tokens (`eval_tokens_file`, else the embedded corpus's 'val' split; or the cache),
    written to `metrics.json`, with the rows the row filter dropped in training (`training_rows`, the store's
    `counts`) and in evaluation."""
    from .metrics import evaluate
    from .row_filter import counts_line

    eval_cfg = RunConfig.from_dict({**asdict(cfg), "progress": False, "buffer_size": max(cfg.batch_size, 8192)})
    store = build_store(eval_cfg, model, split="val" if not cfg.cache else None)
    result = evaluate(model, sae, store, n_tokens or cfg.eval_tokens)
    out = result.to_dict()
    table = result.table()
    if training_rows:
        out["training_row_counts"] = dict(training_rows)
        table += "\n" + counts_line("training", training_rows)
    write_json_atomic(Path(cfg.out) / "metrics.json", finite_or_null(out))
    return {"metrics": result.metrics, "table": table, "row_counts": result.row_counts,
            "training_row_counts": training_rows or {}}

