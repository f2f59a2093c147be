"""GPU: every architecture trains in fp32 and with bf16 autocast, and the two agree. Runs where CUDA exists
(the lent GPU); CPU machines have no CUDA device, so there is nothing to run there."""
from __future__ import annotations

import pytest
import torch

from sae_widgets.sae import ARCHS, SAE, SAEConfig
from sae_widgets.synthetic import SyntheticActivations, recovery
from sae_widgets.train import Trainer, TrainConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def train(arch, bf16, steps=600):
    gen = SyntheticActivations(d_in=64, n_features=256, mean_active=5, batch_size=1024, seed=0, device="cuda")
    torch.manual_seed(0)
    k = 5 if arch not in ("relu", "jumprelu") else None
    sae = SAE(SAEConfig(arch=arch, d_in=64, d_sae=512, k=k, sparsity_coeff=2.0 if arch == "relu" else None)).cuda()
    tr = Trainer(sae, gen, TrainConfig(total_tokens=1024 * steps, lr=2e-3, progress=False, init_tokens=4096,
                                       dead_window_tokens=200_000, autocast_bf16=bf16, log_every=50))
    tr.run()
    return tr, recovery(sae.W_dec, gen.directions)


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_and_bf16_autocast_train_and_agree(arch):
    t32, r32 = train(arch, bf16=False)
    t16, r16 = train(arch, bf16=True)
    for t in (t32, t16):
        assert all(torch.isfinite(p).all() for p in t.sae.parameters())
    l32, l16 = t32.history[-1]["mse"], t16.history[-1]["mse"]
    assert abs(l16 - l32) / l32 < 0.15, f"{arch}: final mse fp32 {l32:.4f} vs bf16 {l16:.4f}"
    assert abs(r32 - r16) < 0.05, f"{arch}: recovery fp32 {r32:.3f} vs bf16 {r16:.3f}"
    if arch in ("topk", "relu"):
        assert r32 > 0.9 and r16 > 0.9, f"{arch}: recovery fp32 {r32:.3f}, bf16 {r16:.3f}"
    print(f"{arch}: mse fp32 {l32:.4f} bf16 {l16:.4f}; recovery fp32 {r32:.3f} bf16 {r16:.3f}")
