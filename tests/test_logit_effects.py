"""Logit effects against the real model: a finite difference through the model's own final norm and unembedding.

For a base final residual x that is zero-mean and orthogonal to a decoder direction d, x + εd and x − εd have the
same norm and the same centred norm, so every final norm (LayerNorm, RMSNorm, Gemma's 1 + w RMSNorm) divides both by
the same denominator r, and logits(x + εd) − logits(x − εd) = (2ε / r) · effect(d) exactly, where effect is what
`logit_effects` claims. The test fits that one positive scalar and checks the rest is float rounding, in float64,
on tiny random models of four architecture families, with the norm weights left in place or folded into W_U.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from real_arch_models import FAMILIES, N_LAYERS, tiny_model_folder
from sae_widgets.feature_stats_sweep import final_norm_map, logit_effects
from sae_widgets.models import load_model
from sae_widgets.sae import SAE, SAEConfig

HOOK = f"blocks.{N_LAYERS - 1}.hook_resid_post"  # the final residual: what the final norm reads
D_SAE, N_TOP = 6, 10
TOKENS = torch.tensor([[0, 17, 923, 5]])


@pytest.fixture(scope="module", params=[(f, folded) for f in FAMILIES for folded in (False, True)],
                ids=lambda p: f"{p[0]}-{'folded' if p[1] else 'raw'}")
def arch(request, tmp_path_factory):
    family, folded = request.param
    model = load_model(tiny_model_folder(family, tmp_path_factory.mktemp(family)), device="cpu")
    if folded:
        model.enable_compatibility_mode(disable_warnings=True)  # fold_ln: the norm's weight moves into W_U
    model.to(torch.float64)
    torch.manual_seed(1)
    sae = SAE(SAEConfig(arch="relu", d_in=model.cfg.d_model, d_sae=D_SAE, hook=HOOK))
    return SimpleNamespace(family=family, folded=folded, model=model, sae=sae)


def full_effects(model, sae) -> torch.Tensor:
    """Every latent's effect on every token, from `logit_effects` asked for the whole vocabulary (sorted)."""
    vocab = model.W_U.shape[1]
    got, note = logit_effects(model, sae, vocab, latent_chunk=4, device=torch.device("cpu"))
    assert note == ""
    out = torch.zeros(sae.cfg.d_sae, vocab, dtype=torch.float64)
    out.scatter_(1, got["logit_pos_ids"].long(), got["logit_pos_values"].double())
    assert torch.equal(got["logit_pos_ids"].long().sort(1).values, torch.arange(vocab).expand(sae.cfg.d_sae, -1))
    return out


def logits_at(model, resid: torch.Tensor) -> torch.Tensor:
    """The model's last-position logits with the final residual there replaced by `resid`."""
    def put(act, hook):
        act = act.clone()
        act[:, -1] = resid.to(act.dtype)
        return act

    return model.run_with_hooks(TOKENS, fwd_hooks=[(HOOK, put)])[0, -1].double()


def base_residual(d: torch.Tensor, seed: int) -> torch.Tensor:
    """A random residual, zero-mean and orthogonal to d, with RMS 3."""
    basis, _ = torch.linalg.qr(torch.stack([torch.ones_like(d), d], 1))
    x = torch.randn(d.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x - basis @ (basis.T @ x)
    return 3.0 * x / x.pow(2).mean().sqrt()


def test_logit_effects_match_the_models_own_logits(arch):
    model, sae = arch.model, arch.sae
    effects = full_effects(model, sae)
    top, _ = logit_effects(model, sae, N_TOP, latent_chunk=D_SAE, device=torch.device("cpu"))
    with torch.no_grad():
        for i in range(D_SAE):
            d = sae.W_dec[i].detach().double()
            x = base_residual(d, seed=i)
            eps = 0.5 * x.norm() / d.norm()
            delta = logits_at(model, x + eps * d) - logits_at(model, x - eps * d)
            pred = effects[i]
            alpha = float(delta @ pred / (pred @ pred))  # 2ε / r: the norm's denominator
            rel = float((delta - alpha * pred).norm() / delta.norm())
            assert alpha > 0, (arch.family, i, alpha)
            assert rel < 1e-4, (arch.family, arch.folded, i, rel)
            assert top["logit_pos_ids"][i].tolist() == delta.topk(N_TOP).indices.tolist()
            assert top["logit_neg_ids"][i].tolist() == delta.topk(N_TOP, largest=False).indices.tolist()


def test_the_probe_reads_the_norms_weight(arch):
    """The probe's scale is the norm's elementwise factor: w, 1 + w for Gemma, ones once folded into W_U."""
    norm = final_norm_map(arch.model)
    weight = arch.model.ln_final.w.detach().double()
    if arch.folded:
        expected = torch.ones_like(weight)
    else:
        expected = 1.0 + weight if arch.family == "gemma" else weight
        assert float((expected - 1).abs().max()) > 0.1  # non-trivial weights: a wrong formula would show
    torch.testing.assert_close(norm.scale.double(), expected, rtol=1e-6, atol=1e-6)
    assert norm.centres == (arch.family in ("gpt2", "neox"))  # LayerNorm removes the mean, RMSNorm does not


class GemmaStyleRMSNorm(torch.nn.Module):
    """RMSNorm storing its weight as an offset from 1, as Gemma does."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(w)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class Mixing(torch.nn.Module):
    """Not an elementwise scale: LayerNorm followed by a rotation of the dimensions."""

    def forward(self, x):
        return torch.nn.functional.layer_norm(x, x.shape[-1:]).roll(1, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probe_on_plain_norm_modules(dtype):
    """HookedTransformer-style models: `ln_final` is any module mapping [..., d_model] -> [..., d_model]."""
    g = torch.Generator().manual_seed(0)
    w, b = 0.5 + torch.rand(7, generator=g), torch.randn(7, generator=g)
    ln = torch.nn.LayerNorm(7)
    rms = torch.nn.RMSNorm(7, eps=1e-6)
    with torch.no_grad():
        ln.weight.copy_(w), ln.bias.copy_(b), rms.weight.copy_(w)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for module, scale, centres in ((ln, w, True), (rms, w, False), (GemmaStyleRMSNorm(w - 1), w, False),
                                   (torch.nn.Identity(), torch.ones(7), False)):
        model = SimpleNamespace(cfg=SimpleNamespace(d_model=7, device="cpu"), ln_final=module.to(dtype))
        norm = final_norm_map(model)
        torch.testing.assert_close(norm.scale, scale.to(dtype).float(), **tol)
        assert norm.centres == centres, module
    no_norm = final_norm_map(SimpleNamespace(cfg=SimpleNamespace(d_model=7, device="cpu")))
    assert torch.equal(no_norm.scale, torch.ones(7)) and not no_norm.centres
    mixing = final_norm_map(SimpleNamespace(cfg=SimpleNamespace(d_model=7, device="cpu"), ln_final=Mixing()))
    assert mixing.scale is None and "elementwise scale" in mixing.note
    sae = SAE(SAEConfig(arch="relu", d_in=7, d_sae=3, hook=HOOK))
    model = SimpleNamespace(cfg=SimpleNamespace(d_model=7, device="cpu"), ln_final=Mixing(), W_U=torch.randn(7, 11))
    got, note = logit_effects(model, sae, 4, latent_chunk=3, device=torch.device("cpu"))
    assert note == mixing.note and got["logit_pos_ids"].shape == (3, 0)
