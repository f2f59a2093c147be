"""Activation store: stream a model's activations at one hook (or a pair, for transcoders) as shuffled batches.

    store = ActivationStore(model, "blocks.1.hook_resid_post", EmbeddedCorpus("train"), batch_size=4096)
    x = store.next_batch()                        # [batch_size, d_in] on the training device

Tokens -> windows of `n_ctx` (BOS first when `prepend_bos`; BOS and separator by `special_tokens`) -> the model,
run only up to the layer the hooks need -> one row per token, less the rows `row_filter` drops (BOS, special
tokens, massive norms) -> a shuffle buffer -> batches. Rows come either from the model (`ModelRows`) or
from a disk cache written by `write_activation_cache` (`CachedRows`); both give the same rows in the same
order, and the buffer takes exactly the rows it needs, so a cached run yields the very same batches.
"""
from __future__ import annotations

import difflib
import errno
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .atomic import (DIGEST_KEY, check_digest_field, json_digest, load_safetensors, remove_temp_files,
                     safetensors_header, save_safetensors_atomic, write_json_atomic)
from .config_io import read_json
from .row_filter import DEFAULT_MASSIVE_NORM_FACTOR, RowFilter
from .special_tokens import boundary_tokens, excluded_token_ids, model_tokenizer
from .token_sources import EmbeddedCorpus, TokenSource
from .tokens import window_body

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_EMBED_HOOKS = ("hook_embed", "hook_pos_embed", "embed.", "pos_embed.")
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest_sha256"  # json_digest of the manifest less this key; manifests before it load unchecked
CACHE_FORMAT = 1
_SHARD_NAME = re.compile(r"shard_\d{5,}\.safetensors")
_OWN_FILE = re.compile(r"(shard_\d{5,}\.safetensors|manifest\.json)(\.tmp)?")
_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


# ----------------------------------------------------------------------------------------------- hooks
def hook_layer(name: str) -> int | None:
    m = _BLOCK.match(name)
    return int(m.group(1)) if m else None


def _compact_hook_list(names: Sequence[str], n_layers: int) -> str:
    """Hook names with block indices folded into `blocks.{0..L}.`, so the list stays readable."""
    seen: list[str] = []
    for n in names:
        folded = _BLOCK.sub(f"blocks.{{0..{n_layers - 1}}}.", n)
        if folded not in seen:
            seen.append(folded)
    return ", ".join(seen)


def validate_hooks(model, hooks: Sequence[str]) -> None:
    """Clear errors for a layer past the model's depth or a name the model does not have."""
    n_layers = model.cfg.n_layers
    for name in hooks:
        layer = hook_layer(name)
        if layer is not None and layer >= n_layers:
            raise ValueError(f"hook {name!r} asks for layer {layer}, but the model has {n_layers} layers (0..{n_layers - 1})")
        if name not in model.hook_dict:
            close = difflib.get_close_matches(name, list(model.hook_dict), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown hook name {name!r}.{hint} Valid hook names of this model: "
                             f"{_compact_hook_list(list(model.hook_dict), n_layers)}")


@torch.no_grad()
def run_to_hooks(model, hooks: Sequence[str], tokens: torch.Tensor,
                 stop_at_layer: int | None = None) -> list[torch.Tensor]:
    """Activations [batch, position, width] at each hook (per-head hook_z flattened), from one forward pass that stops
    at `stop_at_layer`. A hook that does not fire, or is not per-token (attention patterns), is a clear error."""
    captured: dict[str, torch.Tensor] = {}

    def grab(name):
        def fn(act, hook):
            captured[name] = act.detach()
            return act
        return fn

    model.run_with_hooks(tokens, fwd_hooks=[(h, grab(h)) for h in hooks], stop_at_layer=stop_at_layer)
    out = []
    for h in hooks:
        a = captured.get(h)
        if a is None:
            raise RuntimeError(f"hook {h!r} did not fire during the forward pass")
        if a.shape[:2] != tokens.shape:
            raise ValueError(f"hook {h!r} gives shape {tuple(a.shape)}, not [batch, position, ...]: "
                             f"it is not a per-token activation (attention patterns, scores) the store can stream")
        out.append(a.reshape(*a.shape[:2], -1))  # flattens per-head hook_z to [batch, pos, n_heads * d_head]
    return out


