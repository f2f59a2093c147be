"""Train the embedded model's byte-level BPE tokenizer (HF `tokenizers`) on the corpus's train split.

    python scripts/train_tokenizer.py   # writes tokenizer.json + tokenizer_config.json into the model folder

Deterministic: BPE merges are chosen by count with ties broken by the library's fixed order.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from sae_widgets.corpus import load_texts

MODEL_DIR = Path(__file__).resolve().parents[1] / "sae_widgets" / "assets" / "models" / "sotu-moby-4l"
EOT = "<|endoftext|>"


def train(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(load_texts("train"), trainer=trainer)
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=MODEL_DIR)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tok = train(args.vocab_size)
    tok.save(str(args.out / "tokenizer.json"))
    config = {
        "tokenizer_class": "GPT2Tokenizer", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
        "pad_token": EOT, "add_prefix_space": False, "model_max_length": 256, "clean_up_tokenization_spaces": False,
    }
    (args.out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"vocab {tok.get_vocab_size()} -> {args.out}")


if __name__ == "__main__":
    main()
