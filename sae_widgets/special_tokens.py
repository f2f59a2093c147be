"""Which token starts a window (BOS), which one separates joined documents, and which tokens never become rows.

Document boundaries. A token that appears literally in the tokenizer's chat template is a chat-turn marker
(SmolLM2-Instruct's `<|im_start|>` / `<|im_end|>`, Gemma's `<start_of_turn>`), not a document boundary, even when
the tokenizer names it bos or eos; templates that mean the document start write `{{ bos_token }}`, not the literal
string, so a real BOS is never mistaken for a marker. Among the tokens that are not markers and lie inside the
model's vocabulary:

- BOS: the tokenizer's bos token, else its eos token, else a document token (begin-like first);
- separator: the tokenizer's eos token, else an end-like document token, else its bos token, else a begin-like one;
- document token: a special token spelled `<|endoftext|>`, `<|end_of_text|>`, `<eos>`, `</s>` (end-like) or
  `<|begin_of_text|>`, `<bos>`, `<s>` (begin-like): the pretraining document tokens of GPT-2, NeoX,
  StarCoder / SmolLM, Qwen, Llama, Gemma;
- else none, with a warning: windows then start with text, or documents are joined directly.

Without a tokenizer, the model config's bos_token_id / eos_token_id play the tokenizer's part. An explicit choice
(a token string or an id) always wins.

Excluded rows: by default every special token of the tokenizer (its bos / eos / pad / unk tokens and every added
token marked special; without a tokenizer, the config's bos / eos / pad ids), plus the BOS and separator in use, as
SAELens' `exclude_special_tokens=True` does.
"""
from __future__ import annotations

import operator
import re
import warnings
from dataclasses import dataclass
from typing import Any

_NAMED = re.compile(r"^<\|?([a-z_/]+)\|?>$")
_BEGIN_NAMES = ("begin_of_text", "bos", "s")
_END_NAMES = ("endoftext", "end_of_text", "eos", "/s")
# the order in which each role tries the tokenizer's named tokens ("bos" / "eos") and its document tokens (names)
_ORDER = {"bos": ("bos", "eos", _BEGIN_NAMES + _END_NAMES),
          "separator": ("eos", _END_NAMES, "bos", _BEGIN_NAMES)}


def model_tokenizer(model):
    """The model's tokenizer, or None for a model loaded without one."""
    return getattr(model, "tokenizer", None)


def _hf_config(model):
    return getattr(getattr(model, "original_model", None), "config", None)


def _config_id(model, name: str) -> int | None:
    value = getattr(_hf_config(model), name, None)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def chat_template_text(tokenizer) -> str:
    """Every chat template of the tokenizer as one string ('' when it has none)."""
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):
        return "\n".join(str(v) for v in t.values())
    return t or ""


def special_tokens(tokenizer) -> dict[int, str]:
    """id -> string of every special token: the named ones (bos, eos, pad, unk, ...) and added tokens marked special."""
    out = {int(i): str(s) for i, s in zip(tokenizer.all_special_ids, tokenizer.all_special_tokens) if i is not None}
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            out.setdefault(int(i), str(added.content))
    return out


def chat_markers(tokenizer) -> set[str]:
    """Special tokens written literally in the chat template: turn markers, never document boundaries."""
    template = chat_template_text(tokenizer)
    return {s for s in special_tokens(tokenizer).values() if s and s in template}


@dataclass(frozen=True)
class BoundaryTokens:
    """The BOS and separator ids chosen for a model (None: none), and why, for manifests and messages."""

    bos_id: int | None
    separator_id: int | None
    bos_reason: str
    separator_reason: str

    def describe(self) -> dict[str, Any]:
        """The ids only (manifests compare these; the reasons are for messages)."""
        return {"bos_id": self.bos_id, "separator_id": self.separator_id}


def token_id(model, token: str | int, what: str = "token") -> int:
    """The id of `token` (a token string, or an id) in this model's vocabulary; a clear error otherwise."""
    d_vocab = model.cfg.d_vocab
    if isinstance(token, bool):
        raise ValueError(f"{what}={token!r} must be a token string or an integer id")
    if isinstance(token, str):
        tok = model_tokenizer(model)
        if tok is None:
            raise ValueError(f"{what}={token!r} is a token string but the model has no tokenizer: give its integer id")
        ids = tok.convert_tokens_to_ids([token])
        if not ids or ids[0] is None or (tok.unk_token_id is not None and ids[0] == tok.unk_token_id
                                           and token != tok.unk_token):
            raise ValueError(f"{what}={token!r} is not a token of this tokenizer; give a token string it knows "
                             f"(e.g. {sorted(special_tokens(tok).values())[:8]}) or an integer id")
        token = ids[0]
    try:
        i = operator.index(token)
    except TypeError:
        raise ValueError(f"{what}={token!r} must be a token string or an integer id") from None
    if not 0 <= i < d_vocab:
        raise ValueError(f"{what}={i} is outside the model's vocabulary (ids 0..{d_vocab - 1})")
    return i


