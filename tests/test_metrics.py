"""Metrics: every value against hand-computed numbers or a plain float64 re-computation written here, streaming
equals one-shot, and the spliced CE / KL on the embedded model against runs built by hand. The SAEs are stand-ins
with the SAE interface (fixed linear encoder, activation, linear decoder), so no test depends on sae.py."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sae_widgets.metrics import (
    MODEL_METRICS,
    RECONSTRUCTION_METRICS,
    SPARSITY_METRICS,
    MetricAccumulator,
    cossim,
    density_fractions,
    evaluate,
    explained_variance,
    feature_density,
    fvu,
    l0,
    l0_per_token,
    l1,
    l2_ratio,
    log10_density_histogram,
    model_metrics,
    mse,
    reconstruction_metrics,
    relative_reconstruction_bias,
    splice_hooks,
)

RESID = "blocks.1.hook_resid_post"
N_CTX = 16


# ----------------------------------------------------------------------------------------------- stand-ins
@dataclass
class Cfg:
    d_in: int
    d_sae: int
    hook: str
    out_hook: str | None = None
    d_out: int | None = None

    def __post_init__(self):
        self.d_out = self.d_out or self.d_in


class StandInSAE(nn.Module):
    """The SAE interface with fixed weights: f = act(x W_enc + b_enc), x̂ = f W_dec + b_dec."""

    def __init__(self, cfg, W_enc, W_dec, b_enc=None, b_dec=None, act=torch.relu):
        super().__init__()
        self.cfg, self.act = cfg, act
        self.W_enc, self.W_dec = nn.Parameter(W_enc.clone()), nn.Parameter(W_dec.clone())
        self.b_enc = nn.Parameter(torch.zeros(W_enc.shape[1]) if b_enc is None else b_enc.clone())
        self.b_dec = nn.Parameter(torch.zeros(W_dec.shape[1]) if b_dec is None else b_dec.clone())

    def encode(self, x):
        return self.act(x @ self.W_enc + self.b_enc)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec

    def forward(self, x):
        f = self.encode(x)
        return self.decode(f), f, {}


def identity_sae(hook=RESID, d=256):
    eye = torch.eye(d)
    return StandInSAE(Cfg(d, d, hook), eye, eye, act=lambda z: z)


def zero_sae(hook=RESID, d=256):
    return StandInSAE(Cfg(d, d, hook), torch.eye(d), torch.zeros(d, d))


def random_sae(hook=RESID, d=256, d_sae=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return StandInSAE(Cfg(d, d_sae, hook), torch.randn(d, d_sae, generator=g) / d**0.5,
                      torch.randn(d_sae, d, generator=g) / d_sae**0.5, b_enc=torch.full((d_sae,), -0.5))


def mlp_transcoder(model, layer=0):
    """The layer's true MLP as a transcoder ln2.hook_normalized -> hook_mlp_out: the LN affine folded into the
    encoder, latents = the MLP's hidden GELU activations, decoder = its output projection."""
    block = model.blocks[layer]
    ln, mlp = block.ln2.original_component, block.mlp.original_component
    w_in, b_in = mlp.c_fc.weight.detach(), mlp.c_fc.bias.detach()  # Conv1D: [d_model, d_mlp]
    cfg = Cfg(w_in.shape[0], w_in.shape[1], f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out")
    return StandInSAE(cfg, ln.weight.detach()[:, None] * w_in, mlp.c_proj.weight.detach(),
                      b_enc=ln.bias.detach() @ w_in + b_in, b_dec=mlp.c_proj.bias.detach(),
                      act=lambda z: F.gelu(z, approximate="tanh"))


# ----------------------------------------------------------------------------------------------- plain references
def reference(x, xh, f=None):
    """§3 formulas, written out directly in float64 on the whole set."""
    x, xh = x.double(), xh.double()
    e = ((x - xh) ** 2).sum(1).mean()
    var = (x ** 2).sum(1).mean() - (x.mean(0) ** 2).sum()
    out = {"mse": e.item(), "explained_variance": (1 - e / var).item(), "fvu": (e / var).item(),
           "cossim": F.cosine_similarity(x, xh, dim=1).mean().item(),
           "l2_ratio": (xh.norm(dim=1) / x.norm(dim=1)).mean().item(),
           "relative_reconstruction_bias": ((xh ** 2).sum(1).mean() / (x * xh).sum(1).mean()).item()}
    if f is not None:
        fires = (f != 0).double()
        density = fires.mean(0)
        out.update(l0=fires.sum(1).mean().item(), l1=f.double().abs().sum(1).mean().item(),
                   frac_alive=(density > 0).double().mean().item(),
                   freq_over_1_percent=(density > 0.01).double().mean().item(),
                   freq_over_10_percent=(density > 0.1).double().mean().item())
    return out


def assert_metrics(got, want, rel=1e-9, abs=1e-12):
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=rel, abs=abs), k


