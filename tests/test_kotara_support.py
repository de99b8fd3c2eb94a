"""Builders shared by the Kotara tests: a word-level tokenizer and tiny GPT-2 models, saved locally.

Imported by the other ``test_kotara_*`` modules (pytest puts ``tests/`` on ``sys.path``); its one
test checks that what it builds loads back through Kotara's loader.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "was",
    "by",
    "at",
    "from",
    "this",
    "be",
    "or",
    "an",
    "are",
    "not",
    "which",
    "but",
    "model",
    "token",
    "fused",
    "expert",
    "window",
    "stride",
    "entropy",
    "gap",
    "average",
    "mixture",
    "product",
    "length",
    "loss",
    "value",
]


def write_corpus(path: Path, num_lines: int = 12, seed: int = 0) -> Path:
    """A deterministic text of random words (a Zipf-ish draw, so models can learn something)."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(len(WORDS))]
    lines = [" ".join(rng.choices(WORDS, weights, k=rng.randint(6, 14))) for _ in range(num_lines)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def build_tokenizer(directory: Path, text_path: Path, extra_words: tuple[str, ...] = ()) -> Path:
    """A WordLevel tokenizer over the corpus' words, with <s>, </s>, <unk>, <pad>, saved as a HF dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(text_path.read_text(encoding="utf-8").split()) | set(extra_words))
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.save_pretrained(directory)
    return directory


def build_gpt2(directory: Path, tokenizer_dir: Path, seed: int, extra_columns: int = 0, n_positions: int = 64) -> Path:
    """A random 2-layer GPT-2 (d=32) for the tokenizer in ``tokenizer_dir``, saved with that tokenizer.

    ``extra_columns`` pads the output layer past the tokenizer, like real checkpoints padded to a
    multiple of 64/128 columns.
    """
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer) + extra_columns,
        n_positions=n_positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # sharper than the default init, so models disagree measurably
        model.lm_head.weight.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_built_model_loads_through_kotara(tmp_path):
    from kotara import loading

    text = write_corpus(tmp_path / "t.txt", num_lines=2)
    tok_dir = build_tokenizer(tmp_path / "tok", text)
    model_dir = build_gpt2(tmp_path / "m", tok_dir, seed=0, extra_columns=3)
    tokenizer = loading.load_tokenizer(str(model_dir))
    model = loading.load_model(str(model_dir), "a", torch.device("cpu"), torch.float32)
    assert model.logit_columns == len(tokenizer) + 3
    assert not model.module.training
