"""Sparse autoencoders: one module family, six selection rules, and transcoders.

    x_n = x · s_in                           (optional normalisation to mean norm √d_in; s saved)
    z   = W_encᵀ (x_n − b_dec) + b_enc       (pre-encoder centring; transcoders skip it)
    f   = select(z)                          (the architecture: relu / topk / batchtopk / jumprelu / abstopk / matryoshka)
    x̂   = (W_decᵀ f + b_dec) / s_out

Shapes follow SAELens: W_enc [d_in, d_sae], W_dec [d_sae, d_out]. A transcoder reads one hook (`hook`) and
reconstructs another (`out_hook`, Dunefsky et al. 2024, "Transcoders find interpretable LLM feature circuits").
Losses are computed in normalised units, so coefficients do not depend on the model's activation scale.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .config_io import strict_from_dict

ARCHS = ("relu", "topk", "batchtopk", "jumprelu", "abstopk", "matryoshka")
TOPK_FAMILY = ("topk", "batchtopk", "abstopk", "matryoshka")  # trained with the aux-k loss
BACKENDS = ("auto", "torch", "triton")
TRITON_ARCHS = ("topk", "abstopk")  # trained on the kernels; jumprelu uses them for inference; the rest are dense


@dataclass
class SAEConfig:
    arch: str
    d_in: int
    d_sae: int
    k: int | None = None                 # top-k families: latents per token (batchtopk: mean per token)
    hook: str = ""                       # where the input is read
    out_hook: str | None = None          # transcoders: where the target is read (None: an SAE, target = input)
    d_out: int | None = None             # transcoders: target width (default d_in)
    model_name: str | None = None
    normalize: bool = True               # scale inputs (and targets) to mean norm √d; the scales are saved
    sparsity_coeff: float | None = None  # relu: λ of the L1 term; jumprelu: λ of the L0 term
    sparsity_warmup_steps: int = 0       # λ rises linearly from 0 over these steps
    aux_k: int = 256                     # top-k families: dead latents used by the aux-k loss
    aux_coeff: float = 1 / 32            # Gao et al. 2024
    jumprelu_init_threshold: float = 0.1   # high enough that the L0 term bites within short runs
    jumprelu_bandwidth: float = 0.05       # SAELens default; the STE window around θ
    jumprelu_max_active: int = 256       # jumprelu inference on the kernels: rows with more actives use the dense path
    threshold_momentum: float = 0.99     # batchtopk / matryoshka: EMA of the inference threshold
    matryoshka_prefixes: list[int] = field(default_factory=list)  # m1 < m2 < ... < d_sae
    backend: str = "auto"                # auto: Triton kernels for topk/abstopk on CUDA, PyTorch elsewhere

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r} is not one of {ARCHS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not one of {BACKENDS}")
        if self.d_in < 1 or self.d_sae < 1:
            raise ValueError(f"d_in={self.d_in} and d_sae={self.d_sae} must be >= 1")
        self.d_out = self.d_out or self.d_in
        if self.arch in TOPK_FAMILY:
            if self.k is None or not 1 <= self.k <= self.d_sae:
                raise ValueError(f"arch={self.arch!r} needs 1 <= k <= d_sae={self.d_sae}, got k={self.k}")
        if self.sparsity_coeff is None:
            self.sparsity_coeff = {"relu": 5.0, "jumprelu": 1.0}.get(self.arch, 0.0)
        if self.arch == "matryoshka":
            if not self.matryoshka_prefixes:
                self.matryoshka_prefixes = [max(1, self.d_sae // 2 ** i) for i in (4, 3, 2, 1)] + [self.d_sae]
            p = list(self.matryoshka_prefixes)
            if p[-1] != self.d_sae or any(b <= a for a, b in zip(p, p[1:])) or p[0] < 1:
                raise ValueError(f"matryoshka_prefixes={p} must increase strictly and end at d_sae={self.d_sae}")
        if self.out_hook is None and self.d_out != self.d_in:
            raise ValueError(f"d_out={self.d_out} differs from d_in={self.d_in} but no out_hook is set (an SAE "
                             f"reconstructs its input; set out_hook for a transcoder)")

    @property
    def is_transcoder(self) -> bool:
        return self.out_hook is not None

    @property
    def unit_norm_decoder(self) -> bool:
        return self.arch != "relu"  # relu's L1 is weighted by decoder norms instead (Anthropic, 2024)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        return strict_from_dict(cls, d, "SAE")


class _JumpReLU(torch.autograd.Function):
    """f = z·H(z−θ); ∂f/∂θ by the rectangle-kernel straight-through estimator (Rajamanoharan et al. 2024, eq. 11)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        window = ((z - theta).abs() < ctx.eps / 2).to(g.dtype)
        grad_theta = (-(theta / ctx.eps) * window * g).sum(0)
        return g * (z > theta), grad_theta.to(theta.dtype), None  # z may be bf16 under autocast, θ stays fp32


