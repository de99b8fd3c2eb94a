"""model.data / model.corpus: preparation into token shards, meta.json, sampling, and clear errors."""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from model.corpus import file_docstrings, stdlib_documents
from model.data import DataError, TokenData, dtype_for_vocab, main, prepare, prepare_files

WORDS = [
    "the",
    "a",
    "expert",
    "router",
    "token",
    "layer",
    "model",
    "loss",
    "gradient",
    "attention",
    "returns",
    "value",
    "list",
    "string",
    "file",
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is fastest, and never spins against the other test processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_documents(n: int = 120, seed: int = 0) -> list[str]:
    """Deterministic text with structure (a tiny grammar), so a model can learn something quickly."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = [
            f"The {rng.choice(WORDS)} {rng.choice(['returns', 'takes', 'holds'])} a {rng.choice(WORDS)}."
            for _ in range(rng.randint(4, 10))
        ]
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("text")
    for i, doc in enumerate(synthetic_documents()):
        (src / f"doc_{i:03d}.txt").write_text(doc)
    out = tmp_path_factory.mktemp("data")
    prepare_files([src], out, vocab_size=300, val_fraction=0.2, progress=False)
    return out


def test_prepare_writes_meta_shards_and_tokenizer(prepared: Path):
    from transformers import AutoTokenizer

    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["vocab_size"] == 300 and meta["dtype"] == "uint16"
    assert meta["documents"] == 120 and len(meta["sources"]) == 120
    assert all(len(s["sha256"]) == 64 for s in meta["sources"])
    for split in ("train", "val"):
        on_disk = sum((prepared / s["file"]).stat().st_size for s in meta[f"{split}_shards"]) // 2
        assert on_disk == meta[f"{split}_tokens"] > 0
    tok = AutoTokenizer.from_pretrained(str(prepared / "tokenizer"))
    assert len(tok) == 300 and tok.eos_token == tok.bos_token == "<|endoftext|>"
    # The shards decode back to the text: documents separated by EOS, every id below the vocab size.
    train = np.memmap(prepared / "train_00000.bin", dtype=np.uint16, mode="r")
    assert int(train.max()) < 300 and int((train == tok.eos_token_id).sum()) > 50
    first = train[: int(np.argmax(train == tok.eos_token_id))]
    assert tok.decode(first.tolist()).startswith("The ")


def test_prepare_with_existing_tokenizer_and_small_shards(prepared: Path, tmp_path: Path):
    docs = synthetic_documents(30, seed=1)
    meta = prepare(docs, tmp_path, tokenizer=prepared / "tokenizer", val_fraction=0.3, shard_tokens=500, progress=False)
    assert meta["vocab_size"] == 300 and len(meta["train_shards"]) > 1
    assert all(s["tokens"] <= 500 for s in meta["train_shards"])
    data = TokenData(tmp_path, seq_len=16, vocab_size=300)
    assert data.tokens("train") == meta["train_tokens"]


def test_dtype_for_vocab():
    assert dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.uint32
    with pytest.raises(DataError, match="vocab_size"):
        dtype_for_vocab(0)


def test_sampling_is_deterministic_and_sharded_by_rank(prepared: Path):
    data = TokenData(prepared, seq_len=16, vocab_size=300)
    x, y = data.train_batch(seed=3, step=7, micro_step=1, batch_size=4)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one token
    assert torch.equal(x, data.train_batch(3, 7, 1, 4)[0])  # a pure function of (seed, step, micro_step)
    assert not torch.equal(x, data.train_batch(3, 8, 1, 4)[0])
    # Two ranks with batch 2 see exactly the global batch of one process with batch 4.
    halves = [data.train_batch(3, 7, 1, 2, rank=r, world_size=2)[0] for r in range(2)]
    assert torch.equal(torch.cat(halves), x)
    val = list(data.val_batches(2, 4))
    assert len(val) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(val, data.val_batches(2, 4)))


def test_unigram_baseline_is_a_cross_entropy(prepared: Path):
    data = TokenData(prepared, seq_len=16, vocab_size=300)
    loss = data.unigram_loss()
    assert 0 < loss < np.log(300)  # better than uniform on this repetitive text


def test_bad_data_errors(prepared: Path, tmp_path: Path):
    with pytest.raises(DataError, match="not found"):
        TokenData(tmp_path / "missing", 16)
    with pytest.raises(DataError, match="meta.json"):
        TokenData(tmp_path, 16)
    with pytest.raises(DataError, match="vocab size 300 but model.vocab_size is 512"):
        TokenData(prepared, 16, vocab_size=512)
    broken = tmp_path / "broken"
    broken.mkdir()
    meta = json.loads((prepared / "meta.json").read_text())
    (broken / "meta.json").write_text(json.dumps(meta))
    (broken / "train_00000.bin").write_bytes(b"")
    (broken / "val_00000.bin").write_bytes((prepared / "val_00000.bin").read_bytes())
    with pytest.raises(DataError, match="is empty"):
        TokenData(broken, 16)
    (broken / "meta.json").write_text(json.dumps(meta | {"vocab_size": 70000}))
    with pytest.raises(DataError, match="does not fit token dtype uint16"):
        TokenData(broken, 16, vocab_size=70000)
    with pytest.raises(DataError, match="longer than seq_len"):
        TokenData(prepared, seq_len=10**7)


def test_prepare_cli_errors(tmp_path: Path, capsys):
    assert (
        main(["prepare", "--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"), "--vocab-size", "300"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: input") and "nope.txt" in err and err.count("\n") == 1
    (tmp_path / "empty.txt").write_text("   \n")
    assert (
        main(["prepare", "--input", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o"), "--vocab-size", "300"])
        == 2
    )
    assert "empty" in capsys.readouterr().err
    assert main(["prepare", "--input", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "--vocab-size" in capsys.readouterr().err


def test_stdlib_corpus_is_deterministic_docstrings(tmp_path: Path):
    pkg = tmp_path / "lib"
    (pkg / "test").mkdir(parents=True)
    (pkg / "b.py").write_text(
        '"""Module b does useful things."""\ndef f():\n    """Return the answer to everything."""\n'
    )
    (pkg / "a.py").write_text('class A:\n    """A class whose docstring is long enough."""\n')
    (pkg / "test" / "t.py").write_text('"""Tests are skipped, whatever they say."""\n')
    (pkg / "bad.py").write_text("def (:\n")  # a syntax error is skipped, not fatal
    docs = stdlib_documents(root=pkg)
    assert docs == [
        "A class whose docstring is long enough.",
        "Module b does useful things.\n\nReturn the answer to everything.",
    ]
    with pytest.raises(ValueError, match="max_bytes"):
        stdlib_documents(max_bytes=0, root=pkg)


def test_docstrings_of_definitions_nested_in_every_kind_of_block_in_source_order(tmp_path: Path):
    """Definitions sit in bodies of functions, classes, if/else, loops, with, try/except/finally and
    match cases; a lambda holds none. Each docstring once, in source order."""
    source = """
        '''The module's own docstring, first.'''
        def outer():
            '''Outer function, line three.'''
            class Inner:
                '''A class inside a function.'''
                async def method(self):
                    '''An async method of the inner class.'''
            return lambda: '''a lambda body is an expression, no docstring'''
        if True:
            def in_if():
                '''Defined in an if block.'''
        else:
            def in_else():
                '''Defined in the else block.'''
        for _ in range(1):
            def in_loop():
                '''Defined in a for loop.'''
        with open(__file__) as handle:
            @staticmethod
            def decorated():
                '''Decorated, defined in a with block.'''
        try:
            def in_try():
                '''Defined in a try block.'''
        except ValueError:
            def in_except():
                '''Defined in an except handler.'''
        finally:
            def in_finally():
                '''Defined in a finally block.'''
        match 1:
            case 1:
                def in_case():
                    '''Defined in a match case.'''
        """
    (tmp_path / "m.py").write_text(textwrap.dedent(source))
    assert list(file_docstrings(tmp_path / "m.py")) == [
        "The module's own docstring, first.",
        "Outer function, line three.",
        "A class inside a function.",
        "An async method of the inner class.",
        "Defined in an if block.",
        "Defined in the else block.",
        "Defined in a for loop.",
        "Decorated, defined in a with block.",
        "Defined in a try block.",
        "Defined in an except handler.",
        "Defined in a finally block.",
        "Defined in a match case.",
    ]
