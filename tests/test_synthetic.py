"""Synthetic ground truth: the generator's statistics and structure, resume, and the recovery metric.

References are computed independently (numpy / float64), and statistical checks use binomial tolerances.
"""
import io
import json
import math

import numpy as np
import pytest
import torch

from sae_widgets.synthetic import SyntheticActivations, recovery, recovery_per_direction


def _np(t):
    return t.detach().cpu().double().numpy()


# ----------------------------------------------------------------------------------------------- directions
def test_directions_are_unit_rows_of_the_right_shape():
    gen = SyntheticActivations(d_in=24, n_features=80, seed=3)
    d = _np(gen.directions)
    assert d.shape == (80, 24) and gen.directions.dtype == torch.float32
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-6)
    # superposition regime: random directions are not orthogonal, but not duplicated either
    gram = d @ d.T
    off = np.abs(gram[~np.eye(80, dtype=bool)])
    assert off.max() < 0.99 and off.mean() > 0.05


def test_orthogonal_option_gives_identity_gram():
    gen = SyntheticActivations(d_in=32, n_features=20, orthogonal=True, seed=1)
    d = _np(gen.directions)
    np.testing.assert_allclose(d @ d.T, np.eye(20), atol=1e-6)
    with pytest.raises(ValueError, match="orthogonal"):
        SyntheticActivations(d_in=8, n_features=9, orthogonal=True)


def test_same_seed_same_data_different_seed_different():
    kw = dict(d_in=16, n_features=48, mean_active=4, batch_size=64, signed=True, noise_std=0.01)
    a, b, c = (SyntheticActivations(seed=s, **kw) for s in (7, 7, 8))
    assert torch.equal(a.directions, b.directions)
    xa, ca = a.sample(200)
    xb, cb = b.sample(200)
    assert torch.equal(xa, xb) and torch.equal(ca, cb)
    assert torch.equal(a.next_batch(), b.next_batch())
    xc, cc = c.sample(200)
    assert not torch.allclose(a.directions, c.directions)
    assert not torch.equal(ca != 0, cc != 0) and not torch.allclose(xa, xc)


# ----------------------------------------------------------------------------------------------- sampling
def test_x_is_exactly_codes_times_directions_without_noise():
    gen = SyntheticActivations(d_in=20, n_features=50, mean_active=6, seed=0)
    x, codes = gen.sample(1000)
    assert x.shape == (1000, 20) and codes.shape == (1000, 50) and x.dtype == torch.float32
    ref = _np(codes) @ _np(gen.directions)  # independent float64 reconstruction
    np.testing.assert_allclose(_np(x), ref, atol=1e-5)


def test_noise_is_isotropic_with_the_requested_std():
    gen = SyntheticActivations(d_in=32, n_features=64, noise_std=0.05, seed=2)
    x, codes = gen.sample(4000)
    resid = _np(x) - _np(codes) @ _np(gen.directions)
    assert abs(resid.std() - 0.05) < 0.002 and abs(resid.mean()) < 0.002
    cov = np.cov(resid.T) / 0.05 ** 2
    assert np.abs(np.diag(cov) - 1).max() < 0.15 and np.abs(cov[~np.eye(32, dtype=bool)]).max() < 0.15


def test_next_batch_is_sample_of_batch_size_from_the_same_stream():
    a = SyntheticActivations(d_in=8, n_features=16, batch_size=32, seed=5)
    b = SyntheticActivations(d_in=8, n_features=16, batch_size=32, seed=5)
    assert torch.equal(a.next_batch(), b.sample(32)[0])
    assert torch.equal(a.sample(10)[1], b.sample(10)[1])  # both advanced alike