def _named_candidates(tokenizer, names: tuple[str, ...], markers: set[str]) -> list[tuple[int, str]]:
    found = []
    for i, s in special_tokens(tokenizer).items():
        m = _NAMED.match(s.lower())
        if m and m.group(1) in names and s not in markers:
            found.append((names.index(m.group(1)), i, s))
    return [(i, s) for _, i, s in sorted(found)]


def _choose(model, role: str) -> tuple[int | None, str]:
    """The first usable token for `role` ('bos' / 'separator') in the order of _ORDER, else None and why."""
    d_vocab = model.cfg.d_vocab
    tok = model_tokenizer(model)
    if tok is None:
        for name in ("bos", "eos") if role == "bos" else ("eos", "bos"):
            i = _config_id(model, f"{name}_token_id")
            if i is not None and 0 <= i < d_vocab:
                return i, f"the model config's {name}_token_id (no tokenizer)"
        return None, "no tokenizer and no bos_token_id / eos_token_id in the model config"
    markers = chat_markers(tok)
    skipped = []
    for step in _ORDER[role]:
        if isinstance(step, tuple):
            for i, s in _named_candidates(tok, step, markers):
                if i < d_vocab:
                    return i, f"the document token {s!r} ({'; '.join(skipped) or 'no bos / eos token'})"
            continue
        s, i = getattr(tok, f"{step}_token", None), getattr(tok, f"{step}_token_id", None)
        if s is None or i is None:
            continue
        if s in markers:
            skipped.append(f"{step} {s!r} is a chat-turn marker")
        elif i >= d_vocab:
            skipped.append(f"{step} {s!r} (id {i}) is outside the model's vocabulary")
        else:
            return int(i), f"the tokenizer's {step} token {s!r}"
    return None, "; ".join(dict.fromkeys(skipped)) or "the tokenizer has no bos / eos token"


def boundary_tokens(model, *, prepend_bos: bool = True, bos_token: str | int | None = None,
                    separator_token: str | int | None = None, warn: bool = True) -> BoundaryTokens:
    """The BOS (None unless `prepend_bos`) and the document separator for `model`, by the module's rule."""
    if bos_token is not None and prepend_bos:
        bos, bos_why = token_id(model, bos_token, "bos_token"), "given"
    elif prepend_bos:
        bos, bos_why = _choose(model, "bos")
        if bos is None and warn:
            warnings.warn(f"prepend_bos=True but this model has no usable BOS token ({bos_why}): windows start with "
                          f"text. Pass bos_token= (a token string or id) to choose one, or prepend_bos=False",
                          stacklevel=3)
    else:
        bos, bos_why = None, "prepend_bos=False"
    if separator_token is not None:
        sep, sep_why = token_id(model, separator_token, "separator_token"), "given"
    else:
        sep, sep_why = _choose(model, "separator")
        if sep is None and warn:
            warnings.warn(f"this model has no usable document separator ({sep_why}): documents are joined without "
                          f"one. Pass separator_token= (a token string or id) to choose one", stacklevel=3)
    return BoundaryTokens(bos, sep, bos_why, sep_why)


def excluded_token_ids(model, boundaries: BoundaryTokens, *, exclude_special_tokens: bool = True,
                       exclude_token_ids=None) -> list[int]:
    """Sorted ids whose rows are dropped: the special tokens (when `exclude_special_tokens`) plus `exclude_token_ids`."""
    ids = {token_id(model, t, "exclude_token_ids entry") for t in (exclude_token_ids or [])}
    if exclude_special_tokens:
        tok = model_tokenizer(model)
        if tok is not None:
            ids |= set(special_tokens(tok))
        else:
            ids |= {i for i in (_config_id(model, f"{n}_token_id") for n in ("bos", "eos", "pad")) if i is not None}
        ids |= {i for i in (boundaries.bos_id, boundaries.separator_id) if i is not None}
    return sorted(i for i in ids if 0 <= i < model.cfg.d_vocab)
