"""Triton kernels under the interpreter (TRITON_INTERPRET=1, set in conftest before triton is imported), tiny shapes,
against the PyTorch references in kernels/reference.py; and the SAE's Triton backend against its PyTorch backend."""
from __future__ import annotations

import pytest
import torch

from sae_widgets.kernels.autograd import SparseDecode, TopKEncode
from sae_widgets.kernels.sparse_ops import gather_dot, gather_sum, scatter_outer
from sae_widgets.kernels.topk_encoder import encode_topk
from sae_widgets.kernels import reference as ref
from sae_widgets.kernels.topk_encoder import _tiles, candidate_width
from sae_widgets.kernels.topk_merge import merge_topk
from sae_widgets.sae import SAE, SAEConfig

B, D, N = 21, 24, 150  # none a multiple of the block sizes


@pytest.mark.parametrize("method", ["tiles", "scan"])
@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("k", [1, 5])
def test_fused_encoder_topk_matches_reference_and_writes_every_candidate(absolute, k, method):
    g = torch.Generator().manual_seed(k + 10 * absolute)
    x, w, b = torch.randn(B, D, generator=g), torch.randn(D, N, generator=g), torch.randn(N, generator=g)
    poison = torch.full((B, candidate_width(B, N, k, method)), 2 ** 62, dtype=torch.int64)  # would win every top-k
    v, i = encode_topk(x, w, b, k, absolute, keys_out=poison, method=method)
    rv, ri = ref.encode_topk_reference(x, w, b, k, absolute)
    assert i.dtype == torch.int32 and torch.equal(i.long(), ri)
    torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-5)
    assert (poison != 2 ** 62).all(), "an output slot was never written"


