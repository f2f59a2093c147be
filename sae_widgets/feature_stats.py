"""Feature statistics for every latent of an SAE from one batched sweep, saved next to the SAE for the dashboards.

    stats = FeatureStats.compute(model, sae, EmbeddedCorpus("val"), n_tokens=200_000)   # GPU when there is one
    stats.save("runs/l1")                              # runs/l1/feature_stats.safetensors, written atomically
    stats = FeatureStats.load("runs/l1", sae=sae)      # instant: contexts are read per latent, on demand
    stats.feature(12)                                  # a JSON-ready dict for the dashboard
    stats.columns()                                    # arrays for the feature browser

Per latent: density (fraction of scored tokens where it is > 0), mean and max activation, a log-spaced histogram of
its positive activations, its top-n contexts, quantile-stratified sample contexts, and its logit effects (top ±
tokens of W_dec[i] @ W_U through the final norm's elementwise map, read off the module: `final_norm_map`). A
context is a window of tokens around the token that ranks, with that latent's activation at each of them (0 at
the BOS position, which is never scored). The file is one safetensors file whose header holds the JSON metadata
(settings, SAE fingerprint, the vocabulary's strings), so no tokenizer is needed to reopen it, and the arrays and
their description can never disagree.
"""
from __future__ import annotations

import copy
import errno
import hashlib
import json
import math
import operator
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import DIGEST_KEY, safetensors_metadata, save_safetensors_atomic, tensors_digest
from .feature_stats_sweep import Sweep, logit_effects

FILE_NAME = "feature_stats.safetensors"
FORMAT = "sae_widgets.feature_stats/1"
META_DIGEST = "meta_sha256"  # sha256 of the header's "meta" JSON (the tensors' digest does not cover the header)
LAZY = ("top_ctx_ids", "top_ctx_acts", "q_ctx_ids", "q_ctx_acts")  # the big arrays: read one latent at a time
TOP_TOKENS_SHOWN = 5


