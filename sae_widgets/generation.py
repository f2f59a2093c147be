"""Seeded text generation: a plain sampling loop over `run_with_hooks`, so any forward hooks steer every step.

There is no KV cache: each step runs the whole sequence again (cheap for small models), so a hook sees the full
sequence every time and an intervention that is a fixed function of the sequence steers every step alike.
Sampling draws from one `torch.Generator` seeded per call, so the same seed gives the same tokens, and a
baseline and a steered run with one seed differ only where the model's distributions differ.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .special_tokens import model_tokenizer
from .token_input import decode, prompt_tokens, token_ids, token_labels


@dataclass
class Generation:
    """One completion: the prompt's tokens, the new tokens and their text (JSON-friendly through `to_dict`).

    `prompt` is the text given, or the token ids given; without a tokenizer the new tokens read `#id`."""

    prompt: str | list[int]
    prompt_tokens: list[int]
    new_tokens: list[int]
    new_str_tokens: list[str]
    completion: str
    seed: int
    temperature: float
    top_p: float

    @property
    def text(self) -> str:
        prompt = self.prompt if isinstance(self.prompt, str) else " ".join(f"#{i}" for i in self.prompt) + " "
        return prompt + self.completion

    @property
    def tokens(self) -> list[int]:
        return self.prompt_tokens + self.new_tokens

    def to_dict(self) -> dict:
        return asdict(self) | {"text": self.text}


def check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    """Clear errors for sampling settings outside their ranges."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] (1 = no nucleus filtering)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")


def check_fits_context(model, tokens: torch.Tensor, has_bos: bool, max_new_tokens: int = 0,
                       what: str = "the prompt") -> None:
    """A one-line error when `tokens` [1, P] (plus `max_new_tokens`) overflow the model's context. It counts the
    prompt as given, BOS apart (as the PromptExplorer does), so a 12,001-token prompt is reported as 12001 tokens."""
    n_ctx, total = model.cfg.n_ctx, tokens.shape[1]
    if total + max_new_tokens <= n_ctx:
        return
    bos = int(has_bos)
    plus = f" + max_new_tokens={max_new_tokens}" if max_new_tokens else ""
    room = n_ctx - bos - max_new_tokens
    fix = (f"at most {room} tokens fit{f' with max_new_tokens={max_new_tokens}' if max_new_tokens else ''}"
           if room >= 1 else f"max_new_tokens must be below {n_ctx - bos}")
    raise ValueError(f"{what} has {total - bos} tokens{' plus BOS' if bos else ''}: {total}{plus} exceeds the model's "
                     f"context of {n_ctx} tokens; {fix} (nothing is cut off: shorten it"
                     f"{' or lower max_new_tokens' if max_new_tokens else ''})")


def next_token(logits: torch.Tensor, generator: torch.Generator, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row of `logits` [B, vocab]: argmax at temperature 0, else a nucleus (top-p) sample."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p
        sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)  # keep the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample(model, tokens: torch.Tensor, *, fwd_hooks: list[tuple[str, Callable]] | None = None, seed: int = 0,
           max_new_tokens: int = 32, temperature: float = 1.0, top_p: float = 1.0,
           stop_at_eos: bool = False) -> torch.Tensor:
    """Append `max_new_tokens` sampled tokens to each row of `tokens` [B, P]; returns the new tokens [B, n].

    One generator seeded with `seed` draws for the whole batch, so the result depends on (seed, B) and nothing else.
    With `stop_at_eos` the loop ends early once every row has produced the end-of-text token.
    """
    check_sampling(temperature, top_p, max_new_tokens)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed={seed!r} must be an int")
    n_ctx = model.cfg.n_ctx
    if tokens.shape[1] + max_new_tokens > n_ctx:
        raise ValueError(f"a prompt of {tokens.shape[1]} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                         f"model's context of {n_ctx} tokens")
    generator = torch.Generator(device=tokens.device).manual_seed(seed)
    eos = getattr(model_tokenizer(model), "eos_token_id", None)
    seq, done = tokens, torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for _ in range(max_new_tokens):
        logits = model.run_with_hooks(seq, fwd_hooks=list(fwd_hooks or []))[:, -1].float()
        nxt = next_token(logits, generator, temperature, top_p)
        seq = torch.cat([seq, nxt[:, None].to(seq.dtype)], dim=1)
        if stop_at_eos and eos is not None:
            done |= nxt == eos
            if bool(done.all()):
                break
    return seq[:, tokens.shape[1]:]


def generate_samples(model, sae, prompt, interventions=None, *, n_samples: int = 1, seed: int = 0,
                     max_new_tokens: int = 32, temperature: float = 1.0, top_p: float = 1.0,
                     prepend_bos: bool = True, stop_at_eos: bool = False) -> list[Generation]:
    """`n_samples` completions of `prompt` (text or token ids, see `token_input`) in one batch, with `interventions`
    (`LatentEdit` / `DirectionEdit`).

    Deterministic for (seed, n_samples); temperature 0 is greedy. List positions must lie inside the prompt (BOS
    is position 0 with `prepend_bos`). `sae` may be None when no edit is a latent edit. With `stop_at_eos` each
    completion ends at its first end-of-text token.
    """
    from .steering import steering_hooks

    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples={n_samples!r} must be an int >= 1")
    check_sampling(temperature, top_p, max_new_tokens)
    tokens, has_bos = prompt_tokens(model, prompt, prepend_bos=prepend_bos)
    check_fits_context(model, tokens, has_bos, max_new_tokens)
    hooks = steering_hooks(model, sae, interventions or [], prompt_len=tokens.shape[1], skip_bos=has_bos)
    new = sample(model, tokens.expand(n_samples, -1), fwd_hooks=hooks, seed=seed, max_new_tokens=max_new_tokens,
                 temperature=temperature, top_p=top_p, stop_at_eos=stop_at_eos).tolist()
    eos = getattr(model_tokenizer(model), "eos_token_id", None)
    given = prompt if isinstance(prompt, str) else token_ids(model, prompt)
    out = []
    for ids in new:
        if stop_at_eos and eos in ids:
            ids = ids[: ids.index(eos) + 1]
        out.append(Generation(prompt=given, prompt_tokens=tokens[0].tolist(), new_tokens=ids,
                              new_str_tokens=token_labels(model, ids), completion=decode(model, ids),
                              seed=seed, temperature=float(temperature), top_p=float(top_p)))
    return out


def generate(model, sae, prompt, interventions=None, *, seed: int = 0, max_new_tokens: int = 32,
             temperature: float = 1.0, top_p: float = 1.0, prepend_bos: bool = True,
             stop_at_eos: bool = False) -> Generation:
    """One completion of `prompt` with `interventions` (a list of `LatentEdit` / `DirectionEdit`; empty: baseline).

    Deterministic for a seed; temperature 0 is greedy. See `generate_samples`.
    """
    return generate_samples(model, sae, prompt, interventions, n_samples=1, seed=seed, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, prepend_bos=prepend_bos, stop_at_eos=stop_at_eos)[0]
