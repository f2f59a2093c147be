"""The kernels on a CUDA GPU (the lent H100/H200): several shapes (non-multiples of the blocks), fp32 and bf16,
k in {1, 32, 128}; fresh random inputs each run (no seed), outputs poisoned before each launch. CPU machines have no
CUDA device, so there is nothing here to run on them."""
from __future__ import annotations

import pytest
import torch

from sae_widgets.kernels.autograd import SparseDecode, TopKEncode
from sae_widgets.kernels.sparse_ops import gather_dot, gather_sum, scatter_outer
from sae_widgets.kernels.topk_encoder import encode_topk
from sae_widgets.kernels import reference as ref
from sae_widgets.kernels.topk_encoder import candidate_width

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SHAPES = [(333, 100, 5000), (4097, 768, 32768), (1024, 512, 16385)]
# fp32 operands go through tensor cores as tf32 (like torch with allow_tf32): ~1e-3 relative; bf16 ~1e-2
TOL = {torch.float32: 3e-3, torch.bfloat16: 2e-2}


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 32, 128])
@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("method", ["tiles", "scan"])
def test_encode_topk_gpu(shape, dtype, k, absolute, method):
    B, D, N = shape
    x = torch.randn(B, D, device="cuda").to(dtype)
    w = (torch.randn(D, N, device="cuda") / D ** 0.5).to(dtype)
    b = torch.randn(N, device="cuda") * 0.1
    keys = torch.full((B, candidate_width(B, N, k, method)), 2 ** 62, dtype=torch.int64, device="cuda")
    v, i = encode_topk(x, w, b, k, absolute, keys_out=keys, method=method)
    assert (keys != 2 ** 62).all(), "an output slot was never written"
    z = x.double() @ w.double() + b.double()
    score = z.abs() if absolute else z
    best = score.topk(k, dim=1).values
    got = score.gather(1, i.long())
    assert rel(got.sort(1, descending=True).values, best) < TOL[dtype]  # the selection is (nearly) the true top-k
    expect = z.gather(1, i.long())
    expect = expect if absolute else expect.relu()
    assert rel(v, expect) < TOL[dtype]  # values are the z of the selected latents
    assert int(i.min()) >= 0 and int(i.max()) < N and (i.sort(1).values.diff(dim=1) != 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 32, 128])
