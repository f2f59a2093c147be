"""Token streams and fixed-length windows: one definition for model training, evaluation and the activation store.

Documents are joined into one stream with the end-of-text token between them. A window is `n_ctx` tokens;
with `bos_id` given, it is the BOS token followed by `n_ctx - 1` stream tokens, so position 0 is always BOS
(the way transformer_lens models are run by default).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def join_documents(token_lists: Iterable[Sequence[int]], sep_id: int | None) -> torch.Tensor:
    """Concatenate tokenised documents, each followed by `sep_id` (None: none), into one int64 stream."""
    out: list[int] = []
    for ids in token_lists:
        out.extend(ids)
        if sep_id is not None:
            out.append(sep_id)
    return torch.tensor(out, dtype=torch.long)


def window_body(n_ctx: int, bos_id: int | None) -> int:
    """How many stream tokens one window holds."""
    body = n_ctx - (bos_id is not None)
    if body < 1:
        raise ValueError(f"n_ctx={n_ctx} leaves no room for tokens (bos_id={bos_id})")
    return body


def chunk_windows(stream: torch.Tensor, n_ctx: int, bos_id: int | None) -> torch.Tensor:
    """Non-overlapping windows [n_windows, n_ctx] over `stream`; the tail shorter than a window is dropped."""
    body = window_body(n_ctx, bos_id)
    n = stream.numel() // body
    if n == 0:
        raise ValueError(f"a stream of {stream.numel()} tokens is shorter than one window of {body} tokens")
    w = stream[: n * body].view(n, body)
    if bos_id is not None:
        w = torch.cat([torch.full((n, 1), bos_id, dtype=w.dtype), w], dim=1)
    return w


def unigram_cross_entropy(train_stream: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of `targets` under the add-one-smoothed unigram distribution of `train_stream`."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    return float(-logp[targets.reshape(-1)].mean())
