"""ce_loss_score / kl_div_score are NaN, with a warning, where zero-ablating the hook does not raise the loss or does
not change the next-token distribution: by hand-computed numbers, and on tiny random Llama models where that
really happens (the final residual of a model whose random predictions are worse than uniform; a hook that carries
almost nothing)."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from real_arch_models import N_LAYERS, VOCAB, tiny_model_folder
from sae_widgets.metrics import SCORE_MIN_GAP, EvalResult, loss_scores, model_metrics
from sae_widgets.models import load_model
from sae_widgets.sae import SAE, SAEConfig

FINAL = f"blocks.{N_LAYERS - 1}.hook_resid_post"
QUIET = "blocks.0.hook_mlp_out"


def scores_and_warnings(*args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = loss_scores(*args, **kwargs)
    return out, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_scores_by_hand():
    out, warned = scores_and_warnings(ce_clean=2.0, ce_sae=2.5, ce_zero=4.0, kl_sae=0.5, kl_zero=2.0, hook="h")
    assert out == {"ce_loss_score": 0.75, "kl_div_score": 0.75} and warned == []  # (4 − 2.5) / 2, (2 − 0.5) / 2
    out, warned = scores_and_warnings(ce_clean=2.0, ce_sae=1.0, ce_zero=1.5, kl_sae=0.5, kl_zero=2.0,
                                      hook="blocks.3.hook_resid_post")
    assert math.isnan(out["ce_loss_score"]) and out["kl_div_score"] == 0.75  # unguarded: (1.5 − 1) / −0.5 = −1
    assert len(warned) == 1 and "ce_loss_score at blocks.3.hook_resid_post is NaN" in warned[0]
    assert "CE 1.5 with the hook zeroed, 2 clean" in warned[0] and "\n" not in warned[0]
    out, warned = scores_and_warnings(ce_clean=2.0, ce_sae=1.0, ce_zero=2.0, kl_sae=0.5, kl_zero=2.0)
    assert math.isnan(out["ce_loss_score"]) and len(warned) == 1  # no gap at all
    for kl_zero in (-3e-9, 0.0, 4e-9, SCORE_MIN_GAP):  # rounding-level KL: the ratio would be noise
        out, warned = scores_and_warnings(ce_clean=2.0, ce_sae=2.5, ce_zero=4.0, kl_sae=1e-9, kl_zero=kl_zero, hook="h")
        assert out["ce_loss_score"] == 0.75 and math.isnan(out["kl_div_score"]), kl_zero
        assert len(warned) == 1 and warned[0].startswith("kl_div_score at h is NaN") and f"{kl_zero:.3g}" in warned[0]
    out, _ = scores_and_warnings(ce_clean=2.0, ce_sae=2.5, ce_zero=4.0, kl_sae=1e-6, kl_zero=4e-6)
    assert out["kl_div_score"] == pytest.approx(0.75)  # small but real: still scored


def tiny_llama(tmp_path):
    return load_model(tiny_model_folder("llama", tmp_path), device="cpu")


def random_tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, VOCAB, (4, 16), generator=g)
    t[:, 0] = 0  # BOS
    return [t[:2], t[2:]]


def spliced_metrics(model, hook):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(arch="relu", d_in=model.cfg.d_model, d_sae=32, hook=hook))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = model_metrics(model, sae, random_tokens(), prepend_bos=True)
    return m, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_ablation_that_lowers_the_loss(tmp_path):
    """Zeroing a Llama's final residual makes RMSNorm output 0, so every logit is 0 and the prediction is uniform:
    CE = log(vocab). A random model with a 30× unembedding predicts confidently and at random, which is worse."""
    model = tiny_llama(tmp_path)
    with torch.no_grad():
        model.original_model.lm_head.weight.mul_(30)
    m, warned = spliced_metrics(model, FINAL)
    assert m["ce_loss_with_ablation"] == pytest.approx(math.log(VOCAB), abs=1e-5)
    assert m["ce_loss_without_sae"] > m["ce_loss_with_ablation"] + 1  # the ablation lowers the loss
    assert math.isnan(m["ce_loss_score"])
    assert m["kl_div_with_ablation"] > 1 and math.isfinite(m["kl_div_score"])  # the distribution did change
    assert len(warned) == 1 and warned[0].startswith(f"ce_loss_score at {FINAL} is NaN")
    assert f"{m['ce_loss_with_ablation']:.6g}" in warned[0] and f"{m['ce_loss_without_sae']:.6g}" in warned[0]
    result = EvalResult(metrics=m)
    assert "nan" in next(line for line in result.table().splitlines() if "ce_loss_score" in line)
    assert "| `ce_loss_score` | nan |" in result.to_markdown() and "nan" in result._repr_html_()
    assert math.isnan(json.loads(json.dumps(result.to_dict()))["metrics"]["ce_loss_score"])


def test_ablation_that_changes_nothing(tmp_path):
    """Layer 0's MLP scaled by 1e-7 writes almost nothing: zeroing it moves CE and KL by float rounding only."""
    model = tiny_llama(tmp_path)
    with torch.no_grad():
        model.original_model.model.layers[0].mlp.down_proj.weight.mul_(1e-7)
    m, warned = spliced_metrics(model, QUIET)
    assert abs(m["kl_div_with_ablation"]) < SCORE_MIN_GAP / 10
    assert abs(m["ce_loss_with_ablation"] - m["ce_loss_without_sae"]) < SCORE_MIN_GAP
    assert math.isnan(m["ce_loss_score"]) and math.isnan(m["kl_div_score"])
    assert sorted(w.split(" ")[0] for w in warned) == ["ce_loss_score", "kl_div_score"]
    assert all(f" at {QUIET} is NaN" in w for w in warned)