class _Step(torch.autograd.Function):
    """H(z−θ) for the L0 penalty; gradient only to θ, −(1/ε)·K((z−θ)/ε) (Rajamanoharan et al. 2024, eq. 12)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        window = ((z - theta).abs() < ctx.eps / 2).to(g.dtype)
        return None, (-(1.0 / ctx.eps) * window * g).sum(0).to(theta.dtype), None


def geometric_median(x: torch.Tensor, iters: int = 100, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld's algorithm, in float64: the b_dec initialisation of Bricken et al. 2023."""
    x = x.double()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(eps)
        m_new = (w[:, None] * x).sum(0) / w.sum()
        if (m_new - m).norm() < 1e-7 * (1 + m.norm()):
            m = m_new
            break
        m = m_new
    return m.float()


def squared_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ‖a − b‖²: one fused kernel each way (a sub-pow-sum chain makes three passes over B × d)."""
    return nn.functional.mse_loss(a, b, reduction="sum") / a.shape[0]


class SAE(nn.Module):
    """An SAE (or transcoder) of any architecture in `ARCHS`; `forward(x) -> (x_hat, latents, aux)`."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_out
        w_dec = torch.randn(d_sae, d_out)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        # W_enc = W_decᵀ (Gao et al. 2024); a transcoder's input space differs from its output space, so it gets
        # its own random directions of the same scale.
        w_enc = w_dec.T.clone() if d_in == d_out else torch.randn(d_in, d_sae) / math.sqrt(d_in)
        self.W_enc = nn.Parameter(w_enc.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        if cfg.arch == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(cfg.jumprelu_init_threshold)))
        self.register_buffer("in_scale", torch.tensor(1.0))
        self.register_buffer("out_scale", torch.tensor(1.0))
        if cfg.arch in ("batchtopk", "matryoshka"):
            self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not estimated yet

    # ------------------------------------------------------------------------------------------ set-up
    @torch.no_grad()
    def initialize(self, x: torch.Tensor, y: torch.Tensor | None = None, b_dec: str = "geometric_median") -> None:
        """Data-dependent init from a sample: normalisation scales, then b_dec (geometric median or mean)."""
        if b_dec not in ("geometric_median", "mean", "zeros"):
            raise ValueError(f"b_dec={b_dec!r} is not one of ('geometric_median', 'mean', 'zeros')")
        y = x if y is None else y
        self._check_width(x, self.cfg.d_in, "input")
        self._check_width(y, self.cfg.d_out, "target")
        if self.cfg.normalize:
            self.in_scale.fill_(math.sqrt(self.cfg.d_in) / x.float().norm(dim=1).mean().clamp_min(1e-12).item())
            self.out_scale.fill_(math.sqrt(self.cfg.d_out) / y.float().norm(dim=1).mean().clamp_min(1e-12).item())
        y_n = y.float() * self.out_scale
        if b_dec == "geometric_median":
            self.b_dec.copy_(geometric_median(y_n))
        elif b_dec == "mean":
            self.b_dec.copy_(y_n.mean(0))
        else:
            self.b_dec.zero_()

    def _check_width(self, t: torch.Tensor, width: int, what: str) -> None:
        if t.shape[-1] != width:
            raise ValueError(f"{what} has width {t.shape[-1]}, but this SAE expects {width} "
                             f"(hook {self.cfg.out_hook if what == 'target' and self.cfg.out_hook else self.cfg.hook!r})")

    # ------------------------------------------------------------------------------------------ backend
    def uses_triton(self, x: torch.Tensor) -> bool:
        """Whether this call runs the Triton kernels: `backend` and the device decide (see SAEConfig.backend)."""
        backend, arch = self.cfg.backend, self.cfg.arch
        if arch == "jumprelu" and torch.is_grad_enabled():
            return False  # its threshold gradients need the pre-activations near θ: JumpReLU trains on the dense path
        kernel_arch = arch in TRITON_ARCHS or arch == "jumprelu"
        if backend == "torch" or (backend == "auto" and (x.device.type != "cuda" or not kernel_arch)):
            return False
        if not kernel_arch:
            raise ValueError(f"backend='triton' has kernels for {TRITON_ARCHS}, not arch={arch!r}; use backend='auto' "
                             f"or 'torch' (the PyTorch path)")
        from sae_widgets.kernels.runtime import triton_runnable

        if not triton_runnable(x.device):
            raise RuntimeError(f"backend='triton' needs a CUDA device (tensors are on {x.device}) or the Triton "
                               f"interpreter (set TRITON_INTERPRET=1 before importing triton); use backend='auto'")
        return True

    def _sparse_forward(self, x: torch.Tensor):
        """The Triton path: (x_c, values, indices, x̂ normalised) with no dense B × d_sae tensor."""
        from sae_widgets.kernels.autograd import LatentGrouping, SparseDecode, TopKEncode

        x_n = self.normalized_input(x)
        x_c = self.centred(x_n)
        dtype = self.W_enc.dtype
        if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):  # kernels see bf16 operands, fp32 accumulation
            dtype = torch.bfloat16
        if self.cfg.arch == "jumprelu":  # inference only (no autograd): the active latents in sparse form
            from sae_widgets.kernels.topk_encoder import encode_topk

            values, indices, counts = encode_topk(x_c.to(dtype), self.W_enc.to(dtype), self.b_enc,
                                                  self.cfg.jumprelu_max_active, theta=self.threshold_theta)
            if int(counts.max()) > self.cfg.jumprelu_max_active:
                return None  # a row has more active latents than the sparse form holds: use the exact dense path
        else:  # x_n and the centre go in separately: the backward then never needs a B × d_in input gradient
            centre = None if self.cfg.is_transcoder else self.b_dec
            grouping = LatentGrouping(self.cfg.d_sae)  # one sort of the indices serves both backward passes
            values, indices = TopKEncode.apply(x_n, centre, self.W_enc, self.b_enc, self.cfg.k,
                                               self.cfg.arch == "abstopk", dtype, grouping)
            return x_c, values, indices, SparseDecode.apply(values, indices, self.W_dec, self.b_dec, grouping, dtype)
        return x_c, values, indices, SparseDecode.apply(values, indices, self.W_dec, self.b_dec, None, dtype)

    def _kernel_forward(self, x: torch.Tensor):
        """`_sparse_forward(x)` where this call runs the kernels and the result fits; None means the dense path."""
        return self._sparse_forward(x) if self.uses_triton(x) else None

    # ------------------------------------------------------------------------------------------ encode
    def normalized_input(self, x: torch.Tensor) -> torch.Tensor:
        """x_n = x · in_scale, in the weights' dtype."""
        self._check_width(x, self.cfg.d_in, "input")
        return x.to(self.W_enc.dtype) * self.in_scale

    def centred(self, x_n: torch.Tensor) -> torch.Tensor:
        """x_n − b_dec (pre-encoder centring; transcoders skip it)."""
        return x_n if self.cfg.is_transcoder else x_n - self.b_dec

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """x_n − b_dec, in normalised units: what the encoder multiplies."""
        return self.centred(self.normalized_input(x))

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """z = W_encᵀ(x_n − b_dec) + b_enc, in normalised units."""
        return self.encoder_input(x) @ self.W_enc + self.b_enc

    @property
    def threshold_theta(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def select(self, z: torch.Tensor) -> torch.Tensor:
        """The architecture's sparse activation f(z), dense with exact zeros."""
        arch, k = self.cfg.arch, self.cfg.k
        if arch == "relu":
            return torch.relu(z)
        if arch == "topk":
            vals, idx = z.topk(k, dim=-1)
            return torch.zeros_like(z).scatter(-1, idx, torch.relu(vals))
        if arch == "abstopk":
            idx = z.abs().topk(k, dim=-1).indices
            return torch.zeros_like(z).scatter(-1, idx, z.gather(-1, idx))
        if arch == "jumprelu":
            return _JumpReLU.apply(z, self.threshold_theta, self.cfg.jumprelu_bandwidth)
        # batchtopk / matryoshka: the k·B largest activations of the batch while training (Bussmann et al. 2024),
        # a fixed threshold at inference, estimated as an EMA of the smallest selected activation
        r = torch.relu(z)
        if self.training:
            flat = r.flatten()
            n = min(k * r.shape[0], flat.numel())
            vals, idx = flat.topk(n)
            f = torch.zeros_like(flat).scatter(0, idx, vals).view_as(r)
            with torch.no_grad():
                pos = vals[vals > 0]
                if pos.numel():
                    m = pos.min().float()
                    t = self.threshold
                    t.copy_(m if t < 0 else self.cfg.threshold_momentum * t + (1 - self.cfg.threshold_momentum) * m)
            return f
        if self.threshold < 0:
            raise RuntimeError(f"{arch} SAE has no inference threshold yet: train it (or load a trained one) first")
        return r * (z > self.threshold)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [..., d_sae], dense with exact zeros where inactive."""
        sparse = self._kernel_forward(x)
        if sparse is not None:
            return self._densify(sparse[1], sparse[2])
        return self.select(self.pre_acts(x))

    def _densify(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        dense = torch.zeros(values.shape[0], self.cfg.d_sae, dtype=values.dtype, device=values.device)
        return dense.scatter(-1, indices.long(), values)

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) [B, K]: K = k for topk/abstopk, else the batch's largest count (padded with zeros)."""
        sparse = self._kernel_forward(x) if self.cfg.arch != "jumprelu" else None
        if sparse is not None:
            return sparse[1], sparse[2].long()
        f = self.encode(x)
        if self.cfg.arch in ("topk", "abstopk"):
            idx = f.abs().topk(self.cfg.k, dim=-1).indices
        else:
            kmax = max(1, int((f != 0).sum(-1).max()))
            idx = f.abs().topk(kmax, dim=-1).indices
        return f.gather(-1, idx), idx

    # ------------------------------------------------------------------------------------------ decode
    def decode_normalized(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """x̂ in the original units of the target."""
        return self.decode_normalized(f) / self.out_scale

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x̂ = Σ_j v_j W_dec[idx_j] + b_dec by row gather (the reference the sparse-decoder kernel must match)."""
        rows = self.W_dec[indices]  # [B, K, d_out]
        return ((values.unsqueeze(-1) * rows).sum(-2) + self.b_dec) / self.out_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        sparse = self._kernel_forward(x)
        if sparse is not None:
            _, values, indices, x_hat_n = sparse
            return x_hat_n / self.out_scale, self._densify(values, indices), {"x_hat_normalized": x_hat_n}
        z = self.pre_acts(x)
        f = self.select(z)
        x_hat_n = self.decode_normalized(f)
        return x_hat_n / self.out_scale, f, {"pre_acts": z, "x_hat_normalized": x_hat_n}

    # ------------------------------------------------------------------------------------------ training
    def sparsity_coeff_at(self, step: int) -> float:
        w = self.cfg.sparsity_warmup_steps
        return self.cfg.sparsity_coeff * (min(1.0, (step + 1) / w) if w > 0 else 1.0)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor | None = None, *, step: int = 0,
                      dead_latents: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The architecture's loss (mean over tokens of squared-error sums) and its parts, for the trainer.

        `dead_latents` (indices) switch on the aux-k loss for the TopK family; nothing here waits for the GPU.
        """
        y = x if y is None else y
        self._check_width(y, self.cfg.d_out, "target")
        y_n = y.to(self.W_dec.dtype) * self.out_scale
        arch, cfg = self.cfg.arch, self.cfg
        if arch in TRITON_ARCHS and self.uses_triton(x):  # topk / abstopk through the kernels: sparse all the way
            x_c, values, indices, x_hat_n = self._sparse_forward(x)
            active = values != 0
            fired = torch.zeros(cfg.d_sae, device=x.device).index_add_(0, indices.reshape(-1).long(),
                                                                       active.reshape(-1).float()) > 0
            l0 = active.float().sum(-1).mean()
        else:
            x_c = self.encoder_input(x)
            z = x_c @ self.W_enc + self.b_enc
            f = self.select(z)
            x_hat_n = self.decode_normalized(f)
            fired, l0 = (f != 0).any(0), (f != 0).float().sum(-1).mean()
        mse = squared_error(x_hat_n, y_n)
        parts = {"mse": mse.detach(), "l0": l0.detach()}
        if arch == "matryoshka":  # sum of the reconstruction losses of every nested prefix (Bussmann et al. 2025)
            parts["mse_full"] = mse.detach()
            mse = sum(squared_error(f[:, :m] @ self.W_dec[:m] + self.b_dec, y_n) for m in cfg.matryoshka_prefixes)
            parts["mse"] = mse.detach()
        loss = mse
        if arch == "relu":  # λ Σ_i f_i ‖W_dec,i‖ (Anthropic, "Towards Monosemanticity" April 2024 update)
            sparsity = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
            loss = loss + self.sparsity_coeff_at(step) * sparsity
            parts["l1"] = sparsity.detach()
        elif arch == "jumprelu":  # λ·L0 through the step function's pseudo-derivative
            l0 = _Step.apply(z, self.threshold_theta, cfg.jumprelu_bandwidth).sum(-1).mean()
            loss = loss + self.sparsity_coeff_at(step) * l0
            parts["l0_penalty"] = l0.detach()
        if arch in TOPK_FAMILY and dead_latents is not None and dead_latents.numel():
            aux = self.aux_k_loss(x_c, dead_latents, (y_n - x_hat_n).detach())
            loss = loss + cfg.aux_coeff * aux
            parts["aux_k"] = aux.detach()
        parts["loss"] = loss.detach()
        parts["_fired"] = fired
        return loss, parts

    def aux_k_loss(self, x_c: torch.Tensor, dead: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Reconstruct the residual e = y − ŷ from the top `aux_k` dead latents (Gao et al. 2024, §A.2).

        Only the dead latents' pre-activations are computed (a product over the dead columns), so neither
        backend needs the dense B × d_sae matrix for it. `dead` may end in −1s (a fixed-size list, as a CUDA graph
        needs): those columns are held at 0, so they add nothing to the loss or the gradients.
        """
        padding = dead < 0
        dead = dead.clamp_min(0)
        z = torch.where(padding, 0.0, x_c @ self.W_enc[:, dead] + self.b_enc[dead])
        abs_select = self.cfg.arch == "abstopk"
        local = (z.abs() if abs_select else z).topk(min(self.cfg.aux_k, len(dead)), dim=-1).indices
        vals = z.gather(-1, local)
        vals = vals if abs_select else torch.relu(vals)
        if z.numel() <= 2 ** 28 or not self.uses_triton(x_c):  # few dead latents: one small dense product wins
            e_hat = torch.zeros_like(z).scatter(-1, local, vals) @ self.W_dec[dead]
        else:  # many dead latents on the Triton path: gather rows instead of a B × n_dead matrix
            from sae_widgets.kernels.autograd import SparseDecode

            e_hat = SparseDecode.apply(vals, dead[local].int(), self.W_dec, torch.zeros_like(self.b_dec))
        return squared_error(e_hat, residual)

    def _decoder_kernels(self) -> bool:
        """The one-pass Triton upkeep of W_dec on CUDA (backend 'torch' keeps the PyTorch path everywhere)."""
        if self.cfg.backend == "torch" or self.W_dec.device.type != "cuda":
            return False
        from sae_widgets.kernels.runtime import triton_runnable

        return triton_runnable(self.W_dec.device)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out the gradient component along each decoder row, so Adam moves rows on the unit sphere."""
        if self.cfg.unit_norm_decoder and self.W_dec.grad is not None:
            if self._decoder_kernels():
                from sae_widgets.kernels.decoder_rows import project_out_rows_

                project_out_rows_(self.W_dec.grad, self.W_dec)
            else:
                from sae_widgets.kernels.reference import project_out_rows_reference

                self.W_dec.grad.copy_(project_out_rows_reference(self.W_dec.grad, self.W_dec))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.cfg.unit_norm_decoder:
            if self._decoder_kernels():
                from sae_widgets.kernels.decoder_rows import normalize_rows_

                normalize_rows_(self.W_dec)
            else:
                from sae_widgets.kernels.reference import normalize_rows_reference

                self.W_dec.copy_(normalize_rows_reference(self.W_dec))