@pytest.mark.parametrize("decay,p", [(0.0, 0.1), (1.0, 0.05)])
def test_activation_frequencies_match_p(decay, p):
    n, F = 4000, 60
    gen = SyntheticActivations(d_in=16, n_features=F, p=p, freq_decay=decay, seed=11)
    probs = gen.feature_probs.numpy()
    assert math.isclose(probs.mean(), p, rel_tol=1e-9) and math.isclose(gen.expected_active, p * F, rel_tol=1e-9)
    if decay:  # Zipf-like: (i + 1) ** -1 up to the common scale
        np.testing.assert_allclose(probs * np.arange(1, F + 1), probs[0], rtol=1e-9)
        assert probs[0] < 1
    else:
        np.testing.assert_allclose(probs, p, rtol=1e-12)
    _, codes = gen.sample(n)
    freq = (codes != 0).double().mean(0).numpy()
    sigma = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(freq - probs) < 5 * sigma + 1e-3)
    l0 = (codes != 0).sum(1).double()
    assert abs(l0.mean().item() - p * F) < 5 * math.sqrt(p * F / n)  # L0 variance <= mean for Bernoulli sums


def test_zipf_frequencies_are_capped_at_one_and_keep_the_mean():
    gen = SyntheticActivations(d_in=16, n_features=60, p=0.1, freq_decay=1.0)  # uncapped, p_0 would be 1.28
    probs = gen.feature_probs.numpy()
    assert probs.max() <= 1.0 and probs[0] == 1.0 and math.isclose(probs.mean(), 0.1, rel_tol=1e-9)
    capped = probs == 1.0
    np.testing.assert_allclose(probs[~capped] * np.arange(1, 61)[~capped], probs[1] * 2, rtol=1e-9)  # still Zipf
    _, codes = gen.sample(500)
    assert (codes[:, 0] != 0).all()
    with pytest.raises(ValueError, match="unreachable"):
        SyntheticActivations(n_features=20, mean_active=19, hierarchy={"n_parents": 2, "children_per_parent": 2,
                                                                       "p_child": 0.5})


def test_p_and_mean_active_are_the_same_setting():
    a = SyntheticActivations(d_in=8, n_features=40, p=0.05)
    b = SyntheticActivations(d_in=8, n_features=40, mean_active=2)
    assert torch.equal(a.feature_probs, b.feature_probs)
    with pytest.raises(ValueError, match="not both"):
        SyntheticActivations(p=0.1, mean_active=3)


@pytest.mark.parametrize("kind,params,lo,hi,mean", [
    ("normal", None, 0.0, None, 1.0),
    ("normal", (0.0, 1.0), 0.0, None, math.sqrt(2 / math.pi)),  # folded: half-normal, never negative
    ("uniform", (0.5, 1.5), 0.5, 1.5, 1.0),
    ("exponential", (2.0,), 0.0, None, 2.0),
    ("constant", (3.0,), 3.0, 3.0, 3.0)])
def test_nonnegative_magnitudes(kind, params, lo, hi, mean):
    gen = SyntheticActivations(d_in=16, n_features=40, mean_active=8, magnitude=kind, magnitude_params=params)
    _, codes = gen.sample(3000)
    vals = codes[codes != 0]
    assert (codes >= 0).all() and vals.min() >= lo and (hi is None or vals.max() <= hi)
    assert abs(vals.mean().item() - mean) < 0.05 * mean


def test_signed_codes_take_both_signs_and_x_stays_in_the_span():
    gen = SyntheticActivations(d_in=32, n_features=12, mean_active=3, signed=True, seed=4)
    x, codes = gen.sample(3000)
    vals = codes[codes != 0]
    frac_neg = (vals < 0).double().mean().item()
    assert abs(frac_neg - 0.5) < 5 * math.sqrt(0.25 / len(vals))
    assert abs(vals.abs().mean().item() - 1.0) < 0.05
    # x lies in the 12-dim span of the directions inside R^32: least-squares residual ~ 0
    d, xs = _np(gen.directions), _np(x)
    coef, *_ = np.linalg.lstsq(d.T, xs.T, rcond=None)
    assert np.abs(d.T @ coef - xs.T).max() < 1e-5
    np.testing.assert_allclose(coef.T, _np(codes), atol=1e-4)  # and the coefficients are the codes