def stop_layer_for(model, hooks: Sequence[str]) -> int | None:
    """The `stop_at_layer` that still fires every hook: blocks past the last needed one never run."""
    needed = []
    for name in hooks:
        layer = hook_layer(name)
        if layer is None and not name.startswith(_EMBED_HOOKS):
            return None  # final norm / unembed hooks need the whole model
        needed.append(-1 if layer is None else layer)
    return max(needed) + 1


# ----------------------------------------------------------------------------------------------- rows
class ModelRows:
    """Unshuffled activation rows from the model, in window order; deterministic, so it can fast-forward.

    The BOS and the document separator follow `special_tokens.boundary_tokens`; which rows of a model batch are
    kept follows `row_filter.RowFilter` (BOS position, special tokens, massive norms), and `counts` says how many
    each rule dropped. A model batch therefore gives a varying number of rows; everything downstream (the buffer,
    the disk cache, fast-forward by windows) counts rows or windows, never assumes a fixed number per window.
    """

    def __init__(self, model, hooks: Sequence[str], source: TokenSource, *, n_ctx: int, prepend_bos: bool,
                 keep_bos_rows: bool, model_batch_size: int, dtype: torch.dtype, bos_token: str | int | None = None,
                 separator_token: str | int | None = None, exclude_special_tokens: bool = True,
                 exclude_token_ids: Sequence[int | str] | None = None,
                 massive_norm_factor: float | None = DEFAULT_MASSIVE_NORM_FACTOR):
        validate_hooks(model, hooks)
        if n_ctx > model.cfg.n_ctx:
            raise ValueError(f"n_ctx={n_ctx} is longer than the model's context of {model.cfg.n_ctx} tokens")
        if n_ctx < 2:
            raise ValueError(f"n_ctx={n_ctx} must be at least 2")
        if model_batch_size < 1:
            raise ValueError(f"model_batch_size={model_batch_size} must be >= 1")
        self.boundaries = boundary_tokens(model, prepend_bos=prepend_bos, bos_token=bos_token,
                                          separator_token=separator_token)
        self.bos_id, self.sep_id = self.boundaries.bos_id, self.boundaries.separator_id
        self.model, self.hooks, self.source, self.tokenizer = model, list(hooks), source, model_tokenizer(model)
        self.prepend_bos = self.bos_id is not None  # asked for, and a BOS token exists
        self.n_ctx, self.model_batch_size, self.dtype = n_ctx, model_batch_size, dtype
        self.drop_first = self.prepend_bos and not keep_bos_rows
        self.rows_per_window = n_ctx - int(self.drop_first)  # at most: the filter may drop more
        self.stop_at_layer = stop_layer_for(model, hooks)
        self.windows_done = 0  # position in the window stream, over all epochs
        self.epoch = 0
        self._epoch_of_last_row = 0
        self._windows = self._window_iter()
        self.d_hooks = self._probe_dims()
        excluded = excluded_token_ids(model, self.boundaries, exclude_special_tokens=exclude_special_tokens,
                                      exclude_token_ids=exclude_token_ids)
        self.filter = RowFilter(self.d_hooks, bos_first=self.prepend_bos, keep_bos_rows=keep_bos_rows,
                                excluded_ids=excluded, massive_norm_factor=massive_norm_factor)
        self.exclude_special_tokens = exclude_special_tokens

    @property
    def counts(self) -> dict[str, int]:
        """Rows kept and dropped (by rule) so far, over every model batch this stream has run."""
        return dict(self.filter.counts)

    def window_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Token windows [batch_size, n_ctx] from the start of the source, independent of the row stream's position
        (for evaluation runs that need whole contexts, e.g. spliced cross-entropy)."""
        it = self._window_iter(count_epochs=False)
        while True:
            yield torch.tensor([next(it) for _ in range(batch_size)], dtype=torch.long, device=self.model.cfg.device)

    def _window_iter(self, count_epochs: bool = True) -> Iterator[list[int]]:
        body = window_body(self.n_ctx, self.bos_id)
        pending: list[int] = []
        while True:
            any_doc = False
            for doc in self.source.documents(self.tokenizer):
                any_doc = any_doc or bool(doc)
                if doc and not 0 <= min(doc) <= max(doc) < self.model.cfg.d_vocab:
                    raise ValueError(f"the token source {self.source.describe()} holds id "
                                     f"{min(doc) if min(doc) < 0 else max(doc)}, outside the model's vocabulary "
                                     f"(ids 0..{self.model.cfg.d_vocab - 1})")
                pending.extend(doc)
                if self.sep_id is not None:
                    pending.append(self.sep_id)
                start = 0  # cut windows by offset: re-slicing the rest per window is quadratic in document length
                while len(pending) - start >= body:
                    w = pending[start:start + body]
                    start += body
                    yield ([self.bos_id] if self.bos_id is not None else []) + w
                del pending[:start]
            if not any_doc:
                raise ValueError(f"the token source {self.source.describe()} is empty: it yielded no tokens")
            if count_epochs:
                self.epoch += 1

    def _probe_dims(self) -> list[int]:
        probe = torch.tensor([[self.bos_id if self.bos_id is not None else 0, 1]], device=self.model.cfg.device)
        acts = self.run(probe)
        return [a.shape[-1] for a in acts]

    def run(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """The hooks' activations for these token windows, stopping after the last block they need."""
        return run_to_hooks(self.model, self.hooks, tokens, self.stop_at_layer)

    def skip_windows(self, n: int) -> None:
        for _ in range(n):
            next(self._windows)
            self.windows_done += 1

    def next_rows(self) -> torch.Tensor:
        """Rows of one model batch: [kept rows, sum(d_hooks)] on the model's device (at most
        model_batch_size * rows_per_window rows)."""
        windows = [next(self._windows) for _ in range(self.model_batch_size)]
        self.windows_done += len(windows)
        return self.rows_for(windows)

    def rows_for(self, windows: list[list[int]]) -> torch.Tensor:
        """The kept rows of these token windows, in (window, position) order, on the model's device."""
        tokens = torch.tensor(windows, dtype=torch.long, device=self.model.cfg.device)
        return self.select(tokens, torch.cat(self.run(tokens), dim=-1))

    def select(self, tokens: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        """The rows of one whole model batch (tokens [n, n_ctx], acts [n, n_ctx, width]) that the filter keeps."""
        rows = acts[self.filter.keep(tokens, acts)].to(self.dtype)
        if len(rows):
            self._epoch_of_last_row = self.epoch
        elif self.epoch > self._epoch_of_last_row + 1:
            raise ValueError(f"a whole pass over the token source kept no row: every row was dropped "
                             f"({self.filter.counts}); loosen exclude_special_tokens / exclude_token_ids / "
                             f"massive_norm_factor")
        return rows

    def state(self) -> dict[str, int]:
        return {"windows_done": self.windows_done, **self.filter.counts}

    def load_state(self, state: dict[str, int]) -> None:
        if state["windows_done"] < self.windows_done:
            raise ValueError("cannot rewind a model row stream; build a new store and load the state into it")
        self.skip_windows(state["windows_done"] - self.windows_done)
        for k in self.filter.counts:  # skipping does not run the model: the counts come from the state (0 if older)
            self.filter.counts[k] = int(state.get(k, 0))

    def describe(self) -> dict[str, Any]:
        return {
            "model": getattr(self.model, "sae_widgets_name", type(self.model).__name__),
            "model_source": getattr(self.model, "sae_widgets_source", None),
            "hooks": self.hooks, "d_hooks": self.d_hooks, "dataset": self.source.describe(),
            "n_ctx": self.n_ctx, "prepend_bos": self.prepend_bos, "keep_bos_rows": not self.drop_first,
            **self.boundaries.describe(), "exclude_special_tokens": self.exclude_special_tokens,
            **self.filter.describe(),
        }


class CachedRows:
    """Rows read back from a disk cache, in the order they were written; loops over the cache at its end."""

    def __init__(self, cache_dir: str | os.PathLike, dtype: torch.dtype, device: torch.device | str):
        self.dir = Path(cache_dir)
        self.manifest = read_manifest(self.dir)
        if not self.manifest["complete"]:
            raise ValueError(f"activation cache {self.dir} is incomplete ({self.manifest['n_rows']} of "
                             f"{self.manifest['n_tokens']} rows); run write_activation_cache again to finish it")
        self.hooks, self.d_hooks = self.manifest["hooks"], self.manifest["d_hooks"]
        self.dtype, self.device = dtype, device
        self.shard, self.epoch = 0, 0
        self.stop_at_layer = None

    def next_rows(self) -> torch.Tensor:
        shards = self.manifest["shards"]
        if self.shard == len(shards):
            self.shard, self.epoch = 0, self.epoch + 1
        t = self.load_shard(self.shard)
        self.shard += 1
        return torch.cat([t[h] for h in self.hooks], dim=-1).to(self.device, self.dtype)

    def load_shard(self, i: int) -> dict[str, torch.Tensor]:
        """Shard `i`'s tensors, its header checked against the manifest before anything is allocated and its digest
        after (a shard of a cache whose manifest has a digest must have one too)."""
        entry = self.manifest["shards"][i]
        path = self.dir / entry["file"]
        meta, header = safetensors_header(path)
        check_digest_field(path, meta, DIGEST_KEY, required=MANIFEST_DIGEST in self.manifest)
        want = {h: (_SAFETENSORS_DTYPES[self.manifest["dtype"]], [entry["n_rows"], d])
                for h, d in zip(self.hooks, self.d_hooks)}
        if header != want:
            raise ValueError(f"{path} holds {header}, but {self.dir / MANIFEST} says {want}: the cache is damaged; "
                             f"delete {self.dir} and write the cache again")
        return load_safetensors(path)

    @property
    def counts(self) -> dict[str, int]:
        """Rows kept and dropped while the cache was written (empty for caches written before the counts existed)."""
        return dict(self.manifest.get("counts", {}))

    def state(self) -> dict[str, int]:
        return {"shard": self.shard, "epoch": self.epoch}

    def load_state(self, state: dict[str, int]) -> None:
        self.shard, self.epoch = state["shard"], state["epoch"]

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in self.manifest.items() if k not in ("shards", MANIFEST_DIGEST)}