# ----------------------------------------------------------------------------------------------- reconstruction
def test_hand_computed_two_vectors():
    # x = (1,0), (0,2); x̂ = (1,1), (0,3); errors (0,1), (0,-1)
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    xh = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    # E‖e‖² = 1; E‖x‖² = 2.5, E x = (0.5, 1) -> ‖E x‖² = 1.25 -> variance 1.25 -> EV = 1 - 1/1.25 = 0.2
    assert mse(x, xh) == pytest.approx(1.0)
    assert explained_variance(x, xh) == pytest.approx(0.2)
    assert fvu(x, xh) == pytest.approx(0.8)
    assert cossim(x, xh) == pytest.approx((1 / math.sqrt(2) + 1) / 2)  # cos 1/√2 and 6/(2·3)
    assert l2_ratio(x, xh) == pytest.approx((math.sqrt(2) + 1.5) / 2)  # √2/1 and 3/2
    assert relative_reconstruction_bias(x, xh) == pytest.approx(5.5 / 3.5)  # E‖x̂‖² = (2+9)/2, E⟨x,x̂⟩ = (1+6)/2


def test_perfect_reconstruction():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(1)) + 3.0
    m = reconstruction_metrics(x, x.clone())
    assert m["mse"] == 0.0
    assert m["explained_variance"] == pytest.approx(1.0, abs=1e-12)
    assert m["fvu"] == pytest.approx(0.0, abs=1e-12)
    for k in ("cossim", "l2_ratio", "relative_reconstruction_bias"):
        assert m[k] == pytest.approx(1.0, abs=1e-12), k


def test_half_shrinkage():
    # zero-mean data (rows come in ± pairs): E‖x − x̂‖² = ¼E‖x‖² and the variance is E‖x‖², so EV = 3/4
    v = torch.randn(20, 6, generator=torch.Generator().manual_seed(2))
    x = torch.cat([v, -v])
    m = reconstruction_metrics(x, 0.5 * x)
    assert m["l2_ratio"] == pytest.approx(0.5)
    assert m["relative_reconstruction_bias"] == pytest.approx(0.5)
    assert m["explained_variance"] == pytest.approx(0.75)
    assert m["fvu"] == pytest.approx(0.25)
    assert m["cossim"] == pytest.approx(1.0)
    assert m["mse"] == pytest.approx(0.25 * (x ** 2).sum(1).mean().item())


def test_streaming_equals_one_shot_on_concatenation():
    g = torch.Generator().manual_seed(3)
    offset = torch.linspace(-50, 50, 16)  # a large common mean: a per-batch mean would give other numbers
    x = torch.randn(230, 16, generator=g) * torch.linspace(0.5, 2, 16) + offset
    xh = x + 0.3 * torch.randn(230, 16, generator=g)
    f = torch.relu(torch.randn(230, 40, generator=g) - 1.0)
    acc = MetricAccumulator()
    for a, b in [(0, 7), (7, 100), (100, 101), (101, 230)]:  # uneven batches, one of a single row
        acc.update(x[a:b], xh[a:b], f[a:b])
    got = acc.compute()
    assert_metrics(got, reference(x, xh, f), rel=1e-9)
    assert acc.n == acc.n_latent_rows == 230
    # the mean of per-batch EVs is a different (wrong) quantity: make sure the test can tell them apart
    per_batch = [explained_variance(x[a:b], xh[a:b]) for a, b in [(0, 7), (7, 100), (101, 230)]]
    assert abs(sum(per_batch) / 3 - got["explained_variance"]) > 1e-4