def sae_fingerprint(sae) -> str:
    """sha256 of the SAE's config (less the backend choice) and every parameter and buffer: which SAE stats belong to."""
    cfg = {k: v for k, v in sae.cfg.to_dict().items() if k != "backend"}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    for name, t in sorted(sae.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{t.numel()}".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def token_strings(model) -> list[str]:
    """The decoded text of every vocabulary id (ids the tokenizer lacks, in a padded vocabulary, as <id>; every id as
    #id for a model loaded without a tokenizer)."""
    tok, d_vocab = getattr(model, "tokenizer", None), model.cfg.d_vocab
    if tok is None:
        return [f"#{i}" for i in range(d_vocab)]
    known = min(d_vocab, len(tok))
    return list(tok.batch_decode([[i] for i in range(known)])) + [f"<{i}>" for i in range(known, d_vocab)]


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be an integer >= 1")


def resolve_file(path: str | os.PathLike) -> Path:
    """`path` itself when it names a .safetensors file, else `path/feature_stats.safetensors` (e.g. an SAE folder)."""
    p = Path(path)
    return p if p.suffix == ".safetensors" else p / FILE_NAME


class FeatureStats:
    """Per-latent statistics of one SAE over `n_tokens` scored tokens; see the module docstring."""

    def __init__(self, arrays: dict[str, torch.Tensor], meta: dict[str, Any], lazy=None):
        self._arrays, self._lazy, self.meta = arrays, lazy, meta
        self.d_sae, self.n_tokens = int(meta["d_sae"]), int(meta["n_tokens"])
        self.token_strings: list[str] = meta["token_strings"]
        self.sae_fingerprint: str = meta["sae_fingerprint"]
        self.settings: dict[str, Any] = meta["settings"]
        self._columns: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------ compute
    @classmethod
    @torch.no_grad()
    def compute(cls, model, sae, tokens, *, n_tokens: int | None = None, hook: str | None = None,
                n_ctx: int | None = None, prepend_bos: bool = True, batch_size: int | None = None, n_top: int = 20,
                n_quantile_bins: int = 10, per_bin: int = 5, context: tuple[int, int] = (12, 4),
                n_hist_bins: int = 30, n_logits: int = 10, device: str | torch.device | None = None,
                latent_chunk: int | None = None, encode_chunk: int | None = None, seed: int = 0,
                autocast: bool | None = None, show_progress: bool = True) -> FeatureStats:
        """One sweep over `tokens` for every latent of `sae`.

        `tokens`: a token source (`EmbeddedCorpus`, `TextFiles`, ...; then `n_tokens` is required) or a 2-D integer
        tensor of windows [n_windows, n_ctx] (all of them, or the first ones covering `n_tokens`). With `prepend_bos`,
        a source's windows are BOS + n_ctx-1 tokens and position 0 of every window (BOS) is context only, never scored.
        `batch_size`: windows per model forward; `encode_chunk`: tokens per SAE encode (bounds the dense activations);
        `latent_chunk`: latents per table merge and per logit-effect product. None picks sizes for the device.
        `autocast`: run the model (not the SAE) in bf16 on CUDA (default there). `seed` picks the quantile samples.
        """
        from tqdm.auto import tqdm

        from .activations import ModelRows
        from .token_sources import TokenArray

        _check_positive(n_top=n_top, n_quantile_bins=n_quantile_bins, per_bin=per_bin, n_hist_bins=n_hist_bins)
        if not (isinstance(n_logits, int) and n_logits >= 0):
            raise ValueError(f"n_logits={n_logits!r} must be an integer >= 0")
        if len(context) != 2 or any(not isinstance(c, int) or c < 0 for c in context):
            raise ValueError(f"context={context!r} must be (left, right) token counts >= 0")
        device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        hook = hook or sae.cfg.hook
        d_sae = sae.cfg.d_sae
        is_tensor = isinstance(tokens, (torch.Tensor, np.ndarray))
        if is_tensor:
            windows = _check_windows(torch.as_tensor(tokens), model, n_ctx)
            n_ctx = windows.shape[1]
        elif n_tokens is None:
            raise ValueError(f"n_tokens is required with a token source ({type(tokens).__name__}): how many tokens to sweep")
        n_ctx = n_ctx or 128
        scored = n_ctx - int(prepend_bos)
        if scored < 1:
            raise ValueError(f"windows of n_ctx={n_ctx} with prepend_bos=True hold no scored token")
        available = windows.shape[0] if is_tensor else None
        if n_tokens is not None:
            _check_positive(n_tokens=n_tokens)
        n_windows = available if n_tokens is None else math.ceil(n_tokens / scored)
        if available is not None and n_windows > available:
            raise ValueError(f"n_tokens={n_tokens} needs {n_windows} windows of {scored} scored tokens, but only "
                             f"{available} windows were given")
        batch_size = batch_size or max(1, (2 ** 16 if device.type == "cuda" else 2 ** 13) // n_ctx)
        encode_chunk = encode_chunk or max(1, (2 ** 28 if device.type == "cuda" else 2 ** 24) // d_sae)
        _check_positive(batch_size=batch_size, encode_chunk=encode_chunk,
                        **({"latent_chunk": latent_chunk} if latent_chunk is not None else {}))
        source = TokenArray(windows[0]) if is_tensor else tokens  # windows given: the source only serves the checks
        rows = ModelRows(model, [hook], source, n_ctx=n_ctx, prepend_bos=prepend_bos, keep_bos_rows=True, model_batch_size=batch_size,
                         dtype=torch.float32)
        if rows.d_hooks[0] != sae.cfg.d_in:
            raise ValueError(f"hook {hook!r} of this model has width {rows.d_hooks[0]}, but the SAE has d_in={sae.cfg.d_in}")
        fingerprint = sae_fingerprint(sae)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        work = sae if sae.W_dec.device == device else copy.deepcopy(sae).to(device)  # the caller's SAE stays put
        was_training = work.training
        work.eval()  # batchtopk / matryoshka: the inference threshold, not the batch's top-k
        model_device = torch.device(model.cfg.device)
        use_autocast = (device.type == "cuda") if autocast is None else autocast
        sweep = Sweep(work, n_top=n_top, n_quantile_bins=n_quantile_bins, per_bin=per_bin, context=tuple(context),
                      n_hist_bins=n_hist_bins, seed=seed, latent_chunk=latent_chunk or d_sae, encode_chunk=encode_chunk,
                      prepend_bos=prepend_bos, device=device)
        batches = _tensor_batches(windows, n_windows, batch_size) if is_tensor else \
            _source_batches(rows, n_windows, batch_size)
        bar = tqdm(total=n_windows * scored, desc="feature stats", unit="tok", disable=not show_progress)
        try:
            for batch in batches:
                batch = batch.to(model_device)
                with torch.autocast(model_device.type, dtype=torch.bfloat16, enabled=use_autocast and model_device.type == "cuda"):
                    acts = rows.run(batch)[0]
                sweep.add(batch, acts)
                bar.update(batch.shape[0] * scored)
            arrays = sweep.result()
            logits, note = logit_effects(model, work, n_logits, latent_chunk or max(1, 2 ** 26 // model.W_U.shape[1]), device)
        finally:
            bar.close()
            work.train(was_training)
        arrays.update(logits)
        meta = {
            "format": FORMAT, "d_sae": d_sae, "n_tokens": sweep.n_tokens, "sae_fingerprint": fingerprint,
            "sae_config": sae.cfg.to_dict(), "hook": hook,
            "model": getattr(model, "sae_widgets_name", type(model).__name__),
            "tokens": {"kind": "windows", "shape": list(windows.shape)} if is_tensor else tokens.describe(),
            "settings": {"n_ctx": n_ctx, "prepend_bos": prepend_bos, "n_top": n_top, "n_quantile_bins": n_quantile_bins,
                         "per_bin": per_bin, "context": list(context), "n_hist_bins": n_hist_bins, "n_logits": n_logits,
                         "seed": seed},
            "logits_note": note, "token_strings": token_strings(model),
        }
        from . import __version__

        meta["sae_widgets_version"] = __version__
        return cls(arrays, meta)

    # ------------------------------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file (arrays + JSON metadata in its header) atomically; a folder gets FILE_NAME.
        A failed write is a one-line OSError, and the file there before (if any) is left as it was."""
        file = resolve_file(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        arrays = dict(self._arrays)
        for name in LAZY:
            arrays[name] = self._full(name)
        meta = json.dumps(self.meta)
        had = file.is_file()
        try:
            save_safetensors_atomic(file, arrays, metadata={"format": FORMAT, "meta": meta, META_DIGEST: _sha256(meta)})
        except OSError as e:
            advice = "free space" if e.errno == errno.ENOSPC else "fix the disk"
            before = "the file there before is unchanged" if had else "no file was written"
            raise OSError(e.errno, f"could not save feature statistics to {file}: {e.strerror}; {before}; "
                                   f"{advice} and save again") from e
        return file

    @classmethod
    def load(cls, path: str | os.PathLike, sae=None, verify: bool = True) -> FeatureStats:
        """Open stats saved by `save`; with `sae`, check they were computed for that very SAE.

        The header's JSON is checked against its digest; with `verify` the arrays are too, in one pass that reads
        the file a tensor at a time (about a second per GB, peak memory one array); the big context arrays are then
        still read per latent, on demand. `verify=False` skips that pass for a large file you trust.
        """
        from safetensors import SafetensorError, safe_open

        from .atomic import check_digest_field

        file = resolve_file(path)
        if not file.is_file():
            raise FileNotFoundError(f"no feature statistics at {file}")
        header = safetensors_metadata(file)  # a ValueError naming the file when the header is unreadable
        if header.get("format") != FORMAT:
            raise ValueError(f"{file} has format {header.get('format')!r}, expected {FORMAT!r}")
        meta_digested = check_digest_field(file, header, META_DIGEST)
        check_digest_field(file, header, DIGEST_KEY, required=meta_digested)
        if meta_digested and _sha256(header.get("meta", "")) != header[META_DIGEST]:
            raise ValueError(f"{file} is corrupt: its metadata does not match the digest it was written with; "
                             f"compute the statistics again")
        try:
            handle = safe_open(str(file), framework="pt")
            if verify and DIGEST_KEY in header and tensors_digest(_TensorsOnDemand(handle)) != header[DIGEST_KEY]:
                raise ValueError("its arrays do not match the digest they were written with")
            arrays = {k: handle.get_tensor(k) for k in handle.keys() if k not in LAZY}
            stats = cls(arrays, json.loads(header["meta"]), lazy=handle)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise ValueError(f"{file} is not readable feature statistics (damaged?): {e}; "
                             f"compute the statistics again") from e
        if sae is not None:
            stats.check_sae(sae)
        return stats

    def check_sae(self, sae) -> None:
        """ValueError unless these statistics were computed for `sae` (same config and weights)."""
        if sae.cfg.d_sae != self.d_sae:
            raise ValueError(f"these feature statistics cover d_sae={self.d_sae} latents, but the SAE has "
                             f"d_sae={sae.cfg.d_sae}: they were computed for another SAE")
        fp = sae_fingerprint(sae)
        if fp != self.sae_fingerprint:
            raise ValueError(f"these feature statistics were computed for another SAE (fingerprint "
                             f"{self.sae_fingerprint[:16]}…, hook {self.meta['hook']!r}); this SAE's fingerprint is "
                             f"{fp[:16]}…. Recompute them with FeatureStats.compute(model, sae, tokens)")

    def _full(self, name: str) -> torch.Tensor:
        return self._arrays[name] if name in self._arrays else self._lazy.get_tensor(name)

    def _row(self, name: str, i: int) -> torch.Tensor:
        if name in self._arrays:
            return self._arrays[name][i]
        return self._lazy.get_slice(name)[i:i + 1][0]

    # ------------------------------------------------------------------------------------------ views
    def _index(self, i) -> int:
        try:
            i = operator.index(i)
        except TypeError:
            raise TypeError(f"latent index must be an integer, got {i!r}") from None
        if not 0 <= i < self.d_sae:
            raise IndexError(f"latent index {i} is out of range: valid latents are 0..{self.d_sae - 1}")
        return i

    def _context(self, ids: torch.Tensor, acts: torch.Tensor, value: float) -> dict[str, Any]:
        valid = (ids >= 0).nonzero().squeeze(1)
        first, last = int(valid[0]), int(valid[-1]) + 1
        return {"tokens": [self.token_strings[t] for t in ids[first:last].tolist()],
                "acts": acts[first:last].tolist(), "peak": self.settings["context"][0] - first, "act": float(value)}

    def _top_entries(self, i: int) -> Iterator[tuple[dict[str, Any], int]]:
        token, value = self._arrays["top_token"][i], self._arrays["top_value"][i]
        ids, acts = self._row("top_ctx_ids", i), self._row("top_ctx_acts", i)
        for s in (token >= 0).nonzero().squeeze(1).tolist():
            yield self._context(ids[s], acts[s], value[s]), int(token[s])

    def _quantile_entries(self, i: int) -> list[tuple[float, float, list[tuple[dict[str, Any], int]]]]:
        """Bins from the highest to the lowest; contexts in a bin by activation, highest first."""
        size, lo, hi = self._arrays["q_size"][i], self._arrays["q_lo"][i], self._arrays["q_hi"][i]
        token, value = self._arrays["q_token"][i], self._arrays["q_value"][i]
        ids, acts = self._row("q_ctx_ids", i), self._row("q_ctx_acts", i)
        out = []
        for b in reversed(range(size.numel())):
            if int(size[b]) == 0:
                continue
            entries = [(self._context(ids[b, s], acts[b, s], value[b, s]), int(token[b, s]))
                       for s in (token[b] >= 0).nonzero().squeeze(1).tolist()]
            entries.sort(key=lambda e: (-e[0]["act"], e[1]))
            out.append((float(lo[b]), float(hi[b]), entries))
        return out

    def _top_token_ids(self, i: int) -> list[int]:
        peaks = self._arrays["top_peak_ids"][i][self._arrays["top_token"][i] >= 0].tolist()
        return [t for t, _ in Counter(peaks).most_common(TOP_TOKENS_SHOWN)]

    def feature(self, i: int) -> dict[str, Any]:
        """Everything the dashboard shows for latent `i`, JSON-serialisable (see the module docstring)."""
        i = self._index(i)
        a = self._arrays
        count = int(a["count"][i])
        logits = {sign: [{"token": self.token_strings[t], "value": float(v)}
                         for t, v in zip(a[f"logit_{sign[:3]}_ids"][i].tolist(), a[f"logit_{sign[:3]}_values"][i].tolist())]
                  for sign in ("positive", "negative")}
        return {
            "latent": i, "density": count / self.n_tokens, "max_act": float(a["max_act"][i]),
            "mean_act": float(a["sum_act"][i]) / count if count else 0.0,
            "histogram": {"edges": a["hist_edges"][i].tolist(), "counts": a["hist_counts"][i].tolist()},
            "top_contexts": [c for c, _ in self._top_entries(i)],
            "quantiles": [{"lo": lo, "hi": hi, "contexts": [c for c, _ in entries]}
                          for lo, hi, entries in self._quantile_entries(i)],
            "logits": logits,
            "top_tokens": [self.token_strings[t] for t in self._top_token_ids(i)],
        }

    def context_positions(self, i: int) -> dict[str, Any]:
        """(window, position) of every context of `feature(i)`, in the same order: where in the swept tokens they are."""
        i = self._index(i)
        n_ctx = self.settings["n_ctx"]
        return {"top": [divmod(t, n_ctx) for _, t in self._top_entries(i)],
                "quantiles": [[divmod(t, n_ctx) for _, t in entries] for _, _, entries in self._quantile_entries(i)]}

    def columns(self) -> dict[str, Any]:
        """The feature browser's table: one entry per latent."""
        if self._columns is None:
            a = self._arrays
            count = a["count"].double()
            short = []
            for i in range(self.d_sae):
                words = [self.token_strings[t].strip() or repr(self.token_strings[t]) for t in self._top_token_ids(i)[:3]]
                short.append(" / ".join(words))
            self._columns = {
                "latent": np.arange(self.d_sae), "density": (count / self.n_tokens).numpy(),
                "max_act": a["max_act"].double().numpy(),
                "mean_act": torch.where(count > 0, a["sum_act"] / count.clamp_min(1), 0.0).numpy(),
                "top_tokens": short,
            }
        return self._columns

    def __repr__(self) -> str:
        alive = int((self._arrays["count"] > 0).sum())
        return (f"FeatureStats(d_sae={self.d_sae}, n_tokens={self.n_tokens}, alive={alive}, "
                f"hook={self.meta.get('hook')!r})")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class _TensorsOnDemand(Mapping):
    """The tensors of an open safetensors file as a mapping that reads each one only when asked, so
    `tensors_digest` hashes a large file holding one array at a time."""

    def __init__(self, handle):
        self._handle = handle

    def __iter__(self):
        return iter(self._handle.keys())

    def __len__(self) -> int:
        return len(self._handle.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handle.get_tensor(name)


# ----------------------------------------------------------------------------------------------- token windows
def _check_windows(windows: torch.Tensor, model, n_ctx: int | None) -> torch.Tensor:
    if windows.dtype.is_floating_point or windows.dtype == torch.bool:
        raise TypeError(f"token windows must be integer ids, got dtype {windows.dtype}")
    if windows.dim() != 2:
        raise ValueError(f"token windows must be a 2-D tensor [n_windows, n_ctx], got shape {tuple(windows.shape)}")
    if windows.numel() == 0:
        raise ValueError(f"the token set is empty (windows of shape {tuple(windows.shape)}): nothing to compute stats on")
    if n_ctx is not None and n_ctx != windows.shape[1]:
        raise ValueError(f"n_ctx={n_ctx} differs from the windows' width {windows.shape[1]}")
    d_vocab = model.cfg.d_vocab
    lo, hi = int(windows.min()), int(windows.max())
    if lo < 0 or hi >= d_vocab:
        raise ValueError(f"token ids must lie in 0..{d_vocab - 1} (the model's vocabulary), found {lo if lo < 0 else hi}")
    return windows.long()


def _tensor_batches(windows: torch.Tensor, n_windows: int, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, n_windows, batch_size):
        yield windows[start:min(start + batch_size, n_windows)]


def _source_batches(rows, n_windows: int, batch_size: int) -> Iterator[torch.Tensor]:
    done = 0
    for batch in rows.window_batches(batch_size):
        if done >= n_windows:
            return
        batch = batch[: n_windows - done]
        done += batch.shape[0]
        yield batch