# ----------------------------------------------------------------------------------------------- store
class HookWidths:
    """d_in / d_out of a batch stream whose rows are its hooks side by side (`d_hooks`): the first hook is the
    SAE's input, the last its target (the same hook unless it is a transcoder's pair)."""

    d_hooks: list[int]

    @property
    def d_in(self) -> int:
        return self.d_hooks[0]

    @property
    def d_out(self) -> int:
        return self.d_hooks[-1]


class ActivationStore(HookWidths):
    """Shuffled batches of activations on the training device.

    `hooks` is one hook name (batches are tensors) or an (input, output) pair for transcoders (batches are
    (x, y) tuples). The buffer holds `buffer_size` rows; when it falls to half, it is topped up from the
    row stream and reshuffled, so every batch mixes rows from many contexts.

    Which rows enter (`ModelRows`): the BOS position is dropped unless `keep_bos_rows`; `bos_token` /
    `separator_token` (a token string or id; None: the rule of `special_tokens`) start windows and join documents;
    rows of special tokens are dropped unless `exclude_special_tokens=False` (`exclude_token_ids` adds ids); rows
    whose norm exceeds `massive_norm_factor` x their model batch's median are dropped (0 / None: kept).
    `counts` says how many rows each rule dropped.
    """

    def __init__(self, model, hooks: str | Sequence[str], source: TokenSource | None = None, *, n_ctx: int = 128,
                 batch_size: int = 4096, model_batch_size: int = 32, buffer_size: int = 65536, shuffle: bool = True,
                 prepend_bos: bool = True, keep_bos_rows: bool = False, seed: int = 0,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 show_progress: bool = True, rows=None, bos_token: str | int | None = None,
                 separator_token: str | int | None = None, exclude_special_tokens: bool = True,
                 exclude_token_ids: Sequence[int | str] | None = None,
                 massive_norm_factor: float | None = DEFAULT_MASSIVE_NORM_FACTOR):
        self.paired = not isinstance(hooks, str)
        hooks = [hooks] if isinstance(hooks, str) else list(hooks)
        if len(hooks) not in (1, 2) or (self.paired and len(hooks) != 2):
            raise ValueError(f"hooks must be one hook name or an (input, output) pair, got {hooks}")
        if batch_size < 1 or buffer_size < batch_size:
            raise ValueError(f"need 1 <= batch_size <= buffer_size, got batch_size={batch_size}, buffer_size={buffer_size}")
        self.device = torch.device(device) if device is not None else torch.device(model.cfg.device if model is not None else "cpu")
        if rows is None:
            rows = ModelRows(model, hooks, source if source is not None else EmbeddedCorpus("train"), n_ctx=n_ctx,
                             prepend_bos=prepend_bos, keep_bos_rows=keep_bos_rows, model_batch_size=model_batch_size,
                             dtype=dtype, bos_token=bos_token, separator_token=separator_token,
                             exclude_special_tokens=exclude_special_tokens, exclude_token_ids=exclude_token_ids,
                             massive_norm_factor=massive_norm_factor)
        self.rows = rows
        self.hooks, self.d_hooks = list(rows.hooks), list(rows.d_hooks)
        self.batch_size, self.buffer_size, self.shuffle, self.seed = batch_size, buffer_size, shuffle, seed
        self.show_progress = show_progress
        self._gen = torch.Generator().manual_seed(seed)
        width = sum(self.d_hooks)
        self._buffer = torch.empty(0, width, dtype=dtype, device=self.device)
        self._pending = torch.empty(0, width, dtype=dtype, device=self.device)  # rows drawn but not yet in the buffer
        self.batches_served = 0

    @classmethod
    def from_cache(cls, cache_dir: str | os.PathLike, *, batch_size: int = 4096, buffer_size: int = 65536,
                   shuffle: bool = True, seed: int = 0, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, show_progress: bool = True) -> ActivationStore:
        """A store that reads a disk cache instead of running the model: the same batches, no model needed."""
        rows = CachedRows(cache_dir, dtype=dtype, device=device)
        store = cls(None, rows.hooks if len(rows.hooks) > 1 else rows.hooks[0], batch_size=batch_size,
                    buffer_size=buffer_size, shuffle=shuffle, seed=seed, device=device, dtype=dtype,
                    show_progress=show_progress, rows=rows)
        return store

    @property
    def stop_at_layer(self) -> int | None:
        return self.rows.stop_at_layer

    @property
    def counts(self) -> dict[str, int]:
        """Rows kept and dropped by rule (`row_filter.COUNTERS`) by the row stream so far ({} when it keeps none)."""
        return dict(getattr(self.rows, "counts", {}))

    def _take_rows(self, n: int) -> torch.Tensor:
        """Exactly `n` rows from the stream, whatever size the chunks come in."""
        chunks, have = [self._pending], len(self._pending)
        bar = None
        if self.show_progress and n >= 16 * max(1, self.batch_size):
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc="filling activation buffer", unit="tok", leave=False)
        while have < n:
            new = self.rows.next_rows().to(self.device)
            chunks.append(new)
            have += len(new)
            if bar is not None:
                bar.update(min(len(new), n - (have - len(new))))
        if bar is not None:
            bar.close()
        allrows = torch.cat(chunks)
        self._pending = allrows[n:]
        return allrows[:n]

    def _refill(self) -> None:
        fresh = self._take_rows(self.buffer_size - len(self._buffer))
        buf = torch.cat([self._buffer, fresh])
        if self.shuffle:
            buf = buf[torch.randperm(len(buf), generator=self._gen).to(buf.device)]
        self._buffer = buf

    def next_batch(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if len(self._buffer) < max(self.batch_size, self.buffer_size // 2):
            self._refill()
        batch, self._buffer = self._buffer[: self.batch_size], self._buffer[self.batch_size :]
        self.batches_served += 1
        if self.paired:
            return batch[:, : self.d_hooks[0]], batch[:, self.d_hooks[0] :]
        return batch

    def __iter__(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """Endless: stop the loop yourself (the stream starts a new epoch when the source runs out)."""
        while True:
            yield self.next_batch()

    # -- resume: everything needed to continue the exact same batch sequence after a restart
    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self._buffer.cpu(), "pending": self._pending.cpu(), "rng": self._gen.get_state(),
                "rows": dict(self.rows.state()), "batches_served": self.batches_served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rows" not in state:
            raise ValueError(f"this store state (keys {sorted(state)}) is not an ActivationStore's: a data-parallel run "
                             f"from a disk cache saves row numbers; train_run resumes it (sae_widgets.distributed)")
        self.rows.load_state(state["rows"])
        self._buffer = state["buffer"].to(self.device, self._buffer.dtype)
        self._pending = state["pending"].to(self.device, self._pending.dtype)
        self._gen.set_state(state["rng"])
        self.batches_served = state["batches_served"]


# ----------------------------------------------------------------------------------------------- disk cache
def _is_count(v: Any, least: int = 0) -> bool:
    return type(v) is int and v >= least


def _manifest_problem(m: Any) -> str | None:
    """What makes `m` unusable as a cache manifest (None when nothing does): the fields the readers rely on."""
    if not isinstance(m, dict):
        return f"it holds a {type(m).__name__}, not an object"
    hooks, widths, shards = m.get("hooks"), m.get("d_hooks"), m.get("shards")
    if not (isinstance(hooks, list) and hooks and all(isinstance(h, str) for h in hooks)):
        return f"hooks={hooks!r} is not a list of hook names"
    if not (isinstance(widths, list) and len(widths) == len(hooks) and all(_is_count(d, 1) for d in widths)):
        return f"d_hooks={widths!r} is not one width per hook"
    if m.get("dtype") not in _SAFETENSORS_DTYPES:
        return f"dtype={m.get('dtype')!r} is not one of {sorted(_SAFETENSORS_DTYPES)}"
    for key in ("n_rows", "n_tokens", "windows_done"):
        if not _is_count(m.get(key)):
            return f"{key}={m.get(key)!r} is not a count"
    if not isinstance(m.get("complete"), bool):
        return f"complete={m.get('complete')!r} is not true or false"
    if not (isinstance(shards, list) and all(isinstance(e, dict) and isinstance(e.get("file"), str)
                                             and _SHARD_NAME.fullmatch(e["file"]) and _is_count(e.get("n_rows"))
                                             for e in shards)):
        return "shards is not a list of {file: shard_NNNNN.safetensors, n_rows: count}"
    if sum(e["n_rows"] for e in shards) != m["n_rows"]:
        return f"its shards hold {sum(e['n_rows'] for e in shards)} rows, not n_rows={m['n_rows']}"
    return None


def read_manifest(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """The cache's manifest, its digest checked (if it was written with one) and its fields checked; damage is a
    ValueError naming the file."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no activation cache at {cache_dir}: {MANIFEST} is missing")
    m = read_json(path)
    if isinstance(m, dict) and check_digest_field(path, m, MANIFEST_DIGEST):
        if m[MANIFEST_DIGEST] != json_digest({k: v for k, v in m.items() if k != MANIFEST_DIGEST}):
            raise ValueError(f"{path} is corrupt: it does not match the digest it was written with; "
                             f"delete {cache_dir} and write the cache again")
    problem = _manifest_problem(m)
    if problem:
        raise ValueError(f"{path} is not a usable activation cache manifest: {problem}; "
                         f"delete {cache_dir} and write the cache again")
    return m


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    write_json_atomic(out / MANIFEST, {**body, MANIFEST_DIGEST: json_digest(body)})


def _remove_leftovers(out: Path, manifest: dict[str, Any]) -> None:
    """Delete what an interrupted writer left: temp files, and shards written after the manifest's last one."""
    listed = {e["file"] for e in manifest["shards"]} | {MANIFEST}
    for p in out.iterdir():
        if p.is_file() and _OWN_FILE.fullmatch(p.name) and p.name not in listed:
            p.unlink(missing_ok=True)
    if (out / MANIFEST).is_file():  # the folder is a cache: any temp file in it is an interrupted write's
        remove_temp_files(out)


def _cache_write_error(e: OSError, file: Path, out: Path, held: int, total: int) -> OSError:
    """One line: the file that failed, how far the cache got, and that a rerun finishes it."""
    advice = "free space" if e.errno == errno.ENOSPC else "fix the disk"
    return OSError(e.errno, f"could not write {e.filename or file}: {e.strerror}; activation cache {out} holds "
                            f"{held} of {total} rows; {advice} and run write_activation_cache again to finish it")


def write_activation_cache(model, hooks: str | Sequence[str], cache_dir: str | os.PathLike, n_tokens: int,
                           source: TokenSource | None = None, *, n_ctx: int = 128, prepend_bos: bool = True,
                           keep_bos_rows: bool = False, model_batch_size: int = 32, shard_tokens: int = 262144,
                           seed: int = 0, dtype: torch.dtype = torch.float32, show_progress: bool = True,
                           bos_token: str | int | None = None, separator_token: str | int | None = None,
                           exclude_special_tokens: bool = True, exclude_token_ids: Sequence[int | str] | None = None,
                           massive_norm_factor: float | None = DEFAULT_MASSIVE_NORM_FACTOR) -> Path:
    """Write the first `n_tokens` activation rows to safetensors shards plus a JSON manifest.

    Resumable: shards and manifest are written atomically, and a second call with the same settings removes what an
    interrupted one left and continues after the last complete shard (a finished cache is left as it is). A failed
    write is an OSError saying how many rows the cache holds.
    """
    from tqdm.auto import tqdm

    from . import __version__

    if n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens} must be >= 1")
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    rows = ModelRows(model, hooks, source if source is not None else EmbeddedCorpus("train"), n_ctx=n_ctx,
                     prepend_bos=prepend_bos, keep_bos_rows=keep_bos_rows, model_batch_size=model_batch_size, dtype=dtype,
                     bos_token=bos_token, separator_token=separator_token,
                     exclude_special_tokens=exclude_special_tokens, exclude_token_ids=exclude_token_ids,
                     massive_norm_factor=massive_norm_factor)
    settings = {"format": CACHE_FORMAT, **rows.describe(), "n_tokens": n_tokens, "seed": seed,
                "dtype": str(dtype).removeprefix("torch."), "model_batch_size": model_batch_size}
    out = Path(cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {**settings, "n_rows": 0, "windows_done": 0, "shards": [], "complete": False,
                "sae_widgets_version": __version__}
    if (out / MANIFEST).is_file():
        old = read_manifest(out)
        differing = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if differing:
            raise ValueError(f"{out} already holds an activation cache with other settings {differing}; "
                             f"use another folder or delete this one")
        manifest = {k: v for k, v in old.items() if k != MANIFEST_DIGEST}
        rows.load_state({"windows_done": manifest["windows_done"], **manifest.get("counts", {})})
    _remove_leftovers(out, manifest)
    if manifest["complete"]:
        return out
    bar = tqdm(total=n_tokens, initial=manifest["n_rows"], desc="caching activations", unit="tok", disable=not show_progress)
    per_shard = max(1, shard_tokens // (model_batch_size * rows.rows_per_window))
    while manifest["n_rows"] < n_tokens:
        chunks = []
        for _ in range(per_shard):
            chunks.append(rows.next_rows().cpu())
            if manifest["n_rows"] + sum(len(c) for c in chunks) >= n_tokens:
                break
        shard = torch.cat(chunks)[: n_tokens - manifest["n_rows"]]
        name = f"shard_{len(manifest['shards']):05d}.safetensors"
        split = torch.split(shard, rows.d_hooks, dim=-1)
        held = manifest["n_rows"]
        manifest["shards"].append({"file": name, "n_rows": len(shard)})
        manifest["n_rows"] += len(shard)
        manifest["windows_done"] = rows.windows_done
        manifest["counts"] = rows.counts
        manifest["complete"] = manifest["n_rows"] >= n_tokens
        file = out / name
        try:
            save_safetensors_atomic(file, dict(zip(hooks, split)))  # it makes each tensor contiguous
            file = out / MANIFEST
            _write_manifest(out, manifest)
        except OSError as e:
            bar.close()
            raise _cache_write_error(e, file, out, held, n_tokens) from e
        bar.update(len(shard))
    bar.close()
    return out