def test_sparsity_hand_made_latents():
    # 4 tokens x 4 latents, signed values fire too (AbsTopK)
    f = torch.tensor([[0.0, 2.0, -1.0, 0.0],
                      [0.0, 0.0, 3.0, 0.0],
                      [0.0, 0.0, 0.0, 0.0],
                      [1.0, 0.0, 0.0, 0.0]])
    assert l0(f) == pytest.approx(1.0)  # (2 + 1 + 0 + 1) / 4
    assert l1(f) == pytest.approx(7 / 4)  # (3 + 3 + 0 + 1) / 4
    assert l0_per_token(f).tolist() == [2, 1, 0, 1]
    assert feature_density(f).tolist() == [0.25, 0.25, 0.5, 0.0]
    acc = MetricAccumulator()
    acc.update(torch.ones(4, 2), torch.ones(4, 2), f)
    assert acc.l0_histogram().tolist() == [1, 2, 1]  # one token with L0 0, two with 1, one with 2
    assert acc.feature_density().tolist() == [0.25, 0.25, 0.5, 0.0]
    assert acc.compute()["l1"] == pytest.approx(7 / 4)


def test_density_thresholds_are_strict():
    # 200 tokens; latents fire on 100, 10, 1, 0, 2 (= 1 % exactly) and 20 (= 10 % exactly) tokens
    fires = [100, 10, 1, 0, 2, 20]
    f = torch.zeros(200, len(fires))
    for j, k in enumerate(fires):
        f[:k, j] = 1.0
    density = feature_density(f)
    assert density.tolist() == [0.5, 0.05, 0.005, 0.0, 0.01, 0.1]
    fr = density_fractions(density)
    assert fr == {"frac_alive": 5 / 6, "freq_over_1_percent": 3 / 6, "freq_over_10_percent": 1 / 6}
    acc = MetricAccumulator()
    for a in range(0, 200, 64):
        acc.update(torch.ones(len(f[a:a + 64]), 3), torch.ones(len(f[a:a + 64]), 3), f[a:a + 64])
    m = acc.compute()
    assert (m["frac_alive"], m["freq_over_1_percent"], m["freq_over_10_percent"]) == (5 / 6, 3 / 6, 1 / 6)
    counts, edges = log10_density_histogram(density, bins=10)  # bins of one decade over [-10, 0]
    assert len(edges) == 11 and counts.sum() == 6
    assert counts[0] == 1  # the dead latent, at log10(1e-10) = -10
    # log10 -0.30 and -1 (the +1e-10 nudges it just above -1) in [-1, 0]; -1.30 and -2 (+) in [-2, -1); -2.30 in [-3, -2)
    assert counts[9] == 2 and counts[8] == 2 and counts[7] == 1


def test_accumulator_rejects_mismatched_shapes():
    acc = MetricAccumulator()
    with pytest.raises(ValueError, match="differ in shape"):
        acc.update(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="rows"):
        acc.update(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(2, 8))


# ----------------------------------------------------------------------------------------------- model metrics
@pytest.fixture(scope="module")
def tokens(model):
    """Two batches of 3 BOS-led windows of N_CTX tokens, as the store cuts them."""
    from sae_widgets.activations import ActivationStore

    store = ActivationStore(model, RESID, n_ctx=N_CTX, batch_size=64, model_batch_size=4, buffer_size=256,
                            show_progress=False)
    it = store.rows.window_batches(3)
    return [next(it), next(it)]