@pytest.mark.parametrize("absolute", [False, True])
def test_tiles_flags_exactly_the_rows_whose_top_k_crowd_one_tile_and_recomputes_them(absolute):
    """With 32-wide tiles keeping R = 3 keys each, any row with three of its top 5 in one tile must be flagged (and only
    those), and the answer for every row, flagged or not, must equal the reference."""
    g = torch.Generator().manual_seed(5 + absolute)
    k, cfg = 5, (16, 32, 16, 3, 4, 2)  # (BM, BN, BK, R, warps, stages)
    x, w, b = torch.randn(B, D, generator=g), torch.randn(D, N, generator=g), torch.randn(N, generator=g)
    keys, n_tiles = _tiles(x, w, b, absolute, cfg)
    _, flagged = merge_topk(keys, k, n_tiles, cfg[3], flag_last=True)
    rv, ri = ref.encode_topk_reference(x, w, b, k, absolute)
    per_tile = torch.zeros(B, n_tiles, dtype=torch.long).scatter_add_(1, ri // cfg[1], torch.ones_like(ri))
    crowded = (per_tile >= cfg[3]).any(1)
    assert 0 < int(crowded.sum()) < B, "the data should give both kinds of rows"
    assert torch.equal(flagged.bool(), crowded)
    v, i = encode_topk(x, w, b, k, absolute, config=cfg)
    assert torch.equal(i.long(), ri)
    torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows, groups, per_group, k", [(5, 7, 3, 4), (9, 3, 5, 5), (4, 40, 2, 3), (3, 2, 4, 8)])
def test_merge_topk_equals_torch_topk_and_merges_only_the_rows_asked(rows, groups, per_group, k):
    g = torch.Generator().manual_seed(rows * groups)
    keys = torch.randint(-2 ** 40, 2 ** 40, (rows, groups, per_group), generator=g)
    keys = keys.sort(-1, descending=True).values.reshape(rows, -1).contiguous()  # each group largest first
    top, flags = merge_topk(keys, k, groups, per_group, flag_last=True)
    want = keys.topk(k, dim=1)
    assert torch.equal(top, want.values)
    assert torch.equal(flags.bool(), (want.indices % per_group == per_group - 1).any(1))  # a group's last key chosen
    only = (torch.arange(rows) % 2 == 0).int()
    some, _ = merge_topk(keys, k, groups, per_group, only_rows=only)
    assert torch.equal(some[only.bool()], want.values[only.bool()])


def test_fp16_inputs_select_the_reference_values():
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(B, D, generator=g).half(), torch.randn(D, N, generator=g).half(), torch.randn(N, generator=g)
    v, i = encode_topk(x, w, b, 4, False)
    z = x.double() @ w.double() + b.double()
    torch.testing.assert_close(z.gather(1, i.long()).relu(), z.topk(4, dim=1).values.relu(), rtol=1e-3, atol=1e-3)


def test_ties_go_to_the_lower_index_deterministically():
    x = torch.ones(3, 16)
    w = torch.zeros(16, 64)
    for col in (5, 9, 40, 41):  # four columns tie exactly
        w[:, col] = 1.0
    w[:, 20] = -1.0  # a tie in |z| with the columns above, of opposite sign
    b = torch.zeros(64)
    v, i = encode_topk(x, w, b, 2, False)
    assert i.tolist() == [[5, 9]] * 3 and v.tolist() == [[16.0, 16.0]] * 3
    v, i = encode_topk(x, w, b, 2, True)
    assert i.tolist() == [[5, 9]] * 3
    v, i = encode_topk(x, w, b, 8, True)  # five tied by |z|: 5, 9, 20 (negative), 40, 41 in index order
    assert i[0, :5].tolist() == [5, 9, 20, 40, 41] and v[0, :5].tolist() == [16, 16, -16, 16, 16]
    rv, ri = ref.encode_topk_reference(x, w, b, 8, True)
    assert torch.equal(i.long(), ri)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sparse_decoder_kernels_match_references(dtype):
    g = torch.Generator().manual_seed(1)
    k = 6
    idx = torch.randint(0, N, (B, k), generator=g, dtype=torch.int32)
    idx[:, 0] = 7  # one hot latent shared by every row; most latents never appear
    vals = torch.randn(B, k, generator=g)
    W = torch.randn(N, D, generator=g).to(dtype)
    bias = torch.randn(D, generator=g)
    grad = torch.randn(B, D, generator=g).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    out = torch.full((B, D), float("nan"))
    gather_sum(vals, idx, W, bias, out=out)
    torch.testing.assert_close(out, ref.gather_sum_reference(vals, idx.long(), W, bias), **tol)
    dots = torch.full((B, k), float("nan"))
    gather_dot(grad, idx, W, out=dots)
    torch.testing.assert_close(dots, ref.gather_dot_reference(grad, idx.long(), W), **tol)
    acc = torch.full((N, D), float("nan"))
    scatter_outer(vals, idx, grad, N, out=acc)
    torch.testing.assert_close(acc, ref.scatter_outer_reference(vals, idx.long(), grad, N), **tol)
    acc_t = torch.full((D, N), float("nan"))  # W_enc's [d_in, n] layout, written through a transposed view
    scatter_outer(vals, idx, grad, N, out=acc_t.t())
    torch.testing.assert_close(acc_t.t(), ref.scatter_outer_reference(vals, idx.long(), grad, N), **tol)


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("x_grad", [False, True])
def test_autograd_functions_match_dense_float64_gradients(absolute, x_grad):
    """b_dec both centres the encoder input and biases the decoder, as in the SAE. Without an input gradient, its
    encoder part comes from −W_enc·∂b_enc instead of a B × d_in gradient: both ways must match float64 autograd."""
    g = torch.Generator().manual_seed(2)
    k = 4
    x = torch.randn(B, D, generator=g, requires_grad=x_grad)
    w_enc = torch.randn(D, N, generator=g, requires_grad=True)
    b_enc = torch.randn(N, generator=g, requires_grad=True)
    w_dec = torch.randn(N, D, generator=g, requires_grad=True)
    b_dec = torch.randn(D, generator=g, requires_grad=True)
    target = torch.randn(B, D, generator=g)
    v, i = TopKEncode.apply(x, b_dec, w_enc, b_enc, k, absolute, torch.float32)
    loss = ((SparseDecode.apply(v, i, w_dec, b_dec) - target) ** 2).sum()
    loss.backward()
    ours = (x, w_enc, b_enc, w_dec, b_dec)
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in ours]
    z = (leaves[0] - leaves[4]) @ leaves[1] + leaves[2]
    f = torch.zeros_like(z).scatter(1, i.long(), z.gather(1, i.long()))
    f = f if absolute else torch.relu(f)
    ((f @ leaves[3] + leaves[4] - target.double()) ** 2).sum().backward()
    for mine, theirs in zip(ours, leaves):
        assert (mine.grad is None) == (not mine.requires_grad)
        if mine.requires_grad:
            torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["topk", "abstopk"])
