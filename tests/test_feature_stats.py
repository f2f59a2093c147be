"""FeatureStats against a float64 brute-force reference built from the dense activations of every token.

The reference uses plain loops over latents: per-latent sorting for the top contexts, np.histogram for the counts,
the centred decoder rows times the final LayerNorm's w times W_U for the logit effects, and, for the quantile samples, the
documented rule (the S firings with the smallest sample keys, split into equal-count bins by activation).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sae_widgets.feature_stats import FeatureStats, sae_fingerprint
from sae_widgets.feature_stats_sweep import HIST_PER_DECADE, QUANTILE_OVERSAMPLE, Sweep, residual_directions, sample_key
from sae_widgets.sae import SAE, SAEConfig
from sae_widgets.token_sources import EmbeddedCorpus, TokenArray
from sae_widgets.tokens import chunk_windows, join_documents

HOOK = "blocks.0.hook_resid_post"
N_CTX, N_WINDOWS, D_SAE, DEAD = 24, 40, 80, 7
SETTINGS = dict(n_top=5, n_quantile_bins=4, per_bin=2, context=(3, 2), n_hist_bins=12, n_logits=6, seed=3,
                show_progress=False, device="cpu")


@pytest.fixture(scope="module")
def stream(model):
    docs = EmbeddedCorpus("val").documents(model.tokenizer)
    return join_documents([next(docs), next(docs)], model.tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def windows(model, stream):
    return chunk_windows(stream, N_CTX, model.tokenizer.bos_token_id)[:N_WINDOWS]


def make_sae(arch: str, seed: int = 0) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(arch=arch, d_in=256, d_sae=D_SAE, k=6 if arch == "topk" else None, hook=HOOK))
    with torch.no_grad():
        sae.in_scale.fill_(0.5 if arch == "topk" else 1.3)  # relu: pre-activations of about unit scale
        sae.b_enc.copy_(torch.randn(D_SAE) * 0.5 - (1.0 if arch == "relu" else 0.0))
        sae.W_enc[:, DEAD] = 0.0
        sae.b_enc[DEAD] = -10.0  # never fires
    return sae.eval()


@pytest.fixture(scope="module", params=["topk", "relu"])
def case(request, model, windows):
    sae = make_sae(request.param)
    stats = FeatureStats.compute(model, sae, windows, batch_size=16, **SETTINGS)
    hook_acts = torch.cat([model.run_with_cache(windows[i:i + 16], names_filter=HOOK)[1][HOOK]
                           for i in range(0, N_WINDOWS, 16)])  # the batches the sweep ran, so the same floats
    with torch.no_grad():
        acts = sae.encode(hook_acts.reshape(-1, 256)).double().view(N_WINDOWS, N_CTX, D_SAE)
    acts[:, 0] = 0.0  # BOS is context only
    return SimpleNamespace(sae=sae, stats=stats, acts=acts.numpy(), hook_acts=hook_acts, arch=request.param)


# ----------------------------------------------------------------------------------------------- reference
def firing(case, i):
    """[(value, global token index)] of latent i over the scored tokens, in token order."""
    col = case.acts[:, :, i].reshape(-1)
    return [(float(col[t]), t) for t in np.nonzero(col > 0)[0].tolist()]


def ref_context(case, windows, i, t):
    left, right = SETTINGS["context"]
    w, p = divmod(t, N_CTX)
    lo, hi = max(0, p - left), min(N_CTX, p + right + 1)
    return {"ids": windows[w, lo:hi].tolist(), "acts": case.acts[w, lo:hi, i].tolist(), "peak": p - lo}


def check_context(stats, got, ref, windows_tokens=None):
    assert got["tokens"] == [stats.token_strings[t] for t in ref["ids"]]
    assert got["peak"] == ref["peak"]
    np.testing.assert_allclose(got["acts"], ref["acts"], rtol=1e-6, atol=1e-7)
    assert got["act"] == pytest.approx(ref["acts"][ref["peak"]], rel=1e-6)


# ----------------------------------------------------------------------------------------------- tests
def test_density_max_mean_match_the_dense_reference(case):
    n_scored = N_WINDOWS * (N_CTX - 1)
    assert case.stats.n_tokens == n_scored and case.stats.d_sae == D_SAE
    for i in range(D_SAE):
        f = case.stats.feature(i)
        vals = [v for v, _ in firing(case, i)]
        assert f["density"] == pytest.approx(len(vals) / n_scored, abs=0)
        assert f["max_act"] == pytest.approx(max(vals, default=0.0), rel=1e-6)
        assert f["mean_act"] == pytest.approx(sum(vals) / len(vals) if vals else 0.0, rel=1e-6)
    cols = case.stats.columns()
    np.testing.assert_array_equal(cols["latent"], np.arange(D_SAE))
    np.testing.assert_allclose(cols["density"], (case.acts > 0).reshape(-1, D_SAE).sum(0) / n_scored, rtol=0)
    np.testing.assert_allclose(cols["max_act"], case.acts.reshape(-1, D_SAE).max(0), rtol=1e-6)
    assert sum(1 for i in range(D_SAE) if firing(case, i)) > D_SAE // 2  # the setup has real variety


def test_top_contexts_values_and_positions(case, windows):
    n_top = SETTINGS["n_top"]
    for i in range(D_SAE):
        ref = sorted(firing(case, i), key=lambda e: (-e[0], e[1]))[:n_top]
        got = case.stats.feature(i)["top_contexts"]
        assert [divmod(t, N_CTX) for _, t in ref] == case.stats.context_positions(i)["top"]
        assert len(got) == len(ref)
        for g, (v, t) in zip(got, ref):
            assert g["act"] == pytest.approx(v, rel=1e-6)
            check_context(case.stats, g, ref_context(case, windows, i, t))
        peaks = Counter(g["tokens"][g["peak"]] for g in got)
        assert case.stats.feature(i)["top_tokens"] == [s for s, _ in peaks.most_common(5)]


def test_histogram_counts_and_log_spaced_edges(case):
    for i in range(D_SAE):
        h = case.stats.feature(i)["histogram"]
        assert len(h["edges"]) == SETTINGS["n_hist_bins"] + 1 and len(h["counts"]) == SETTINGS["n_hist_bins"]
        vals = np.array([v for v, _ in firing(case, i)])
        if len(vals) == 0:
            assert sum(h["counts"]) == 0
            continue
        edges = np.array(h["edges"])
        assert edges[0] <= vals.min() and vals.max() < edges[-1]
        ref_counts, _ = np.histogram(vals, bins=edges)
        assert h["counts"] == ref_counts.tolist()
        ratios = np.log10(edges[1:] / edges[:-1]) * HIST_PER_DECADE  # every bin spans the same whole number of grid steps
        np.testing.assert_allclose(ratios, np.round(ratios[0]), rtol=1e-5)
        assert np.round(ratios[0]) >= 1


def test_quantile_samples_follow_the_stratified_rule(case, windows):
    nb, per_bin, seed = SETTINGS["n_quantile_bins"], SETTINGS["per_bin"], SETTINGS["seed"]
    cap = nb * per_bin * QUANTILE_OVERSAMPLE
    n_subsampled = 0
    for i in range(D_SAE):
        fire = firing(case, i)
        keys = sample_key(torch.tensor([t for _, t in fire], dtype=torch.int64), torch.tensor(i), seed).tolist()
        sample = sorted(((k, t, v) for k, (v, t) in zip(keys, fire)), key=lambda e: (e[0], e[1]))[:cap]
        n_subsampled += len(fire) > cap
        by_value = sorted(sample, key=lambda e: (e[2], e[1]))
        m = len(by_value)
        groups = [[e for r, e in enumerate(by_value) if r * nb // m == g] for g in range(nb)] if m else []
        ref = []
        for grp in reversed(groups):
            if not grp:
                continue
            chosen = sorted(grp, key=lambda e: e[0])[:per_bin]  # smallest keys: a uniform pick inside the bin
            chosen.sort(key=lambda e: (-e[2], e[1]))
            ref.append((min(e[2] for e in grp), max(e[2] for e in grp), chosen))
        got = case.stats.feature(i)["quantiles"]
        assert case.stats.context_positions(i)["quantiles"] == [[divmod(e[1], N_CTX) for e in c] for _, _, c in ref]
        assert len(got) == len(ref)
        for g, (lo, hi, chosen) in zip(got, ref):
            assert g["lo"] == pytest.approx(lo, rel=1e-6) and g["hi"] == pytest.approx(hi, rel=1e-6)
            for c, (_, t, v) in zip(g["contexts"], chosen):
                assert g["lo"] <= c["act"] <= g["hi"]  # each sample lies within its bin
                check_context(case.stats, c, ref_context(case, windows, i, t))
        for upper, lower in zip(got, got[1:]):  # bins run from the highest activations down, without overlap
            assert lower["hi"] <= upper["lo"]
    assert n_subsampled > 0  # some latents fire more often than the sample holds: the sampling is exercised


def test_logit_effects_match_the_reference(case, model):
    w_u = model.W_U.detach().double()
    scale = model.ln_final.w.detach().double()
    n = SETTINGS["n_logits"]
    for i in range(D_SAE):
        d = case.sae.W_dec[i].detach().double()
        effect = ((d - d.mean()) * scale) @ w_u  # the final LayerNorm removes the mean, then scales by w
        order = torch.argsort(effect, descending=True)
        got = case.stats.feature(i)["logits"]
        assert [e["token"] for e in got["positive"]] == [case.stats.token_strings[t] for t in order[:n].tolist()]
        assert [e["token"] for e in got["negative"]] == [case.stats.token_strings[t] for t in order.flip(0)[:n].tolist()]
        np.testing.assert_allclose([e["value"] for e in got["positive"]], effect[order[:n]].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose([e["value"] for e in got["negative"]], effect[order.flip(0)[:n]].numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_dead_latent_has_every_key_and_the_dict_is_json(case):
    f = case.stats.feature(DEAD)
    assert set(f) == {"latent", "density", "max_act", "mean_act", "histogram", "top_contexts", "quantiles", "logits",
                      "top_tokens"}
    assert (f["density"], f["max_act"], f["mean_act"], f["top_contexts"], f["quantiles"], f["top_tokens"]) == \
        (0.0, 0.0, 0.0, [], [], [])
    assert f["histogram"]["counts"] == [0] * SETTINGS["n_hist_bins"]
    assert len(f["logits"]["positive"]) == SETTINGS["n_logits"]
    assert json.loads(json.dumps(case.stats.feature(0))) == case.stats.feature(0)
    assert case.stats.columns()["top_tokens"][DEAD] == ""


def run_sweep(sae, windows, hook_acts, *, batch: int, encode_chunk: int, latent_chunk: int) -> dict[str, torch.Tensor]:
    keys = ("n_top", "n_quantile_bins", "per_bin", "context", "n_hist_bins", "seed")
    sweep = Sweep(sae, **{k: SETTINGS[k] for k in keys}, latent_chunk=latent_chunk, encode_chunk=encode_chunk,
                  prepend_bos=True, device=torch.device("cpu"))
    for start in range(0, N_WINDOWS, batch):
        sweep.add(windows[start:start + batch], hook_acts[start:start + batch])
    return sweep.result()


def test_chunking_over_tokens_and_latents_gives_the_same_result(case, windows):
    # the same hook activations in both runs: a model's forward pass itself varies in the last bits with batch size
    one = run_sweep(case.sae, windows, case.hook_acts, batch=N_WINDOWS, encode_chunk=10 ** 6, latent_chunk=D_SAE)
    many = run_sweep(case.sae, windows, case.hook_acts, batch=3, encode_chunk=50, latent_chunk=7)
    assert one.keys() == many.keys()
    for name, a in one.items():
        if name == "sum_act":  # float64 sums in another order
            torch.testing.assert_close(many[name], a, rtol=1e-12, atol=0)
        else:
            assert torch.equal(a, many[name]), name
    assert int(one["count"].sum()) > 0


def test_token_source_gives_the_windows_it_cuts(case, model, stream, windows):
    n_tokens = 30 * (N_CTX - 1) - 5  # rounds up to 30 whole windows
    from_source = FeatureStats.compute(model, case.sae, TokenArray(stream), n_tokens=n_tokens, n_ctx=N_CTX,
                                       batch_size=16, **SETTINGS)
    from_windows = FeatureStats.compute(model, case.sae, windows[:30], batch_size=16, **SETTINGS)
    assert from_source.n_tokens == 30 * (N_CTX - 1)
    for name in ("count", "top_token", "q_token", "hist_counts", "logit_pos_ids"):
        assert torch.equal(from_source._arrays[name], from_windows._arrays[name]), name


def test_save_load_round_trip_and_fingerprint(case, tmp_path):
    path = case.stats.save(tmp_path)  # a folder (an SAE's, say) gets feature_stats.safetensors
    assert path == tmp_path / "feature_stats.safetensors" and not list(tmp_path.glob("*.tmp"))
    loaded = FeatureStats.load(tmp_path, sae=case.sae)
    assert loaded.token_strings == case.stats.token_strings
    for i in range(D_SAE):
        assert loaded.feature(i) == case.stats.feature(i)
    for name, col in case.stats.columns().items():
        np.testing.assert_array_equal(np.asarray(loaded.columns()[name]), np.asarray(col))
    other = make_sae(case.arch)
    with torch.no_grad():
        other.W_dec[0, 0] += 1e-3
    assert sae_fingerprint(other) != sae_fingerprint(case.sae)
    with pytest.raises(ValueError, match="computed for another SAE"):
        FeatureStats.load(path, sae=other)
    wider = SAE(SAEConfig(arch="relu", d_in=256, d_sae=D_SAE + 1, hook=HOOK))
    with pytest.raises(ValueError, match=f"d_sae={D_SAE}"):
        loaded.check_sae(wider)


def test_bad_latent_index(case):
    for bad in (D_SAE, -1, 10 ** 6):
        with pytest.raises(IndexError, match=f"{bad}.*0..{D_SAE - 1}"):
            case.stats.feature(bad)
    with pytest.raises(TypeError, match="integer"):
        case.stats.feature(1.5)
    assert case.stats.feature(np.int64(2))["latent"] == 2


def test_empty_or_bad_token_sets(model, windows):
    sae = make_sae("topk")
    kw = {k: v for k, v in SETTINGS.items()}
    with pytest.raises(ValueError, match="empty"):
        FeatureStats.compute(model, sae, torch.zeros(0, N_CTX, dtype=torch.long), **kw)
    with pytest.raises(ValueError, match="empty"):
        FeatureStats.compute(model, sae, TokenArray(torch.zeros(0, dtype=torch.long)), n_tokens=100, n_ctx=N_CTX, **kw)
    with pytest.raises(ValueError, match="n_tokens is required"):
        FeatureStats.compute(model, sae, EmbeddedCorpus("val"), **kw)
    with pytest.raises(ValueError, match="only 40 windows"):
        FeatureStats.compute(model, sae, windows, n_tokens=10 ** 6, **kw)
    with pytest.raises(ValueError, match=r"0\.\.4095"):
        FeatureStats.compute(model, sae, windows + 4096, **kw)
    with pytest.raises(ValueError, match="d_in=128"):
        FeatureStats.compute(model, SAE(SAEConfig(arch="relu", d_in=128, d_sae=8, hook=HOOK)), windows, **kw)


def test_attention_z_decoder_goes_through_w_o(model):
    torch.manual_seed(1)
    sae = SAE(SAEConfig(arch="relu", d_in=256, d_sae=5, hook="blocks.2.attn.hook_z"))
    dirs, note = residual_directions(model, sae)
    assert note == ""
    w_o = model.W_O[2].detach().double()  # [n_heads, d_head, d_model]
    for i in range(5):
        ref = sum(sae.W_dec[i, h * 64:(h + 1) * 64].detach().double() @ w_o[h] for h in range(4))
        torch.testing.assert_close(dirs[i].double(), ref, rtol=1e-5, atol=1e-6)
    assert math.isfinite(float(dirs.sum()))


# ----------------------------------------------------------------------------------------------- exact arithmetic
def dyadic_case(seed: int = 0, n_windows: int = 12, n_ctx: int = 16, d_in: int = 32, d_sae: int = 24):
    """A ReLU SAE and activations on a coarse dyadic grid: every pre-activation is exact in float32 on any device,
    and many activations tie, so the tie rule (the earlier token first) decides the tables."""
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(arch="relu", d_in=d_in, d_sae=d_sae, normalize=False))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randint(-4, 5, (d_in, d_sae), generator=g) / 16)
        sae.b_enc.copy_(torch.randint(-24, 1, (d_sae,), generator=g) / 8)
        sae.b_dec.zero_()
    acts = torch.randint(-8, 9, (n_windows, n_ctx, d_in), generator=g) / 8
    windows = torch.randint(0, 50, (n_windows, n_ctx), generator=g)
    return sae.eval(), windows, acts


def sweep_dyadic(device: str, batch: int, latent_chunk: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    sae, windows, acts = dyadic_case()
    sweep = Sweep(sae.to(device), n_top=4, n_quantile_bins=3, per_bin=2, context=(2, 1), n_hist_bins=5, seed=1,
                  latent_chunk=latent_chunk, encode_chunk=37, prepend_bos=True, device=torch.device(device))
    for start in range(0, len(windows), batch):
        sweep.add(windows[start:start + batch].to(device), acts[start:start + batch].to(device))
    with torch.no_grad():
        dense = sae.cpu().encode(acts.reshape(-1, acts.shape[-1])).view(*acts.shape[:2], -1)
    dense[:, 0] = 0.0
    return sweep.result(), dense


def test_ties_break_towards_the_earlier_token():
    res, dense = sweep_dyadic("cpu", batch=5, latent_chunk=10)
    flat = dense.reshape(-1, dense.shape[-1])
    n_ties = 0
    for i in range(flat.shape[1]):
        fire = [(float(flat[t, i]), t) for t in torch.nonzero(flat[:, i] > 0).squeeze(1).tolist()]
        n_ties += len(fire) - len({v for v, _ in fire})
        ref = sorted(fire, key=lambda e: (-e[0], e[1]))[:4]
        got = [(float(v), int(t)) for v, t in zip(res["top_value"][i], res["top_token"][i]) if t >= 0]
        assert got == ref, i
        for slot, (_, t) in enumerate(ref):  # the context: the latent's activations around the token, exactly
            w, p = divmod(t, dense.shape[1])
            want = [float(dense[w, q, i]) if 0 <= q < dense.shape[1] else 0.0 for q in range(p - 2, p + 2)]
            assert res["top_ctx_acts"][i, slot].tolist() == want
    assert n_ties > 30  # the grid makes ties common: the rule is exercised


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares the CUDA sweep with the CPU sweep")
def test_cuda_sweep_equals_cpu_sweep():
    cpu, _ = sweep_dyadic("cpu", batch=12, latent_chunk=24)
    gpu, _ = sweep_dyadic("cuda", batch=5, latent_chunk=10)
    for name, a in cpu.items():
        if name == "sum_act":
            torch.testing.assert_close(gpu[name], a, rtol=1e-12, atol=0)
        else:
            assert torch.equal(a, gpu[name]), name