def ce_plain(logits, toks, start=1):
    """Mean next-token CE over the predictions made at positions start..n-2, float64."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    vals = [-lp[b, p, toks[b, p + 1]] for b in range(toks.shape[0]) for p in range(start, toks.shape[1] - 1)]
    return torch.stack(vals).mean().item()


def ce_with_hook(model, batches, hook, fn):
    with torch.no_grad():
        return sum(ce_plain(model.run_with_hooks(t, fwd_hooks=[(hook, fn)]), t) for t in batches) / len(batches)


def test_identity_sae_recovers_clean(model, tokens):
    m = model_metrics(model, identity_sae(), tokens, prepend_bos=True)
    with torch.no_grad():
        clean = sum(ce_plain(model(t), t) for t in tokens) / len(tokens)  # both batches have the same size
    assert m["ce_loss_without_sae"] == pytest.approx(clean, rel=1e-5)
    assert m["ce_loss_with_sae"] == pytest.approx(m["ce_loss_without_sae"], rel=1e-5)
    assert m["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert m["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-5)
    assert m["kl_div_score"] == pytest.approx(1.0, abs=1e-4)
    assert m["ce_loss_with_ablation"] > m["ce_loss_without_sae"] + 0.1
    assert m["n_predicted_tokens"] == 2 * 3 * (N_CTX - 2)


def test_zero_sae_equals_ablation_and_bos_is_kept(model, tokens):
    m = model_metrics(model, zero_sae(), tokens, prepend_bos=True)
    assert m["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)
    assert m["kl_div_score"] == pytest.approx(0.0, abs=1e-6)

    def zero_after_bos(act, hook):
        act = act.clone()
        act[:, 1:] = 0
        return act

    assert m["ce_loss_with_ablation"] == pytest.approx(ce_with_hook(model, tokens, RESID, zero_after_bos), rel=1e-5)


def test_error_term_restores_clean(model, tokens):
    m = model_metrics(model, random_sae(), tokens, prepend_bos=True)
    assert m["ce_loss_with_sae"] > m["ce_loss_without_sae"] + 0.01  # a bad SAE: the check below is not vacuous
    assert m["ce_loss_with_sae_and_error"] == pytest.approx(m["ce_loss_without_sae"], rel=1e-5)
    assert m["kl_div_with_sae_and_error"] == pytest.approx(0.0, abs=1e-5)
    assert m["kl_div_with_sae"] > 1e-3


def test_no_bos_scores_every_prediction(model, tokens):
    m = model_metrics(model, identity_sae(), tokens[:1], prepend_bos=False)
    with torch.no_grad():
        assert m["ce_loss_without_sae"] == pytest.approx(ce_plain(model(tokens[0]), tokens[0], start=0), rel=1e-5)
    assert m["n_predicted_tokens"] == 3 * (N_CTX - 1)


def test_transcoder_with_true_mlp_gives_clean(model, tokens):
    tc = mlp_transcoder(model)
    m = model_metrics(model, tc, tokens[:1], prepend_bos=True)
    assert m["ce_loss_with_sae"] == pytest.approx(m["ce_loss_without_sae"], rel=1e-5)
    assert m["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert m["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-5)
    assert m["ce_loss_with_ablation"] > m["ce_loss_without_sae"]  # ablation zeroes the MLP output


def test_hook_z_heads_are_flattened_in_order(model, tokens):
    hook, d_head = "blocks.1.attn.hook_z", 64
    eye = torch.eye(4 * d_head)
    ident = StandInSAE(Cfg(4 * d_head, 4 * d_head, hook), eye, eye, act=lambda z: z)
    m = model_metrics(model, ident, tokens[:1], prepend_bos=True)
    assert m["ce_loss_with_sae"] == pytest.approx(m["ce_loss_without_sae"], rel=1e-5)
    # an "SAE" that drops head 2: columns 128..191 of the flattened row
    keep = torch.ones(4 * d_head)
    keep[2 * d_head:3 * d_head] = 0
    drop2 = StandInSAE(Cfg(4 * d_head, 4 * d_head, hook), eye, torch.diag(keep), act=lambda z: z)
    m = model_metrics(model, drop2, tokens[:1], prepend_bos=True)

    def zero_head_2(z, hook):
        z = z.clone()
        z[:, 1:, 2] = 0
        return z

    want = ce_with_hook(model, tokens[:1], hook, zero_head_2)
    assert m["ce_loss_with_sae"] == pytest.approx(want, rel=1e-5)
    assert abs(want - m["ce_loss_without_sae"]) > 1e-4


def test_splice_hooks_checks_width(model, tokens):
    bad = identity_sae(d=128)
    with pytest.raises(ValueError, match="d_in=128"):
        model.run_with_hooks(tokens[0], fwd_hooks=splice_hooks(bad, "sae"))
    with pytest.raises(ValueError, match="mode"):
        splice_hooks(bad, "add")


# ----------------------------------------------------------------------------------------------- evaluate
class ListStore:
    """A cache-like store: fixed batches, no token windows."""

    def __init__(self, batches, hooks):
        self.batches, self.hooks, self.i = batches, hooks, 0

        class Rows:
            pass
        self.rows = Rows()

    def next_batch(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b


def test_evaluate_streams_exactly_n_tokens_without_model():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(100, 256, generator=g) + 2.0
    sae = random_sae()
    store = ListStore([x[i:i + 32] for i in range(0, 96, 32)], [RESID])
    res = evaluate(None, sae, store, n_tokens=70)  # 32 + 32 + 6 rows
    with torch.no_grad():
        x_hat, f, _ = sae(x[:70])
    assert_metrics(res.metrics, reference(x[:70], x_hat, f), rel=1e-6)
    assert res.n_tokens == 70 and res.l0_histogram.sum() == 70
    assert res.feature_density.shape == (512,)
    assert not any(k in res.metrics for k in MODEL_METRICS)
    assert "skipped: no model given" in res.table()
    res2 = evaluate(object(), sae, ListStore([x[:32]], [RESID]), n_tokens=10)  # a model but a cache-backed store
    assert "cache-backed" in res2.table()


def test_evaluate_with_model(model):
    from sae_widgets.activations import ActivationStore

    store = ActivationStore(model, RESID, n_ctx=N_CTX, batch_size=64, model_batch_size=4, buffer_size=256,
                            show_progress=False)
    sae = random_sae()
    sae.train()
    res = evaluate(model, sae, store, n_tokens=150, ce_tokens=2 * N_CTX, ce_batch_size=2)
    assert sae.training  # mode restored
    for k in RECONSTRUCTION_METRICS + SPARSITY_METRICS + MODEL_METRICS:
        assert math.isfinite(res.metrics[k]), k
    assert res.n_tokens == 150 and res.n_model_tokens == 2 * (N_CTX - 2)
    # the model metrics are those of the first windows of the store's source
    want = model_metrics(model, sae, [next(store.rows.window_batches(2))], prepend_bos=True)
    for k in MODEL_METRICS:
        assert res.metrics[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), k
    table = res.table()
    assert all(k in table for k in ("explained_variance", "ce_loss_score", "freq_over_10_percent"))
    assert "<table>" in res._repr_html_() and "| `mse` |" in res.to_markdown()
    d = res.to_dict()
    assert len(d["feature_density"]) == 512 and sum(d["log10_density_histogram"]["counts"]) == 512
    res3 = evaluate(model, sae, store, n_tokens=10, n_ctx_batches=1, ce_batch_size=1)
    assert res3.n_model_tokens == N_CTX - 2


def test_evaluate_transcoder_targets_y(model):
    from sae_widgets.activations import ActivationStore

    tc = mlp_transcoder(model)
    store = ActivationStore(model, (tc.cfg.hook, tc.cfg.out_hook), n_ctx=N_CTX, batch_size=64, model_batch_size=4,
                            buffer_size=256, show_progress=False)
    res = evaluate(model, tc, store, n_tokens=64, ce_tokens=N_CTX, ce_batch_size=1)
    assert res.metrics["explained_variance"] == pytest.approx(1.0, abs=1e-5)  # the true MLP reconstructs y
    assert res.metrics["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="reads"):
        evaluate(None, identity_sae(), store, n_tokens=8)
