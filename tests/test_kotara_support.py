"""Builders shared by the Kotara tests: a word-level tokenizer and tiny GPT-2 models, saved locally;
and the keys every ``--save_metrics`` JSON's ``config`` holds.

Thin wrappers over ``kotara.demo`` (one place for the builders). Imported by the other
``test_kotara_*`` modules (pytest puts ``tests/`` on ``sys.path``); its one test checks that what it
builds loads back through Kotara's loader.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from kotara import demo

_WORD_LINE = (
    "the a of to and in is it that for on with as was by at from this be or an are not which but model token fused "
    "expert window stride entropy gap average mixture product length loss value"
)
WORDS = _WORD_LINE.split()
# ``config`` of the --save_metrics JSON, key by key in order (kotara.report.run_config); the word path's
# has every one but "windows" (each model has windows of its own).
RUN_CONFIG_KEYS = (
    "models", "model_a", "model_b", "tokenizer", "vocab_size", "logit_columns", "dataset_path", "max_length",
    "stride", "batch_size", "chunk_bytes", "windows", "dtype", "dtypes", "device", "devices", "kernels",
    "kernels_ran", "trust_remote_code", "world_size", "protocol",
)  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run a module's tiny models on one thread, then restore the setting.

    Measured on this project's shared 2-core machine under load: a tiny GPT-2 forward took 220 ms with
    2 intra-op threads (they spin against each other and other processes) and 11 ms with 1.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_corpus(path: Path, num_lines: int = 12, seed: int = 0) -> Path:
    """A deterministic text of about 10 * num_lines words from WORDS."""
    return demo.write_corpus(path, WORDS, num_words=10 * num_lines + random.Random(seed).randint(0, 5), seed=seed)


def build_tokenizer(directory: Path, text_path: Path, extra_words: tuple[str, ...] = ()) -> Path:
    """A WordLevel tokenizer over the corpus' words (plus ``extra_words``), saved as a HF directory."""
    return demo.build_tokenizer(
        directory, sorted(set(text_path.read_text(encoding="utf-8").split()) | set(extra_words))
    )


def build_gpt2(directory: Path, tokenizer_dir: Path, seed: int, extra_columns: int = 0) -> Path:
    """A random 2-layer GPT-2 (d = 32, 64 positions), logits padded by ``extra_columns``."""
    return demo.build_gpt2(directory, tokenizer_dir, seed, extra_columns=extra_columns)


def test_built_model_loads_through_kotara(tmp_path):
    from kotara import loading

    text = write_corpus(tmp_path / "t.txt", num_lines=2)
    tok_dir = build_tokenizer(tmp_path / "tok", text)
    model_dir = build_gpt2(tmp_path / "m", tok_dir, seed=0, extra_columns=3)
    tokenizer = loading.load_tokenizer(str(model_dir))
    model = loading.load_model(str(model_dir), "a", torch.device("cpu"), torch.float32)
    assert model.logit_columns == len(tokenizer) + 3
    assert not model.module.training
    assert model.module.config.use_cache is False
