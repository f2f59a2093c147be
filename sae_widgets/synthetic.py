"""Synthetic activations with known ground-truth features, for testing SAE training.

Every sample is a sparse, non-negative (or signed) mixture of known unit directions,

    x = sum_i c_i d_i  (+ optional isotropic Gaussian noise),

the setting of the toy models of superposition (Elhage et al. 2022, "Toy Models of Superposition") and of
the sparse-dictionary toy data of Sharkey, Braun & Millidge (2022, "Taking features out of superposition with
sparse autoencoders"). Because the directions are known, a trained SAE can be scored by how well its decoder
rows recover them (`recovery`: mean over true directions of the max cosine with any decoder row, the
"recovery (synthetic)" metric of the requirements). A trainer consumes `SyntheticActivations` exactly like
the activation store: `next_batch()`, `__iter__`, `state_dict()` / `load_state_dict()`, `d_in`, `d_out`.

    gen = SyntheticActivations(d_in=64, n_features=256, mean_active=5, batch_size=1024, seed=0)
    x = gen.next_batch()                 # [1024, 64] float32
    x, codes = gen.sample(4096)          # codes [4096, 256]: the ground-truth coefficients
    recovery(sae.W_dec, gen.directions)  # 1.0 = every true direction has a matching decoder row

How a sample is drawn (one seeded `torch.Generator` on `device`, so a resumed run replays bit-identically):
  1. activity: feature i fires with marginal probability `feature_probs[i]`. Features in a correlated group
     draw their firing through a Gaussian copula (see `correlation`); the others independently.
  2. hierarchy: a child fires only if its parent fires, then with conditional probability `p_child`.
  3. magnitudes: i.i.d. draws from the chosen distribution (non-negative), times a random sign if `signed`,
     drawn for the active entries only (cheap when n_features is large).
  4. x = codes @ directions, plus `noise_std` * N(0, I) if `noise_std` > 0.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["SyntheticActivations", "recovery", "recovery_per_direction"]

_MAGNITUDES = {  # kind -> default parameters
    "normal": (1.0, 0.25),     # |N(mean, std)|  (folded normal: always >= 0)
    "uniform": (0.5, 1.5),     # U[a, b], 0 <= a < b
    "exponential": (1.0,),     # Exp with this mean
    "constant": (1.0,),        # every active feature has this value
}
_HIERARCHY_DEFAULTS = {"n_parents": 0, "children_per_parent": 2, "p_child": 0.5}
_CORRELATION_DEFAULTS = {"n_groups": 0, "group_size": 4, "rho": 0.8}
_DATA_SEED_OFFSET = 0x9E3779B97F4A7C15  # the data stream is seeded apart from the structure (directions etc.)


def _fill(name: str, given: dict[str, Any] | None, defaults: dict[str, Any]) -> dict[str, Any] | None:
    if given is None:
        return None
    unknown = set(given) - set(defaults)
    if unknown:
        raise ValueError(f"{name}: unknown keys {sorted(unknown)}; allowed: {sorted(defaults)}")
    return {**defaults, **given}


class SyntheticActivations:
    """An endless stream of sparse mixtures of known unit directions, with the activation store's interface.

    Args:
        d_in: dimension of the activations.
        n_features: number of ground-truth directions (n_features > d_in puts them in superposition).
        batch_size: rows per `next_batch()`.
        p / mean_active: sparsity, as the mean firing probability over all features or, equivalently, the
            expected number of active features per sample (`mean_active = p * n_features`, hierarchy children
            included). Give at most one; default `mean_active = 5`.
        freq_decay: Zipf-like exponent a: before scaling, feature i (in index order) has weight (i + 1) ** -a,
            so feature 0 is the most frequent. 0 = all features equally frequent.
        magnitude, magnitude_params: distribution of an active feature's coefficient: "normal" (mean, std),
            folded to |.|; "uniform" (a, b); "exponential" (mean,); "constant" (value,). See `_MAGNITUDES`.
        signed: multiply each coefficient by an independent random sign (bidirectional features, AbsTopK).
        noise_std: per-coordinate std of isotropic Gaussian noise added to x (0 = exactly in the span).
        orthogonal: orthonormal directions (needs n_features <= d_in); otherwise normalised Gaussian rows.
        hierarchy: None, or {"n_parents", "children_per_parent" (2), "p_child" (0.5)}: parents are random
            features, each with its own random children; a child fires only when its parent fires, and then
            with probability `p_child` (so its marginal frequency is p_parent * p_child).
        correlation: None, or {"n_groups", "group_size" (4), "rho" (0.8)}: random disjoint groups of features
            (disjoint from the hierarchy too) whose firing is driven by a Gaussian copula: feature i fires when
            Phi(sqrt(rho) g + sqrt(1 - rho) e_i) < p_i, with g shared by the group and e_i its own. Marginal
            frequencies are unchanged; rho in [0, 1) sets how strongly the group co-fires.
        seed: seeds the structure (directions, groups, hierarchy; on CPU, so it is the same on every device)
            and, through a fixed offset, the data stream (a generator on `device`).
        device, dtype: where and in what dtype batches are returned (sampling happens on `device`, so the
            same seed gives the same data on the same kind of device, not across CPU and GPU).
    """

    hooks = ["synthetic"]
    paired = False  # batches are single tensors, never (x, y) pairs

    def __init__(self, d_in: int = 64, n_features: int = 256, *, batch_size: int = 1024, p: float | None = None,
                 mean_active: float | None = None, freq_decay: float = 0.0, magnitude: str = "normal",
                 magnitude_params: tuple[float, ...] | list[float] | None = None, signed: bool = False,
                 noise_std: float = 0.0, orthogonal: bool = False, hierarchy: dict[str, Any] | None = None,
                 correlation: dict[str, Any] | None = None, seed: int = 0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        if d_in < 1 or n_features < 1 or batch_size < 1:
            raise ValueError(f"need d_in, n_features, batch_size >= 1, got {d_in}, {n_features}, {batch_size}")
        if orthogonal and n_features > d_in:
            raise ValueError(f"orthogonal directions need n_features <= d_in, got {n_features} > {d_in}")
        if p is not None and mean_active is not None:
            raise ValueError("give p or mean_active, not both")
        if p is not None:
            if not 0 < p <= 1:
                raise ValueError(f"p={p} must be in (0, 1]")
            mean_active = p * n_features
        mean_active = 5.0 if mean_active is None else float(mean_active)
        if not 0 < mean_active <= n_features:
            raise ValueError(f"mean_active={mean_active} must be in (0, n_features={n_features}]")
        if freq_decay < 0:
            raise ValueError(f"freq_decay={freq_decay} must be >= 0")
        if magnitude not in _MAGNITUDES:
            raise ValueError(f"magnitude={magnitude!r} is not one of {sorted(_MAGNITUDES)}")
        params = tuple(float(v) for v in (magnitude_params if magnitude_params is not None else _MAGNITUDES[magnitude]))
        if len(params) != len(_MAGNITUDES[magnitude]):
            raise ValueError(f"magnitude {magnitude!r} takes {len(_MAGNITUDES[magnitude])} parameters, got {params}")
        if (magnitude == "uniform" and not 0 <= params[0] < params[1]) or \
                (magnitude in ("exponential", "constant") and params[0] <= 0) or \
                (magnitude == "normal" and params[1] < 0):
            raise ValueError(f"invalid magnitude_params {params} for {magnitude!r}")
        if noise_std < 0:
            raise ValueError(f"noise_std={noise_std} must be >= 0")
        hierarchy = _fill("hierarchy", hierarchy, _HIERARCHY_DEFAULTS)
        correlation = _fill("correlation", correlation, _CORRELATION_DEFAULTS)
        n_par, n_child_per = (hierarchy["n_parents"], hierarchy["children_per_parent"]) if hierarchy else (0, 0)
        n_groups, group_size = (correlation["n_groups"], correlation["group_size"]) if correlation else (0, 0)
        if min(n_par, n_child_per, n_groups, group_size) < 0:
            raise ValueError("hierarchy/correlation counts must be >= 0")
        if hierarchy and not 0 <= hierarchy["p_child"] <= 1:
            raise ValueError(f"hierarchy p_child={hierarchy['p_child']} must be in [0, 1]")
        if correlation and not 0 <= correlation["rho"] < 1:
            raise ValueError(f"correlation rho={correlation['rho']} must be in [0, 1)")
        used = n_par * (1 + n_child_per) + n_groups * group_size
        if used > n_features:
            raise ValueError(f"hierarchy and correlation groups need {used} distinct features, "
                             f"but n_features={n_features}")

        self.d_in, self.n_features, self.batch_size = int(d_in), int(n_features), int(batch_size)
        self.mean_active, self.freq_decay = mean_active, float(freq_decay)
        self.magnitude, self.magnitude_params, self.signed = magnitude, params, bool(signed)
        self.noise_std, self.orthogonal = float(noise_std), bool(orthogonal)
        self.hierarchy, self.correlation, self.seed = hierarchy, correlation, int(seed)
        self.device, self.dtype = torch.device(device), dtype
        self.batches_served = 0

        # -- structure, on CPU from `seed`: identical on every device
        g = torch.Generator().manual_seed(self.seed)
        if orthogonal:
            q, r = torch.linalg.qr(torch.randn(d_in, n_features, generator=g, dtype=torch.float64))
            signs = torch.sign(torch.diagonal(r))
            dirs = (q * torch.where(signs == 0, 1.0, signs)).T  # sign fix: Haar-distributed, as in scipy's ortho_group
        else:
            dirs = torch.randn(n_features, d_in, generator=g, dtype=torch.float64)
            dirs = dirs / dirs.norm(dim=1, keepdim=True)
        perm = torch.randperm(n_features, generator=g)
        self.parents = perm[:n_par].clone()                                     # [n_parents]
        self.children = perm[n_par:n_par * (1 + n_child_per)].reshape(n_par, n_child_per).clone()  # [n_parents, k]
        start = n_par * (1 + n_child_per)
        groups = perm[start:start + n_groups * group_size]
        self.groups = groups.reshape(n_groups, group_size).clone()             # [n_groups, group_size]
        parent_of = torch.full((n_features,), -1, dtype=torch.long)             # -1 = not a child
        parent_of[self.children.reshape(-1)] = self.parents.repeat_interleave(n_child_per)
        self.parent_of = parent_of

        # -- frequencies: scale the Zipf weights so the expected number of active features is `mean_active`
        weights = torch.arange(1, n_features + 1, dtype=torch.float64) ** -self.freq_decay
        is_child = parent_of >= 0
        p_child = float(hierarchy["p_child"]) if hierarchy else 0.0

        def marginals(scale: float) -> torch.Tensor:
            base = (scale * weights).clamp(max=1.0)
            return torch.where(is_child, p_child * base[parent_of.clamp(min=0)], base)

        hi = 1.0 / float(weights.min())  # at this scale every non-child fires always
        if float(marginals(hi).sum()) < mean_active * (1 - 1e-9):
            raise ValueError(f"mean_active={mean_active} is unreachable with this hierarchy "
                             f"(at most {float(marginals(hi).sum()):.3f} features can be active on average)")
        lo = 0.0
        for _ in range(200):  # bisection: marginals(scale).sum() is continuous and non-decreasing in scale
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if float(marginals(mid).sum()) < mean_active else (lo, mid)
        self._base_probs = (hi * weights).clamp(max=1.0)                        # own probability, non-children
        self.feature_probs = marginals(hi)                                      # [n_features] float64 marginals

        self._dirs_f64 = dirs                                                   # float64 on CPU, for tests/metrics
        self.directions = dirs.to(self.device, dtype)                           # [n_features, d_in] unit rows
        self._dirs_compute = dirs.to(self.device, torch.float32)
        # own firing threshold per feature: base probability, or p_child for children
        self._own_probs = torch.where(is_child, torch.full_like(weights, p_child), self._base_probs).to(
            self.device, torch.float32)
        self._parents_dev = self.parents.to(self.device)
        self._children_dev = self.children.to(self.device)
        self._groups_dev = self.groups.to(self.device)

        self._gen = torch.Generator(device=self.device).manual_seed((self.seed + _DATA_SEED_OFFSET) % 2**63)

    # ------------------------------------------------------------------------------------------- properties
    @property
    def d_out(self) -> int:
        return self.d_in

    @property
    def d_hooks(self) -> list[int]:
        return [self.d_in]

    @property
    def expected_active(self) -> float:
        """Expected number of active features per sample (the mean L0 of the true codes)."""
        return float(self.feature_probs.sum())

    # ------------------------------------------------------------------------------------------- sampling
    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` samples and their ground truth: (x [n, d_in], codes [n, n_features]), both on `device`.

        Uses and advances the same generator as `next_batch()` (`next_batch()` is `sample(batch_size)[0]`).
        """
        if n < 0:
            raise ValueError(f"n={n} must be >= 0")
        g, dev, F = self._gen, self.device, self.n_features
        u = torch.rand(n, F, generator=g, device=dev)                           # own uniform per feature
        if self.correlation and len(self.groups):
            rho = float(self.correlation["rho"])
            n_groups, size = self.groups.shape
            shared = torch.randn(n, n_groups, 1, generator=g, device=dev)
            own = torch.randn(n, n_groups, size, generator=g, device=dev)
            z = math.sqrt(rho) * shared + math.sqrt(1.0 - rho) * own           # N(0, 1) per feature
            u[:, self._groups_dev.reshape(-1)] = torch.special.ndtr(z).reshape(n, -1)  # copula: still U(0, 1)
        active = u < self._own_probs
        if len(self.parents) and self.children.shape[1]:
            kids = self._children_dev.reshape(-1)
            parent_active = active[:, self._parents_dev.repeat_interleave(self.children.shape[1])]
            active[:, kids] = active[:, kids] & parent_active

        # magnitudes only for the active entries (row-major order, so the draw is a fixed function of the state)
        rows, cols = active.nonzero(as_tuple=True)
        k, kind, prm = rows.numel(), self.magnitude, self.magnitude_params
        if kind == "normal":
            mags = (prm[0] + prm[1] * torch.randn(k, generator=g, device=dev)).abs()
        elif kind == "uniform":
            mags = prm[0] + (prm[1] - prm[0]) * torch.rand(k, generator=g, device=dev)
        elif kind == "exponential":
            mags = torch.empty(k, device=dev).exponential_(1.0 / prm[0], generator=g)
        else:
            mags = torch.full((k,), prm[0], device=dev)
        mags = mags.clamp(min=torch.finfo(torch.float32).tiny)  # keep "active <=> code != 0" exact
        if self.signed:
            mags = mags * torch.where(torch.rand(k, generator=g, device=dev) < 0.5, -1.0, 1.0)
        codes = torch.zeros(n, F, device=dev)
        codes[rows, cols] = mags
        x = codes @ self._dirs_compute
        if self.noise_std > 0:
            x = x + self.noise_std * torch.randn(n, self.d_in, generator=g, device=dev)
        return x.to(self.dtype), codes.to(self.dtype)

    def next_batch(self) -> torch.Tensor:
        """One batch [batch_size, d_in] on `device`, like `ActivationStore.next_batch()`."""
        x, _ = self.sample(self.batch_size)
        self.batches_served += 1
        return x

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Endless: stop the loop yourself."""
        while True:
            yield self.next_batch()

    # ------------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """The generator state (plus settings, checked on load): a resumed run gets bit-identical batches."""
        return {"rng": self._gen.get_state(), "batches_served": self.batches_served, "settings": self.describe()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {k: v for k, v in self.describe().items() if k != "device"}
        theirs = {k: v for k, v in state.get("settings", {}).items() if k != "device"}
        if theirs and theirs != mine:
            diff = {k: (theirs.get(k), mine.get(k)) for k in set(mine) | set(theirs) if theirs.get(k) != mine.get(k)}
            raise ValueError(f"state comes from a generator with other settings (saved, current): {diff}")
        self._gen.set_state(state["rng"])
        self.batches_served = int(state.get("batches_served", 0))

    # ------------------------------------------------------------------------------------------- metadata
    def describe(self) -> dict[str, Any]:
        """JSON-able settings, for training metadata; `from_config(describe())` rebuilds the same generator."""
        return {"kind": "synthetic", "d_in": self.d_in, "n_features": self.n_features, "batch_size": self.batch_size,
                "mean_active": self.mean_active, "p": self.mean_active / self.n_features,
                "freq_decay": self.freq_decay, "magnitude": self.magnitude,
                "magnitude_params": list(self.magnitude_params), "signed": self.signed, "noise_std": self.noise_std,
                "orthogonal": self.orthogonal, "hierarchy": self.hierarchy and dict(self.hierarchy),
                "correlation": self.correlation and dict(self.correlation), "seed": self.seed,
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def from_config(cls, config: dict[str, Any], **overrides: Any) -> SyntheticActivations:
        """Rebuild a generator from `describe()` output (e.g. read back from training metadata)."""
        cfg = {k: v for k, v in config.items() if k not in ("kind", "p")}
        cfg["dtype"] = getattr(torch, cfg.get("dtype", "float32"))
        cfg.update(overrides)
        return cls(**cfg)

    def __repr__(self) -> str:
        return (f"SyntheticActivations(d_in={self.d_in}, n_features={self.n_features}, "
                f"mean_active={self.mean_active:g}, batch_size={self.batch_size}, seed={self.seed})")


# ----------------------------------------------------------------------------------------------- recovery
def _unit_rows(m: torch.Tensor) -> torch.Tensor:
    norms = m.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, m / norms.clamp(min=torch.finfo(m.dtype).tiny), torch.zeros((), dtype=m.dtype))


def recovery_per_direction(decoder_rows: torch.Tensor, true_directions: torch.Tensor, *,
                           absolute: bool = False) -> torch.Tensor:
    """For each true direction, its max cosine with any decoder row: float64 [n_true] on CPU.

    Rows need not be normalised (they are normalised here, in float64); a zero row has cosine 0 with
    everything. `absolute=True` scores |cosine|, so a negated decoder row also counts as a match (use it when
    latents are signed, e.g. AbsTopK; the default counts only directions with the same sign).
    """
    dec = torch.as_tensor(decoder_rows).detach().to("cpu", torch.float64)
    true = torch.as_tensor(true_directions).detach().to("cpu", torch.float64)
    if dec.ndim != 2 or true.ndim != 2 or dec.shape[1] != true.shape[1]:
        raise ValueError(f"need decoder rows [n_dec, d] and true directions [n_true, d], "
                         f"got {tuple(dec.shape)} and {tuple(true.shape)}")
    if dec.shape[0] == 0:
        return torch.zeros(true.shape[0], dtype=torch.float64)
    cos = _unit_rows(true) @ _unit_rows(dec).T                                 # [n_true, n_dec]
    if absolute:
        cos = cos.abs()
    return cos.max(dim=1).values


def recovery(decoder_rows: torch.Tensor, true_directions: torch.Tensor, *, absolute: bool = False) -> float:
    """Mean over true directions of the max cosine with any decoder row (1.0 = all recovered).

    `decoder_rows` is the SAE's W_dec [d_sae, d_in]; see `recovery_per_direction` for the details.
    """
    per = recovery_per_direction(decoder_rows, true_directions, absolute=absolute)
    return float(per.mean()) if len(per) else float("nan")
