"""Text or token ids, wherever the toolkit takes a prompt: a tokenizer is optional.

A prompt is a string (tokenised without special tokens, as the activation store tokenises its documents) or token
ids: a list of ints, or a 1-D tensor / array (a 2-D one with a single row). With `prepend_bos`, the model's BOS (the
rule of `special_tokens.boundary_tokens`, the one the store puts at the start of every window) goes first, unless
the ids already start with it. Without a tokenizer, text is a one-line error, and tokens are shown as `#id`.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from .special_tokens import boundary_tokens, model_tokenizer


def require_tokenizer(model, what: str = "the prompt"):
    """The model's tokenizer, or a one-line error saying to give token ids instead."""
    tok = model_tokenizer(model)
    if tok is None:
        raise ValueError(f"{what} is text but the model was loaded without a tokenizer: give token ids (a list of "
                         f"ints or a 1-D tensor), or load the model with tokenizer=...")
    return tok


def is_token_ids(x) -> bool:
    """True for token ids (a sequence of ints, or an integer tensor / array), False for anything else."""
    if isinstance(x, str):
        return False
    if hasattr(x, "dtype") and hasattr(x, "shape"):
        t = torch.as_tensor(x)
        return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)
    if isinstance(x, Sequence) and x:
        try:
            return all(not isinstance(i, bool) and operator.index(i) is not None for i in x)
        except TypeError:
            return False
    return False


def token_ids(model, prompt, what: str = "prompt") -> list[int]:
    """The ids of `prompt` (text or ids), no BOS added; ids are checked against the model's vocabulary."""
    if isinstance(prompt, str):
        tok = require_tokenizer(model, what)
        return list(tok(prompt, add_special_tokens=False)["input_ids"])
    if not is_token_ids(prompt):
        raise ValueError(f"{what} must be text or token ids (a list of ints, or a 1-D integer tensor), got "
                         f"{type(prompt).__name__}: {prompt!r:.80}")
    t = torch.as_tensor(prompt)
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f"{what}: token ids must be 1-D (one sequence), got shape {tuple(t.shape)}")
    ids = t.tolist()
    d_vocab = model.cfg.d_vocab
    bad = [i for i in ids if not 0 <= i < d_vocab]
    if bad:
        raise ValueError(f"{what}: token id {bad[0]} is outside the model's vocabulary (ids 0..{d_vocab - 1})")
    return ids


def prompt_tokens(model, prompt, *, prepend_bos: bool = True, what: str = "prompt") -> tuple[torch.Tensor, bool]:
    """([1, P] int64 on the model's device, whether position 0 is BOS) for text or ids."""
    ids = token_ids(model, prompt, what)
    bos = boundary_tokens(model, prepend_bos=prepend_bos).bos_id if prepend_bos else None
    has_bos = bos is not None
    if has_bos and not (ids and ids[0] == bos):
        ids = [bos] + ids
    if not ids:
        raise ValueError(f"{what} is empty and there is no BOS to start from: give some text or token ids")
    return torch.tensor([ids], dtype=torch.long, device=model.cfg.device), has_bos


def token_labels(model, ids: Sequence[int]) -> list[str]:
    """Each id's text (the tokenizer's), or `#id` without a tokenizer."""
    tok = model_tokenizer(model)
    if tok is None:
        return [f"#{int(i)}" for i in ids]
    return [tok.decode([int(i)], clean_up_tokenization_spaces=False) for i in ids]


def decode(model, ids: Sequence[int]) -> str:
    """The text of `ids` (the tokenizer's), or their `#id` labels joined by spaces without a tokenizer."""
    tok = model_tokenizer(model)
    if tok is None:
        return " ".join(token_labels(model, ids))
    return tok.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)
