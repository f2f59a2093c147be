"""Train the embedded default model: a 4-layer GPT-2-style LM on the State of the Union + Moby-Dick corpus.

    python scripts/train_default_model.py                         # GPU: a few minutes on an H100
    python scripts/train_default_model.py --device cpu --steps 50 # CPU: runs, slowly

Seeded; writes an HF-format folder (config.json, model.safetensors in fp16, tokenizer files) plus
training_summary.json and the model card README.md. The held-out loss is measured on the saved fp16
weights, so the figure the tests check is the figure of the shipped file.
Needs torch, transformers and tokenizers only (the GPU machine has no transformer_lens).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sae_widgets.corpus import load_texts  # noqa: E402
from sae_widgets.tokens import chunk_windows, join_documents, unigram_cross_entropy, window_body  # noqa: E402

MODEL_DIR = ROOT / "sae_widgets" / "assets" / "models" / "sotu-moby-4l"
ARCH = dict(n_layer=4, n_embd=256, n_head=4, n_positions=256)
EVAL_SUBSET_WINDOWS = 32  # the quick held-out figure the CPU test recomputes


def encode_split(tok, split: str, eot: int) -> torch.Tensor:
    return join_documents((e.ids for e in tok.encode_batch(load_texts(split))), eot)


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, device: str, batch: int = 64) -> float:
    """Mean next-token cross-entropy over all predicted positions of `windows`."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        x = windows[i : i + batch].to(device)
        logits = model(x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    return total / count


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.1 * lr + 0.9 * lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=128, help="sequences per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--out", type=Path, default=MODEL_DIR)
    args = ap.parse_args()

    from tokenizers import Tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the tokenizer comes from scripts/train_tokenizer.py
        if (MODEL_DIR / name).resolve() != (args.out / name).resolve():
            shutil.copyfile(MODEL_DIR / name, args.out / name)
    tok = Tokenizer.from_file(str(args.out / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    n_ctx = ARCH["n_positions"]
    train, val = encode_split(tok, "train", eot), encode_split(tok, "val", eot)
    val_windows = chunk_windows(val, n_ctx, eot)
    unigram = unigram_cross_entropy(train, val_windows[:, 1:], tok.get_vocab_size())
    print(f"train tokens {train.numel():,}  val tokens {val.numel():,}  unigram val CE {unigram:.4f}", flush=True)

    cfg = GPT2Config(vocab_size=tok.get_vocab_size(), bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=True,
                     resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout, **ARCH)
    model = GPT2LMHeadModel(cfg).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    body = window_body(n_ctx, eot)
    use_bf16 = args.device.startswith("cuda")
    t0, tokens_seen, curve = time.time(), 0, []
    for step in range(args.steps):
        model.train()
        starts = torch.randint(0, train.numel() - body, (args.batch,), generator=gen)
        x = torch.stack([train[s : s + body] for s in starts.tolist()])
        x = torch.cat([torch.full((args.batch, 1), eot, dtype=x.dtype), x], dim=1).to(args.device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, warmup=min(200, args.steps // 10 + 1))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens_seen += x.numel()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            v = heldout_loss(model, val_windows, args.device)
            curve.append({"step": step + 1, "train_loss": round(loss.item(), 4), "val_loss": round(v, 4)})
            print(f"step {step + 1:5d}  train {loss.item():.4f}  val {v:.4f}  {time.time() - t0:.0f}s", flush=True)

    model = model.half().cpu()
    model.config.dtype = "float16"
    model.save_pretrained(args.out, safe_serialization=True)
    saved = GPT2LMHeadModel.from_pretrained(args.out, dtype=torch.float32)
    summary = {
        "architecture": {**ARCH, "vocab_size": cfg.vocab_size, "n_params": n_params, "tied_embeddings": True},
        "seed": args.seed, "steps": args.steps, "batch_sequences": args.batch, "lr": args.lr, "dropout": args.dropout,
        "tokens_seen": tokens_seen, "train_tokens": train.numel(), "val_tokens": val.numel(),
        "val_windows": len(val_windows), "val_loss": round(heldout_loss(saved, val_windows, "cpu"), 4),
        "eval_subset_windows": EVAL_SUBSET_WINDOWS,
        "val_loss_subset": round(heldout_loss(saved, val_windows[:EVAL_SUBSET_WINDOWS], "cpu"), 4),
        "unigram_val_loss": round(unigram, 4),
        "unigram_val_loss_subset": round(unigram_cross_entropy(train, val_windows[:EVAL_SUBSET_WINDOWS, 1:], cfg.vocab_size), 4),
        "device": torch.cuda.get_device_name() if use_bf16 else "cpu", "train_seconds": round(time.time() - t0, 1),
        "torch": torch.__version__, "curve": curve,
    }
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"}))


if __name__ == "__main__":
    main()