# ----------------------------------------------------------------------------------------------- structure
def test_hierarchy_child_never_fires_without_its_parent():
    h = {"n_parents": 5, "children_per_parent": 3, "p_child": 0.4}
    gen = SyntheticActivations(d_in=16, n_features=60, mean_active=10, hierarchy=h, seed=9)
    parents, children = gen.parents.tolist(), gen.children.tolist()
    assert len(parents) == 5 and all(len(c) == 3 for c in children)
    flat = [c for cs in children for c in cs]
    assert len(set(parents) | set(flat)) == 20  # all distinct
    assert math.isclose(gen.expected_active, 10.0, rel_tol=1e-9)  # children included in the target
    _, codes = gen.sample(5000)
    on = (codes != 0).numpy()
    assert abs(on.sum(1).mean() - 10.0) < 0.2
    for par, kids in zip(parents, children):
        for kid in kids:
            assert not np.any(on[:, kid] & ~on[:, par])  # exact
            assert on[:, kid].sum() > 0
            cond = on[on[:, par], kid].mean()
            n_par = on[:, par].sum()
            assert abs(cond - 0.4) < 5 * math.sqrt(0.24 / n_par)
            assert math.isclose(gen.feature_probs[kid].item(), 0.4 * gen.feature_probs[par].item(), rel_tol=1e-9)


def test_correlated_groups_cofire_more_than_independent_features():
    corr = {"n_groups": 3, "group_size": 4, "rho": 0.9}
    gen = SyntheticActivations(d_in=16, n_features=40, p=0.1, correlation=corr, seed=2)
    _, codes = gen.sample(6000)
    on = (codes != 0).double().numpy()
    # marginals are unchanged by the copula
    assert np.all(np.abs(on.mean(0) - 0.1) < 5 * math.sqrt(0.09 / 6000))
    c = np.corrcoef(on.T)
    groups = gen.groups.tolist()
    grouped = {f for g in groups for f in g}
    within = [c[i, j] for g in groups for a, i in enumerate(g) for j in g[a + 1:]]
    free = [f for f in range(40) if f not in grouped]
    indep = [c[i, j] for a, i in enumerate(free) for j in free[a + 1:]]
    across = [c[i, j] for i in groups[0] for j in groups[1]]
    assert np.mean(within) > 0.3 and min(within) > 0.15
    assert abs(np.mean(indep)) < 0.01 and abs(np.mean(across)) < 0.03


def test_structure_needs_enough_features():
    with pytest.raises(ValueError, match="distinct features"):
        SyntheticActivations(n_features=10, hierarchy={"n_parents": 3, "children_per_parent": 3})
    with pytest.raises(ValueError, match="unknown keys"):
        SyntheticActivations(correlation={"groups": 2})


# ----------------------------------------------------------------------------------------------- store interface
def test_store_like_interface_and_describe():
    gen = SyntheticActivations(d_in=12, n_features=30, batch_size=50, seed=0)
    assert (gen.d_in, gen.d_out, gen.batch_size, gen.hooks, gen.paired) == (12, 12, 50, ["synthetic"], False)
    it = iter(gen)
    batches = [next(it) for _ in range(3)]
    assert all(b.shape == (50, 12) and b.dtype == torch.float32 and b.device.type == "cpu" for b in batches)
    assert gen.batches_served == 3
    desc = gen.describe()
    assert json.loads(json.dumps(desc)) == desc and desc["d_in"] == 12 and desc["seed"] == 0
    clone = SyntheticActivations.from_config(desc)
    assert torch.equal(clone.directions, gen.directions)
    assert torch.equal(clone.sample(20)[0], SyntheticActivations(d_in=12, n_features=30, seed=0).sample(20)[0])


