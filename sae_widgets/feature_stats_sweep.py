"""The sweep behind `FeatureStats`: one pass over the tokens for all latents at once, on the GPU when there is one.

Per model batch, the SAE's activations are kept only as their nonzero entries (token, latent, value), and every
statistic is computed from those, so the cost follows the number of firings, not tokens × d_sae:
- counts, sums, max and a fine log-spaced histogram per latent (index_add / scatter_reduce, no per-latent loop);
- per latent, the top-n activations and a uniform sample of its firings (the smallest keys of a hash of (token,
  latent, seed)), each kept in a fixed-size table and merged with a batch's candidates by one segmented sort;
- an entry that enters a table brings its context: the tokens around it and that latent's activations there,
  looked up in the batch's entries sorted by (token, latent).
Ties break towards the earlier token, so results do not depend on how tokens or latents are chunked.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

EMPTY_KEY = 1 << 40   # larger than every real key: empty table slots sort last
SEGMENT_SHIFT = 41    # composite sort key = segment << 41 | key
HIST_LOG10_LO, HIST_DECADES, HIST_PER_DECADE = -8, 16, 64  # fine grid: 1e-8 .. 1e8, 64 bins a decade (3.7 % wide)
N_FINE = HIST_DECADES * HIST_PER_DECADE
QUANTILE_OVERSAMPLE = 4  # the uniform sample holds 4× the contexts shown, so its quantile bins are estimated well
_M32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------- keys
def fine_edges(n: int) -> torch.Tensor:
    """Edges 0..n-1 of the fine log grid as float32 (the values compared against, so bins are exact)."""
    k = torch.arange(n, dtype=torch.float64)
    return (10.0 ** (HIST_LOG10_LO + k / HIST_PER_DECADE)).float()


def descending_value_key(v: torch.Tensor) -> torch.Tensor:
    """An int64 key that sorts positive float32 values from largest to smallest (their bit patterns are monotonic)."""
    return 0x7FFFFFFF - v.float().contiguous().view(torch.int32).long()


def _mix32(h: torch.Tensor) -> torch.Tensor:
    h = h & _M32
    h = ((h >> 16) ^ h) * 0x45D9F3B & _M32  # constants below 2^31: int64 products never overflow
    h = ((h >> 16) ^ h) * 0x45D9F3B & _M32
    return (h >> 16) ^ h


def sample_key(token: torch.Tensor, latent: torch.Tensor, seed: int) -> torch.Tensor:
    """A 31-bit hash of (global token index, latent, seed): the priority of the uniform sample, the same for any
    chunking (a random draw per chunk would not be)."""
    h = _mix32(token & _M32)
    h = _mix32(h ^ (token >> 32))
    h = _mix32(h ^ latent)
    h = _mix32(h ^ (seed & _M32))
    return h & 0x7FFFFFFF


# ----------------------------------------------------------------------------------------------- batch entries
class BatchEntries:
    """The nonzero activations of one model batch (BOS rows dropped), sorted by (token, latent), with its tokens."""

    def __init__(self, token: torch.Tensor, latent: torch.Tensor, value: torch.Tensor, tokens: torch.Tensor, d_sae: int):
        self.n_ctx = tokens.shape[1]
        self.tokens = tokens.reshape(-1).to(torch.int32)
        self.d_sae = d_sae
        key = token * d_sae + latent
        order = torch.argsort(key)
        self.key, self.value = key[order], value[order]
        self.token, self.latent = token[order], latent[order]

    def contexts(self, token: torch.Tensor, latent: torch.Tensor, left: int, right: int):
        """(token ids [n, left+1+right] int32, the latent's activations there [n, ...] float32) around each entry;
        positions outside the window get id -1 and activation 0."""
        offs = torch.arange(-left, right + 1, device=token.device)
        pos = (token % self.n_ctx)[:, None] + offs
        valid = (pos >= 0) & (pos < self.n_ctx)
        t = torch.where(valid, token[:, None] + offs, token[:, None])
        ids = torch.where(valid, self.tokens[t], -1)
        q = t * self.d_sae + latent[:, None]
        if self.key.numel() == 0:
            return ids, torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        at = torch.searchsorted(self.key, q).clamp_max(self.key.numel() - 1)
        hit = (self.key[at] == q) & valid
        return ids, torch.where(hit, self.value[at], 0.0).float()


# ----------------------------------------------------------------------------------------------- tables
class BestTable:
    """Per latent, the `cap` entries with the smallest keys seen so far (ties: the earlier token), with contexts.

    key / token / value are kept in rank order; a context stays in the storage slot where it was written and `slot`
    says which, so a merge writes only the contexts of new entries, into the slots of the entries they evict."""

    def __init__(self, d_sae: int, cap: int, ctx_len: int, device: torch.device):
        self.cap = cap
        self.key = torch.full((d_sae, cap), EMPTY_KEY, dtype=torch.int64, device=device)
        self.token = torch.full((d_sae, cap), -1, dtype=torch.int64, device=device)
        self.value = torch.zeros(d_sae, cap, dtype=torch.float32, device=device)
        self.slot = torch.arange(cap, device=device).repeat(d_sae, 1)
        self.ctx_ids = torch.full((d_sae, cap, ctx_len), -1, dtype=torch.int32, device=device)
        self.ctx_acts = torch.zeros(d_sae, cap, ctx_len, dtype=torch.float32, device=device)

    def offer(self, latent: torch.Tensor, key: torch.Tensor, token: torch.Tensor, value: torch.Tensor,
              contexts: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Merge candidates given in token order; `contexts(idx)` returns the contexts of candidates `idx`."""
        idx = (key < self.key[latent, -1]).nonzero().squeeze(1)  # only those that beat the latent's worst entry
        if idx.numel() == 0:
            return
        device, cap = key.device, self.cap
        rows, new_segment = torch.unique(latent[idx], return_inverse=True)
        n_rows = rows.numel()
        n_old = n_rows * cap
        segment = torch.cat([torch.arange(n_rows, device=device).repeat_interleave(cap), new_segment])
        keys = torch.cat([self.key[rows].reshape(-1), key[idx]])
        # old entries come first and are older: a stable sort breaks ties towards the earlier token
        order = torch.argsort(segment * (1 << SEGMENT_SHIFT) + keys, stable=True)
        seg_sorted = segment[order]
        counts = torch.bincount(seg_sorted, minlength=n_rows)
        rank = torch.arange(order.numel(), device=device) - (counts.cumsum(0) - counts)[seg_sorted]
        chosen = order[rank < cap].view(n_rows, cap)  # every segment has cap old entries, empty ones included
        is_new = chosen >= n_old
        kept = torch.zeros(n_old + idx.numel(), dtype=torch.bool, device=device)
        kept[chosen.reshape(-1)] = True
        old_slot = self.slot[rows]
        # each row evicts as many old entries as it keeps new ones; both lists run row by row, so they pair up
        freed = old_slot[~kept[:n_old].view(n_rows, cap)]
        slots = torch.cat([old_slot.reshape(-1), torch.empty(idx.numel(), dtype=torch.int64, device=device)])
        slots[chosen[is_new]] = freed
        self.key[rows] = keys[chosen]
        self.token[rows] = torch.cat([self.token[rows].reshape(-1), token[idx]])[chosen]
        self.value[rows] = torch.cat([self.value[rows].reshape(-1), value[idx].float()])[chosen]
        self.slot[rows] = slots[chosen]
        new_ids, new_acts = contexts(idx[chosen[is_new] - n_old])
        new_rows = rows[is_new.nonzero()[:, 0]]
        self.ctx_ids[new_rows, freed] = new_ids.to(self.ctx_ids.dtype)
        self.ctx_acts[new_rows, freed] = new_acts.to(self.ctx_acts.dtype)

    def ranked(self, table: torch.Tensor) -> torch.Tensor:
        """A context table [d_sae, cap, ctx_len] in rank order."""
        return table.gather(1, self.slot[:, :, None].expand(-1, -1, table.shape[2]))


# ----------------------------------------------------------------------------------------------- the sweep
def encode_entries(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, latent, value) of the nonzero activations of rows `x`; TopK SAEs on the kernels never go dense."""
    if sae.cfg.arch in ("topk", "abstopk") and sae.uses_triton(x):
        values, indices = sae.encode_sparse(x)
        nz = values != 0
        rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(indices)
        return rows[nz], indices[nz].long(), values[nz].float()
    f = sae.encode(x)
    rows, latents = f.nonzero(as_tuple=True)
    return rows, latents, f[rows, latents].float()


class Sweep:
    """Accumulators of one statistics pass; `add(tokens, acts)` per model batch, `result()` at the end."""

    def __init__(self, sae, *, n_top: int, n_quantile_bins: int, per_bin: int, context: tuple[int, int],
                 n_hist_bins: int, seed: int, latent_chunk: int, encode_chunk: int, prepend_bos: bool,
                 device: torch.device):
        d = sae.cfg.d_sae
        self.sae, self.d_sae, self.device = sae, d, device
        self.left, self.right = context
        self.n_top, self.n_bins, self.per_bin, self.n_hist_bins = n_top, n_quantile_bins, per_bin, n_hist_bins
        self.seed, self.latent_chunk, self.encode_chunk, self.prepend_bos = seed, latent_chunk, encode_chunk, prepend_bos
        ctx_len = self.left + 1 + self.right
        self.count = torch.zeros(d, dtype=torch.int64, device=device)
        self.sum_act = torch.zeros(d, dtype=torch.float64, device=device)
        self.max_act = torch.zeros(d, dtype=torch.float32, device=device)
        self.min_act = torch.full((d,), float("inf"), dtype=torch.float32, device=device)
        self.fine = torch.zeros(d * N_FINE, dtype=torch.int64, device=device)
        self.fine_edges = fine_edges(N_FINE + 1).to(device)
        self.top = BestTable(d, n_top, ctx_len, device)
        self.sample = BestTable(d, n_quantile_bins * per_bin * QUANTILE_OVERSAMPLE, ctx_len, device)
        self.n_tokens = 0
        self.tokens_seen = 0  # global index of the next batch's first token (BOS positions included)

    @torch.no_grad()
    def add(self, tokens: torch.Tensor, acts: torch.Tensor) -> None:
        """One model batch: windows `tokens` [b, n_ctx] and the hook's activations [b, n_ctx, d_in]."""
        b, n_ctx = tokens.shape
        x = acts.reshape(b * n_ctx, -1).to(self.device, torch.float32)
        parts = []
        for start in range(0, x.shape[0], self.encode_chunk):
            r, j, v = encode_entries(self.sae, x[start:start + self.encode_chunk])
            parts.append((r + start, j, v))
        row, lat, val = (torch.cat(p) for p in zip(*parts))
        keep = val != 0
        if self.prepend_bos:
            keep &= row % n_ctx != 0
        row, lat, val = row[keep], lat[keep], val[keep]
        entries = BatchEntries(row, lat, val, tokens.to(self.device), self.d_sae)
        fire = entries.value > 0
        t, j, v = entries.token[fire], entries.latent[fire], entries.value[fire]
        self._accumulate(j, v)
        t_global = t + self.tokens_seen
        ctx = lambda idx: entries.contexts(t[idx], j[idx], self.left, self.right)  # noqa: E731
        for sel in self._latent_ranges(j):
            sub = (lambda idx, sel=sel: ctx(sel[idx])) if sel is not None else ctx
            js, ts, vs = (j, t_global, v) if sel is None else (j[sel], t_global[sel], v[sel])
            self.top.offer(js, descending_value_key(vs), ts, vs, sub)
            self.sample.offer(js, sample_key(ts, js, self.seed), ts, vs, sub)
        self.n_tokens += b * (n_ctx - int(self.prepend_bos))
        self.tokens_seen += b * n_ctx

    def _latent_ranges(self, j: torch.Tensor) -> Iterable[torch.Tensor | None]:
        """Entry indices per latent range of `latent_chunk` (token order kept), bounding the merges' memory."""
        if self.latent_chunk >= self.d_sae:
            yield None
            return
        order = torch.argsort(j, stable=True)
        bounds = torch.searchsorted(j[order], torch.arange(0, self.d_sae + self.latent_chunk, self.latent_chunk,
                                                           device=j.device)).tolist()
        for lo, hi in zip(bounds, bounds[1:]):
            if hi > lo:
                yield order[lo:hi]

    def _accumulate(self, j: torch.Tensor, v: torch.Tensor) -> None:
        self.count.index_add_(0, j, torch.ones_like(j))
        self.sum_act.index_add_(0, j, v.double())
        self.max_act.scatter_reduce_(0, j, v, "amax")
        self.min_act.scatter_reduce_(0, j, v, "amin")
        fine_bin = (torch.bucketize(v, self.fine_edges, right=True) - 1).clamp(0, N_FINE - 1)
        self.fine.index_add_(0, j * N_FINE + fine_bin, torch.ones_like(j))

    # ------------------------------------------------------------------------------------------ results
    @torch.no_grad()
    def result(self) -> dict[str, torch.Tensor]:
        """Every per-latent array FeatureStats stores, on the CPU."""
        edges, counts = self._histogram()
        q = self._quantiles()
        top = self.top
        top_ids = top.ranked(top.ctx_ids)
        out = {"count": self.count, "sum_act": self.sum_act, "max_act": self.max_act,
               "hist_edges": edges, "hist_counts": counts,
               "top_value": top.value, "top_token": top.token, "top_ctx_ids": top_ids,
               "top_ctx_acts": top.ranked(top.ctx_acts), "top_peak_ids": top_ids[:, :, self.left], **q}
        return {k: v.cpu().contiguous() for k, v in out.items()}

    def _histogram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per latent, `n_hist_bins` log-spaced bins from the fine grid: each is a whole number of fine bins, so the
        counts are exact and the edges are grid edges (the first/last stretched to out-of-grid values, if any).
        The bins cover the latent's range, centred where the whole bins are wider than it."""
        nb, d = self.n_hist_bins, self.d_sae
        fine = self.fine.view(d, N_FINE)
        nonzero = fine > 0
        alive = nonzero.any(1)
        first = nonzero.int().argmax(1)
        last = N_FINE - 1 - nonzero.flip(1).int().argmax(1)
        span = last - first + 1
        width = (span + nb - 1) // nb  # fine bins per bin
        start = (first - (width * nb - span) // 2).clamp_min(0)
        coarse = ((torch.arange(N_FINE, device=fine.device) - start[:, None]) // width[:, None]).clamp(0, nb - 1)
        counts = torch.zeros(d, nb, dtype=torch.int64, device=fine.device).scatter_add_(1, coarse, fine)
        table = fine_edges(2 * N_FINE + nb + 1).to(fine.device)
        edges = table[start[:, None] + width[:, None] * torch.arange(nb + 1, device=fine.device)]
        edges[:, 0] = torch.minimum(edges[:, 0], self.min_act)  # below the grid: the first bin starts at the min
        above = self.max_act >= edges[:, -1]  # above the grid: the last bin ends just past the max
        edges[:, -1] = torch.where(above, torch.nextafter(self.max_act, torch.tensor(float("inf"), device=fine.device)),
                                   edges[:, -1])
        edges[~alive] = 0.0
        counts[~alive] = 0
        return edges, counts

    def _quantiles(self) -> dict[str, torch.Tensor]:
        """Split each latent's uniform sample into `n_quantile_bins` equal-count bins by activation and keep the
        `per_bin` of each bin with the smallest sample keys (a uniform pick within the bin)."""
        s, d, nb, pb = self.sample, self.d_sae, self.n_bins, self.per_bin
        dev, cap = s.key.device, s.cap
        empty = s.token < 0
        m = (~empty).sum(1, keepdim=True)
        by_token = torch.argsort(torch.where(empty, torch.iinfo(torch.int64).max, s.token), dim=1, stable=True)
        vals = torch.where(empty, float("inf"), s.value).gather(1, by_token)
        perm = by_token.gather(1, torch.argsort(vals, dim=1, stable=True))  # slots by (value, token), empties last
        rank = torch.arange(cap, device=dev)[None]
        group = torch.where(rank < m, rank * nb // m.clamp_min(1), nb)  # nb = no group
        value_p = s.value.gather(1, perm)
        lo = torch.zeros(d, nb + 1, device=dev).scatter_reduce_(1, group, value_p, "amin", include_self=False)
        hi = torch.zeros(d, nb + 1, device=dev).scatter_reduce_(1, group, value_p, "amax", include_self=False)
        order = torch.argsort(group * (1 << SEGMENT_SHIFT) + s.key.gather(1, perm), dim=1, stable=True)
        g = group.gather(1, order)
        sizes = torch.zeros(d, nb + 1, dtype=torch.int64, device=dev).scatter_add_(1, group, torch.ones_like(group))
        in_group = rank - (sizes.cumsum(1) - sizes).gather(1, g)
        picked = (in_group < pb) & (g < nb)
        place = torch.where(picked, g * pb + in_group, nb * pb)  # the extra column collects the rest
        slot = torch.full((d, nb * pb + 1), -1, dtype=torch.int64, device=dev)
        slot.scatter_(1, place, perm.gather(1, order))
        slot = slot[:, :-1]
        has = slot >= 0
        src = slot.clamp_min(0)

        def pick(t: torch.Tensor, fill) -> torch.Tensor:
            flat = t.reshape(d, cap, -1).gather(1, src[:, :, None].expand(-1, -1, t.reshape(d, cap, -1).shape[2]))
            flat = torch.where(has[:, :, None], flat, torch.as_tensor(fill, dtype=t.dtype, device=dev))
            return flat.view(d, nb, pb, *t.shape[2:])

        return {"q_lo": lo[:, :nb], "q_hi": hi[:, :nb], "q_size": sizes[:, :nb],
                "q_value": pick(s.value, 0.0), "q_token": pick(s.token, -1),
                "q_ctx_ids": pick(s.ranked(s.ctx_ids), -1), "q_ctx_acts": pick(s.ranked(s.ctx_acts), 0.0)}


# ----------------------------------------------------------------------------------------------- logit effects
PROBE_NORM = 64.0  # the probe's input RMS: the norm's eps (<= 1e-5) changes its response by eps / 2·64² < 1e-9


@dataclass(frozen=True)
class FinalNormMap:
    """What the final norm does to a change of its input, up to its positive denominator: remove the mean (if
    `centres`), then multiply elementwise by `scale` [d_model]. Ones where a fold (fold_ln) moved the weight into
    W_U; 1 + w for Gemma's RMSNorm; w for LayerNorm and RMSNorm. `note` says why there is no map (scale None)."""

    scale: torch.Tensor | None
    centres: bool
    note: str = ""

    def apply(self, directions: torch.Tensor) -> torch.Tensor:
        """The directions [n, d_model] as the norm passes them on to W_U."""
        if self.centres:
            directions = directions - directions.mean(-1, keepdim=True)
        return directions * self.scale.to(directions.device)


def _unit_zero_mean(v: torch.Tensor) -> torch.Tensor:
    v = v - v.mean()
    return v / v.pow(2).mean().sqrt()


@torch.no_grad()
def final_norm_map(model) -> FinalNormMap:
    """Read the final norm's map off the module itself (`model.ln_final`, a TransformerBridge component or a
    HookedTransformer-style module; none: the identity), so no per-family formula can be wrong.

    For v zero-mean with unit RMS, LayerNorm, RMSNorm and Gemma's (1 + w) RMSNorm all give
    f(c·v) − f(−c·v) = 2·scale·v for any large c (bias and eps cancel or vanish), so scale = that difference / 2v;
    a module that does not normalise (Identity) gives c times that. The norm removes the mean when f(c·v + c)
    equals f(c·v). A second, random v checks that the module really is such a map."""
    d_model = model.cfg.d_model
    ln = getattr(model, "ln_final", None)
    if ln is None:
        return FinalNormMap(torch.ones(d_model), centres=False)
    param = next(iter(ln.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device(model.cfg.device)
    alternating = torch.where(torch.arange(d_model) % 2 == 0, 1.0, -1.0).double()
    check = torch.randn(d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v, u = _unit_zero_mean(alternating), _unit_zero_mean(check)  # v's entries are all near ±1: a safe divisor
    c = PROBE_NORM
    probes = torch.stack([c * v, -c * v, 2 * c * v, -2 * c * v, c * v + c, c * u, -c * u])
    out = ln(probes[None].to(device, dtype))[0].double().cpu()
    odd, odd_2c, odd_u = out[0] - out[1], out[2] - out[3], out[5] - out[6]
    growth = float(odd_2c.norm() / odd.norm())  # 1: a normalisation; 2: linear, no normalisation
    per_c = 1.0 if abs(growth - 1) < 0.05 else c if abs(growth - 2) < 0.1 else math.nan
    scale = odd / (2 * v * per_c)
    tol = 0.05 * float(scale.abs().max())  # loose enough for bf16 (2^-8), far below what a wrong map gives
    if not bool((odd_u / per_c - 2 * scale * u).abs().max() <= tol) or not tol > 0:
        return FinalNormMap(None, centres=False, note=(
            f"no logit effects: the final norm ({type(ln).__name__}) does not act as a normalisation followed by "
            f"an elementwise scale"))
    return FinalNormMap(scale.float(), centres=bool((out[4] - out[0]).abs().max() <= tol * per_c))


def residual_directions(model, sae) -> tuple[torch.Tensor | None, str]:
    """The decoder rows as directions in the residual stream [d_sae, d_model], or None with the reason."""
    w_dec = sae.W_dec.detach().float()
    out_hook = sae.cfg.out_hook or sae.cfg.hook
    d_model = model.cfg.d_model
    if out_hook.endswith("attn.hook_z"):  # per-head outputs: through W_O of that layer
        from .activations import hook_layer

        w_o = model.W_O[hook_layer(out_hook)].detach().float().to(w_dec.device)  # [n_heads, d_head, d_model]
        return torch.einsum("shd,hdm->sm", w_dec.view(w_dec.shape[0], *w_o.shape[:2]), w_o), ""
    if w_dec.shape[1] == d_model:
        return w_dec, ""
    return None, (f"no logit effects: the decoder writes to {out_hook!r} ({w_dec.shape[1]} wide), which is neither "
                  f"the residual stream (d_model={d_model}) nor attn.hook_z")


@torch.no_grad()
def logit_effects(model, sae, n_logits: int, latent_chunk: int, device: torch.device) -> tuple[dict[str, torch.Tensor], str]:
    """Top ± tokens of final_norm_map(model).apply(W_dec[i]) @ W_U for every latent (the change in logits that a
    small step along the latent's direction in the final residual makes, up to the norm's positive denominator),
    `latent_chunk` latents at a time."""
    d_sae = sae.cfg.d_sae
    directions, note = residual_directions(model, sae)
    w_u = model.W_U.detach().float().to(device)
    n = min(n_logits, w_u.shape[1])
    norm = final_norm_map(model) if directions is not None and n > 0 else None
    if norm is None or norm.scale is None:
        empty_i, empty_f = torch.zeros(d_sae, 0, dtype=torch.int32), torch.zeros(d_sae, 0)
        return {"logit_pos_ids": empty_i, "logit_pos_values": empty_f,
                "logit_neg_ids": empty_i.clone(), "logit_neg_values": empty_f.clone()}, norm.note if norm else note
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("pos_ids", "pos_values", "neg_ids", "neg_values")}
    for lo in range(0, d_sae, latent_chunk):
        effects = norm.apply(directions[lo:lo + latent_chunk].to(device)) @ w_u
        for sign, largest in (("pos", True), ("neg", False)):
            top = effects.topk(n, dim=1, largest=largest)
            parts[f"{sign}_ids"].append(top.indices.int().cpu())
            parts[f"{sign}_values"].append(top.values.cpu())
    return {f"logit_{k}": torch.cat(v) for k, v in parts.items()}, note
