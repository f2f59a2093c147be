"""Tiny random-weight models of real architecture families, built offline from a transformers config.

`tiny_model_folder(family, tmp_path)` writes an HF-format folder (2 layers, d_model 64, vocab 4096) that
`sae_widgets.load_model(folder, device="cpu")` loads through TransformerBridge like a downloaded model. Every norm
gets non-trivial random weights (and LayerNorm random biases): the library defaults (ones, or zeros for Gemma's
1 + w) would hide a wrong norm formula. The embedded model's tokenizer files come along (vocab 4096).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

FAMILIES = ("gpt2", "neox", "gemma", "llama")
D_MODEL, N_LAYERS, VOCAB = 64, 2, 4096
TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "sae_widgets" / "assets" / "models" / "sotu-moby-4l"


def _config_and_class(family: str):
    import transformers as T

    ids = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    decoder = dict(hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=4, intermediate_size=128,
                   max_position_embeddings=64, **ids)
    if family == "gpt2":
        return T.GPT2Config(n_embd=D_MODEL, n_layer=N_LAYERS, n_head=4, n_positions=64, **ids), T.GPT2LMHeadModel
    if family == "neox":
        return T.GPTNeoXConfig(**decoder), T.GPTNeoXForCausalLM
    if family == "gemma":
        return T.GemmaConfig(num_key_value_heads=2, head_dim=16, **decoder), T.GemmaForCausalLM
    if family == "llama":
        return T.LlamaConfig(num_key_value_heads=2, **decoder), T.LlamaForCausalLM
    raise ValueError(f"family={family!r} is not one of {FAMILIES}")


def tiny_model_folder(family: str, tmp_path: Path, seed: int = 0) -> Path:
    """An HF-format folder `tmp_path / family` holding a tiny random model of `family` (one of FAMILIES)."""
    config, cls = _config_and_class(family)
    folder = Path(tmp_path) / family
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(config)
        with torch.no_grad():
            for module in model.modules():
                if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
                    module.weight.copy_(0.6 + 0.8 * torch.rand_like(module.weight))  # 1 + w for Gemma: 1.6 .. 2.4
                    if getattr(module, "bias", None) is not None:
                        module.bias.copy_(0.1 * torch.randn_like(module.bias))
    model.save_pretrained(folder)
    for f in TOKENIZER_DIR.glob("tokenizer*.json"):
        shutil.copy(f, folder)
    return folder
