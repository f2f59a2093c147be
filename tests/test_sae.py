"""The SAE interface: sparse form, initialisation, normalisation, geometric median, backend switch, width errors."""
from __future__ import annotations

import math

import pytest
import torch

from sae_widgets.sae import ARCHS, SAE, SAEConfig, geometric_median


def make(arch, **kw):
    k = 4 if arch not in ("relu", "jumprelu") else None
    return SAE(SAEConfig(arch=arch, d_in=16, d_sae=48, k=k, **kw))


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_form_decodes_like_the_dense_latents(arch):
    torch.manual_seed(0)
    x = torch.randn(32, 16) * 2 + 0.5
    sae = make(arch)
    sae.initialize(x)
    sae.train()
    sae.training_loss(x)  # batchtopk/matryoshka estimate their threshold in training
    sae.eval()
    x_hat, f, _ = sae(x)
    values, idx = sae.encode_sparse(x)
    assert values.shape == idx.shape and values.shape[0] == 32
    if arch in ("topk", "abstopk"):
        assert values.shape[1] == 4
    torch.testing.assert_close(sae.decode_sparse(values, idx), x_hat, rtol=1e-5, atol=1e-5)
    dense = torch.zeros_like(f).scatter(-1, idx, values)
    assert torch.equal(dense, f), "the sparse form holds every non-zero latent"


def test_initialisation_rules():
    torch.manual_seed(0)
    sae = make("topk")
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(48))
    assert torch.equal(sae.W_enc, sae.W_dec.T), "W_enc = W_dec^T (Gao et al. 2024)"
    x = torch.randn(500, 16) * 7 + 3
    sae.initialize(x, b_dec="mean")
    assert math.isclose((x * sae.in_scale).norm(dim=1).mean().item(), 4.0, rel_tol=1e-5), "mean norm sqrt(d_in)"
    torch.testing.assert_close(sae.b_dec, (x * sae.in_scale).mean(0))
    relu = make("relu")
    assert relu.cfg.unit_norm_decoder is False and make("jumprelu").cfg.unit_norm_decoder is True


def test_geometric_median_satisfies_its_optimality_condition():
    torch.manual_seed(1)
    pts = torch.cat([torch.randn(200, 5), torch.randn(20, 5) * 50 + 100])  # outliers pull the mean, not the median
    m = geometric_median(pts).double()
    unit = (pts.double() - m) / (pts.double() - m).norm(dim=1, keepdim=True)
    assert unit.sum(0).norm() < 1e-2 * len(pts), "sum of unit vectors to the median is ~0"
    assert (m - pts.double().mean(0)).norm() > 5 and m.norm() < 2


def test_jumprelu_pseudo_derivatives_match_the_paper():
    """∂/∂θ of Σ z·H(z−θ) is −(θ/ε)·#{|z−θ| < ε/2}; of Σ H(z−θ) it is −(1/ε)·#{...} (Rajamanoharan et al. 2024)."""
    from sae_widgets.sae import _JumpReLU, _Step

    z = torch.tensor([[0.49, 0.52, 0.9, 0.1]])
    theta = torch.full((4,), 0.5, requires_grad=True)
    eps = 0.1
    _JumpReLU.apply(z, theta, eps).sum().backward()
    expected = torch.tensor([-(0.5 / eps), -(0.5 / eps), 0.0, 0.0])
    torch.testing.assert_close(theta.grad, expected)
    theta.grad = None
    _Step.apply(z, theta, eps).sum().backward()
    torch.testing.assert_close(theta.grad, expected / 0.5)


def test_backend_switch_and_width_errors(monkeypatch):
    with pytest.raises(ValueError, match="backend='cuda' is not one of"):
        SAEConfig(arch="topk", d_in=4, d_sae=8, k=2, backend="cuda")
    assert SAEConfig(arch="topk", d_in=4, d_sae=8, k=2).backend == "auto"
    cpu_x = torch.randn(2, 4)
    assert SAE(SAEConfig(arch="topk", d_in=4, d_sae=8, k=2)).uses_triton(cpu_x) is False, "auto: PyTorch off CUDA"
    with pytest.raises(ValueError, match="backend='triton' has kernels for .*not arch='relu'"):
        SAE(SAEConfig(arch="relu", d_in=4, d_sae=8, backend="triton"))(cpu_x)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs a CUDA device .* or the Triton interpreter"):
        SAE(SAEConfig(arch="topk", d_in=4, d_sae=8, k=2, backend="triton"))(cpu_x)
    ok = make("topk")
    with pytest.raises(ValueError, match="input has width 15, but this SAE expects 16"):
        ok.encode(torch.randn(3, 15))
    with pytest.raises(ValueError, match="no out_hook is set"):
        SAEConfig(arch="topk", d_in=4, d_out=5, d_sae=8, k=2)
    with pytest.raises(ValueError, match="matryoshka_prefixes=.* must increase strictly"):
        SAEConfig(arch="matryoshka", d_in=4, d_sae=8, k=2, matryoshka_prefixes=[4, 2, 8])
    untrained = SAE(SAEConfig(arch="batchtopk", d_in=4, d_sae=8, k=2)).eval()
    with pytest.raises(RuntimeError, match="no inference threshold yet"):
        untrained.encode(torch.randn(2, 4))


@pytest.mark.parametrize("arch", ["topk", "abstopk"])
def test_aux_k_loss_ignores_padding_in_the_dead_list(arch):
    """A CUDA graph needs a fixed-size dead list: −1 padding must change neither the aux-k loss nor its gradients."""
    torch.manual_seed(0)
    sae = SAE(SAEConfig(arch=arch, d_in=16, d_sae=96, k=4, aux_k=8)).double()
    with torch.no_grad():
        sae.b_enc.normal_()
    x, residual = torch.randn(32, 16, dtype=torch.float64), torch.randn(32, 16, dtype=torch.float64)
    dead = torch.tensor([3, 10, 11, 40, 77])  # fewer dead latents than aux_k: the padded top-k reaches the padding

    def loss_and_grads(d):
        sae.zero_grad()
        loss = sae.aux_k_loss(sae.encoder_input(x), d, residual)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in sae.parameters()]

    ref, ref_grads = loss_and_grads(dead)
    for size in (8, 16):
        loss, grads = loss_and_grads(torch.cat([dead, torch.full((size - len(dead),), -1)]))
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-15)


def test_padded_dead_list_and_its_capacity():
    from sae_widgets.step_graph import dead_capacity, padded_dead_latents

    since = torch.tensor([0, 9, 10, 3, 50, 10, 0])
    assert padded_dead_latents(since, 10, 5).tolist() == [2, 4, 5, -1, -1]  # = nonzero, then −1s
    assert padded_dead_latents(since, 10, 3).tolist() == (since >= 10).nonzero().squeeze(1).tolist()
    assert dead_capacity(0, 4096, 512) == 0
    assert dead_capacity(1, 4096, 0) == 512 and dead_capacity(513, 4096, 512) == 1024
    assert dead_capacity(300, 4096, 1024) == 1024 and dead_capacity(200, 4096, 1024) == 512  # keeps it while > 1/4
    assert dead_capacity(4000, 3000, 0) == 3000  # never more than d_sae