def test_sae_triton_backend_equals_torch_backend(arch):
    torch.manual_seed(0)
    cfg = dict(arch=arch, d_in=D, d_sae=N, k=4, aux_k=8)
    fast, slow = SAE(SAEConfig(**cfg, backend="triton")), SAE(SAEConfig(**cfg, backend="torch"))
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(B, D) * 3
    fast.initialize(x)
    slow.initialize(x)
    dead = torch.arange(0, N, 3)  # the aux-k loss takes part
    losses = []
    for sae in (fast, slow):
        loss, parts = sae.training_loss(x, dead_latents=dead)
        loss.backward()
        losses.append((loss, parts))
    torch.testing.assert_close(losses[0][0], losses[1][0], rtol=1e-5, atol=1e-5)
    assert torch.equal(losses[0][1]["_fired"], losses[1][1]["_fired"]) and "aux_k" in losses[0][1]
    for (name, p), q in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)
    with torch.no_grad():
        for a, b in zip(fast(x)[:2], slow(x)[:2]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("k", [1, 5])
def test_running_topk_over_many_tiles_in_one_program(absolute, k):
    """One program scans 1,000 latents (16 tiles), merging its running top-k sixteen times per row."""
    g = torch.Generator().manual_seed(7 + k)
    x, w, b = torch.randn(B, D, generator=g), torch.randn(D, 1000, generator=g), torch.randn(1000, generator=g)
    w[:, 900] = w[:, 100]  # an exact tie far apart: the earlier index must win
    b[900] = b[100]
    v, i = encode_topk(x, w, b, k, absolute, config=(16, 64, 16, 1, 4, 2), method="scan")
    rv, ri = ref.encode_topk_reference(x, w, b, k, absolute)
    assert torch.equal(i.long(), ri)
    torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-5)


def test_jumprelu_variant_gives_the_active_latents_in_sparse_form():
    g = torch.Generator().manual_seed(11)
    x, w, b = torch.randn(B, D, generator=g), torch.randn(D, N, generator=g), torch.randn(N, generator=g)
    theta = torch.rand(N, generator=g) * 8 + 4  # a few latents per row clear their threshold
    v, i, counts = encode_topk(x, w, b, 32, theta=theta)
    rv, ri, rc = ref.encode_jumprelu_reference(x, w, b, theta, 32)
    assert torch.equal(counts.long(), rc) and int(rc.max()) <= 32 and int(rc.min()) >= 0
    assert torch.equal(i.long(), ri)
    torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-5)
    _, _, few = encode_topk(x, w, b, 1, theta=theta * 0.2)  # too many actives for k_max = 1: the count says so
    assert int(few.max()) > 1


def test_jumprelu_sae_inference_on_the_kernels_equals_the_dense_path():
    torch.manual_seed(4)
    cfg = dict(arch="jumprelu", d_in=D, d_sae=N, jumprelu_init_threshold=3.0, jumprelu_max_active=32)
    fast, slow = SAE(SAEConfig(**cfg, backend="triton")), SAE(SAEConfig(**cfg, backend="torch"))
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(B, D) * 3
    with torch.no_grad():
        assert fast.uses_triton(x)
        for a, b in zip(fast(x)[:2], slow(x)[:2]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        tight = SAE(SAEConfig(**{**cfg, "jumprelu_max_active": 1}, backend="triton"))
        tight.load_state_dict(fast.state_dict())
        torch.testing.assert_close(tight(x)[0], slow(x)[0], rtol=1e-5, atol=1e-5)  # overflow: the dense path
    assert not fast.uses_triton(x), "with gradients on, JumpReLU stays dense"


@pytest.mark.parametrize("d", [24, 2500])  # one chunk per row, and rows longer than a chunk (the kernels loop)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decoder_row_upkeep_kernels_match_references(d, dtype):
    from sae_widgets.kernels.decoder_rows import normalize_rows_, project_out_rows_

    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, d, generator=g, dtype=torch.float64)
    w[3] = 0.0  # a zero row: normalisation divides by 1e-12 instead of 0
    w_unit = ref.normalize_rows_reference(w)
    grad = torch.randn(5, d, generator=g, dtype=torch.float64)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)

    out = w.to(dtype).clone()
    normalize_rows_(out)
    torch.testing.assert_close(out.double(), w_unit, **tol)
    assert out[3].abs().max() == 0
    out = grad.to(dtype).clone()
    project_out_rows_(out, w_unit.to(dtype))
    torch.testing.assert_close(out.double(), ref.project_out_rows_reference(grad, w_unit), **tol)
    dots = (out.double() * w_unit).sum(-1)  # what is left has no component along the row
    assert dots.abs().max() < (1e-4 if dtype == torch.float32 else 0.1), dots
    with pytest.raises(ValueError, match="row-major"):
        normalize_rows_(w.to(dtype).t())