def test_sparse_kernels_gpu(dtype, k):
    B, D, N = 3001, 768, 32768
    idx = torch.randint(0, N, (B, k), device="cuda", dtype=torch.int32)
    vals = torch.randn(B, k, device="cuda")
    W = torch.randn(N, D, device="cuda").to(dtype)
    bias = torch.randn(D, device="cuda")
    g = torch.randn(B, D, device="cuda").to(dtype)
    out = torch.full((B, D), float("nan"), device="cuda")
    gather_sum(vals, idx, W, bias, out=out)
    assert not out.isnan().any() and rel(out, ref.gather_sum_reference(vals, idx.long(), W, bias)) < 1e-5
    dots = torch.full((B, k), float("nan"), device="cuda")
    gather_dot(g, idx, W, out=dots)
    assert not dots.isnan().any() and rel(dots, ref.gather_dot_reference(g, idx.long(), W)) < 1e-5
    acc = torch.full((N, D), float("nan"), device="cuda")
    scatter_outer(vals, idx, g, N, out=acc)
    assert not acc.isnan().any() and rel(acc, ref.scatter_outer_reference(vals, idx.long(), g, N)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_gpu_matches_dense_reference(dtype):
    B, D, N, k = 2048, 256, 8192, 32
    leaves = [torch.randn(B, D, device="cuda"), torch.randn(D, N, device="cuda") / 16, torch.randn(N, device="cuda") * 0.1,
              torch.randn(N, D, device="cuda") / 16, torch.randn(D, device="cuda")]
    target = torch.randn(B, D, device="cuda")
    ours = [t.clone().requires_grad_() for t in leaves]  # x too: its gradient and b_dec's centring one both go through
    v, i = TopKEncode.apply(ours[0], ours[4], ours[1], ours[2], k, False, dtype)
    ((SparseDecode.apply(v, i, ours[3].to(dtype), ours[4]) - target) ** 2).sum().backward()
    theirs = [t.double().requires_grad_() for t in leaves]
    xs = theirs[0] - theirs[4]
    xs = xs + (xs.to(dtype).double() - xs).detach()  # the kernel's operand rounding, with an identity gradient
    z = xs @ (theirs[1].to(dtype).double() if dtype != torch.float32 else theirs[1]) + theirs[2]
    f = torch.zeros_like(z).scatter(1, i.long(), z.gather(1, i.long())).relu()
    wd = theirs[3].to(dtype).double() if dtype != torch.float32 else theirs[3]
    ((f @ wd + theirs[4] - target.double()) ** 2).sum().backward()
    for name, a, b in zip(["x", "W_enc", "b_enc", "W_dec", "b_dec"], ours, theirs):
        assert rel(a.grad, b.grad) < TOL[dtype], name


def test_training_triton_vs_torch_loss_curves_agree_over_500_steps():
    from sae_widgets.sae import SAE, SAEConfig
    from sae_widgets.synthetic import SyntheticActivations
    from sae_widgets.train import Trainer, TrainConfig

    curves = {}
    for backend in ("triton", "torch"):
        gen = SyntheticActivations(d_in=256, n_features=2048, mean_active=16, batch_size=4096, seed=0, device="cuda")
        torch.manual_seed(0)
        sae = SAE(SAEConfig(arch="topk", d_in=256, d_sae=4096, k=32, backend=backend)).cuda()
        tr = Trainer(sae, gen, TrainConfig(total_tokens=4096 * 500, lr=1e-3, progress=False, log_every=1,
                                           dead_window_tokens=4096 * 50))
        tr.run()
        curves[backend] = torch.tensor([h["loss"] for h in tr.history])
    diff = ((curves["triton"] - curves["torch"]).abs() / curves["torch"]).max().item()
    print(f"max relative difference of the loss curves over 500 steps: {diff:.4f}")
    assert diff < 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k_max", [32, 128])
def test_jumprelu_variant_gpu(dtype, k_max):
    B, D, N = 4097, 768, 32768
    x = torch.randn(B, D, device="cuda").to(dtype)
    w = (torch.randn(D, N, device="cuda") / D ** 0.5).to(dtype)
    b = torch.randn(N, device="cuda") * 0.1
    theta = torch.rand(N, device="cuda") + 2.2  # about 10-30 active latents per row
    keys = torch.full((B, candidate_width(B, N, k_max, jumprelu=True)), 2 ** 62, dtype=torch.int64, device="cuda")
    v, i, counts = encode_topk(x, w, b, k_max, theta=theta, keys_out=keys)
    assert (keys != 2 ** 62).all(), "an output slot was never written"
    z = x.double() @ w.double() + b.double()
    active = z > theta.double()
    n_ref = active.sum(1)
    near = ((z - theta.double()).abs() < 1e-2).sum(1)  # rounding can flip entries within the dtype's error of θ
    assert ((counts.long() - n_ref).abs() <= near).all()
    fits = counts <= k_max
    got = torch.zeros_like(z).scatter(1, i.long(), v.double())
    want = torch.where(active, z, 0.0)
    clear = (z - theta.double()).abs() > (3e-2 if dtype == torch.bfloat16 else 1e-2)  # not within rounding of θ
    assert rel((got * clear)[fits], (want * clear)[fits]) < TOL[dtype]
    flipped = ((got != 0) != active) & clear
    assert not flipped[fits].any(), "an entry clearly above (or below) its threshold was misclassified"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [768, 3000])
def test_decoder_row_upkeep_gpu(dtype, d):
    from sae_widgets.kernels.decoder_rows import normalize_rows_, project_out_rows_

    w = torch.randn(32768, d, device="cuda", dtype=torch.float64)
    w_unit = ref.normalize_rows_reference(w)
    g = torch.randn_like(w)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    out = w.to(dtype)
    normalize_rows_(out)
    torch.testing.assert_close(out.double(), w_unit, **tol)
    out = g.to(dtype)
    project_out_rows_(out, w_unit.to(dtype))
    torch.testing.assert_close(out.double(), ref.project_out_rows_reference(g, w_unit), **tol)