def test_state_dict_resumes_bit_identically():
    kw = dict(d_in=16, n_features=64, batch_size=128, signed=True, noise_std=0.01,
              hierarchy={"n_parents": 4}, correlation={"n_groups": 2}, seed=21)
    gen = SyntheticActivations(**kw)
    for _ in range(3):
        gen.next_batch()
    buf = io.BytesIO()
    torch.save(gen.state_dict(), buf)  # through serialisation, as a checkpoint would
    expected = [gen.next_batch() for _ in range(3)]
    fresh = SyntheticActivations(**kw)
    assert not torch.equal(fresh.next_batch(), expected[0])
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.batches_served == 3
    got = [fresh.next_batch() for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    other = SyntheticActivations(**{**kw, "seed": 22})
    with pytest.raises(ValueError, match="other settings"):
        other.load_state_dict(gen.state_dict())


# ----------------------------------------------------------------------------------------------- recovery
def _ref_per_direction(dec, true, absolute=False):
    dec, true = np.asarray(dec, float), np.asarray(true, float)
    out = []
    for t in true:
        best = -np.inf
        for r in dec:
            nt, nr = np.linalg.norm(t), np.linalg.norm(r)
            c = 0.0 if nt == 0 or nr == 0 else float(t @ r) / (nt * nr)
            best = max(best, abs(c) if absolute else c)
        out.append(best)
    return np.array(out)


def _rand_unit(n, d, seed):
    m = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return m / m.norm(dim=1, keepdim=True)


def test_recovery_is_one_for_identity_permuted_rescaled_and_extra_rows():
    true = _rand_unit(32, 48, 0)
    assert recovery(true, true) == pytest.approx(1.0, abs=1e-12)
    perm = true[torch.randperm(32, generator=torch.Generator().manual_seed(1))]
    scaled = perm * torch.linspace(0.1, 7.0, 32)[:, None]
    dec = torch.cat([scaled, _rand_unit(40, 48, 2)]).float()  # extra rows, float32 input
    assert recovery(dec, true) == pytest.approx(1.0, abs=1e-6)
    assert recovery_per_direction(dec, true).dtype == torch.float64


def test_recovery_with_one_direction_missing():
    n = 32
    true = _rand_unit(n, 256, 3)
    dec = true.clone()
    dec[5] = torch.randn(256, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 3
    per = recovery_per_direction(dec, true)
    ref = _ref_per_direction(dec.numpy(), true.numpy())
    np.testing.assert_allclose(per.numpy(), ref, atol=1e-12)
    np.testing.assert_allclose(np.delete(per.numpy(), 5), 1.0, atol=1e-12)
    value = recovery(dec, true)
    assert value == pytest.approx((n - 1 + ref[5]) / n, abs=1e-12)
    assert (n - 1) / n - 0.01 < value < (n - 1) / n + 0.4 / n  # the lost one matches nothing well in 256-d


def test_recovery_of_a_random_decoder_is_low():
    assert recovery(_rand_unit(64, 512, 5), _rand_unit(32, 512, 6)) < 0.5


def test_recovery_sign_handling():
    true = _rand_unit(16, 128, 7)
    assert recovery(-true, true) < 0.3
    assert recovery(-true, true, absolute=True) == pytest.approx(1.0, abs=1e-12)
    q = SyntheticActivations(d_in=16, n_features=16, orthogonal=True).directions
    assert abs(recovery(-q, q)) < 1e-6  # best signed match of an orthonormal basis negated is 0 (orthogonal)
    mixed = true.clone()
    mixed[::2] *= -1
    assert recovery(mixed, true, absolute=True) == pytest.approx(1.0, abs=1e-12)
    ref = _ref_per_direction(mixed.numpy(), true.numpy())
    np.testing.assert_allclose(recovery_per_direction(mixed, true).numpy(), ref, atol=1e-12)


def test_recovery_handles_zero_rows():
    true = _rand_unit(8, 20, 8)
    dec = torch.cat([true, torch.zeros(5, 20)])
    assert recovery(dec, true) == pytest.approx(1.0, abs=1e-12)
    assert recovery(torch.zeros(10, 20), true) == 0.0  # all-zero decoder: cosine 0, never NaN
    true_with_zero = torch.cat([true, torch.zeros(1, 20, dtype=torch.float64)])
    per = recovery_per_direction(true, true_with_zero)
    assert per[-1].item() == 0.0 and not torch.isnan(per).any()
    with pytest.raises(ValueError):
        recovery(torch.zeros(4, 19), true)


def test_recovery_matches_independent_reference_on_random_input():
    dec = torch.randn(30, 10, generator=torch.Generator().manual_seed(9))
    true = torch.randn(12, 10, generator=torch.Generator().manual_seed(10))
    for absolute in (False, True):
        ref = _ref_per_direction(dec.numpy(), true.numpy(), absolute)
        np.testing.assert_allclose(recovery_per_direction(dec, true, absolute=absolute).numpy(), ref, atol=1e-12)
        assert recovery(dec, true, absolute=absolute) == pytest.approx(ref.mean(), abs=1e-12)
