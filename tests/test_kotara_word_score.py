"""``kotara score`` fused per word (DESIGN §5c) end to end: models with different tokenizers, the
equality with the token path for copies of one model, the JSON, the user errors, torchrun."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_kotara_support import (  # noqa: F401
    RUN_CONFIG_KEYS,
    build_gpt2,
    build_tokenizer,
    one_torch_thread,
    write_corpus,
)

from kotara import demo
from kotara.cli import main
from moc_kernels import backend


def bpe_tokenizer(directory: Path, text: Path, vocab_size: int) -> Path:
    from model.data import train_tokenizer

    tokenizer = train_tokenizer([text.read_text(encoding="utf-8")], vocab_size=vocab_size)
    tokenizer.save_pretrained(directory)
    return directory


def build_workspace(root: Path) -> dict[str, Path]:
    """A text, tiny GPT-2s over two byte-level BPEs (a, c: one; b: the other) and one over a word-level tokenizer."""
    text = write_corpus(root / "text.txt", num_lines=8)
    # Two kinds: the project's byte-level BPE (model.data) and the demo's (other special tokens), two sizes.
    small, large = bpe_tokenizer(root / "bpe300", text, 300), demo.build_bpe_tokenizer(root / "bpe340", text, 340)
    return {
        "text": text,
        "a": build_gpt2(root / "a", small, seed=1),
        "b": build_gpt2(root / "b", large, seed=2, extra_columns=3),
        "c": build_gpt2(root / "c", small, seed=3),
        "words": build_gpt2(root / "w", build_tokenizer(root / "wtok", text), seed=4),
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("kotara_words"))


def run_main(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def common(workspace, *models, extra=()):
    argv = [arg for m in models for arg in ("--model", str(workspace[m]))]
    argv += ["--dataset_path", str(workspace["text"]), "--max_length", "24", "--stride", "10"]
    return argv + ["--device", "cpu", "--no_progress", "--kernels", "reference", *extra]


def test_different_tokenizers_fuse_per_word(workspace, tmp_path, capsys):
    out = tmp_path / "m.json"
    argv = common(workspace, "a", "b", extra=["--temp", "0.9", "--temp", "1.2", "--save_metrics", str(out)])
    code, stdout, _ = run_main(argv, capsys)
    assert code == 0
    assert "fused mixture_bayes" in stdout and "not defined across tokenizers" in stdout
    metrics = json.loads(out.read_text())
    assert metrics["fusion_unit"] == "word" and metrics["strategy"] == "all"
    text = workspace["text"].read_text(encoding="utf-8")
    assert metrics["segments"] == len(text.split(" ")) and metrics["bytes"] == len(text.encode())
    assert "fused_ppl" not in metrics
    assert tuple(metrics["config"]) == tuple(k for k in RUN_CONFIG_KEYS if k != "windows")
    assert metrics["config"]["tokenizer"] is None and len(metrics["config"]["vocab_size"]) == 2
    tokens = [m["tokens"] for m in metrics["models"]]
    assert tokens[0] > tokens[1] > 0  # each model's own tokens: the larger BPE needs fewer
    bits = metrics["bits_per_byte"]
    assert set(bits) == {"a", "b", "mixture", "mixture_bayes", "mixture_switch"}
    tempered = [m["bits_per_byte_at_temperature"] for m in metrics["models"]]
    assert bits["mixture"] <= 0.5 * sum(tempered) + 1e-12
    num_bytes = metrics["bytes"]
    assert bits["mixture_bayes"] <= min(t + 1 / num_bytes for t in tempered) + 1e-12  # log2(1 / 0.5) = 1
    assert all(0 < b < 20 for b in bits.values())


def test_copies_of_one_model_per_word_equal_the_token_path(workspace, tmp_path, capsys):
    token_json, word_json = tmp_path / "token.json", tmp_path / "word.json"
    argv = common(workspace, "a", "a", "a", extra=["--batch_size", "1"])
    assert run_main([*argv, "--strategy", "mixture", "--save_metrics", str(token_json)], capsys)[0] == 0
    word_argv = [*argv, "--strategy", "all", "--fusion_unit", "word", "--save_metrics", str(word_json)]
    assert run_main(word_argv, capsys)[0] == 0
    token, word = json.loads(token_json.read_text()), json.loads(word_json.read_text())
    assert "fusion_unit" not in token and word["fusion_unit"] == "word"
    expected = token["bits_per_byte"]["a"]
    assert word["models"][0]["tokens"] == token["tokens"]
    for key in ("a", "b", "c", "mixture", "mixture_bayes", "mixture_switch"):
        assert abs(word["bits_per_byte"][key] - expected) <= 1e-9, key


def test_one_model_alone_is_its_token_level_bits_per_byte(workspace):
    from kotara import loading, words
    from kotara.evaluate import FusionSpec, evaluate
    from kotara.windows import rolling_windows
    from kotara.word_score import prepare_input, score_words

    tokenizer = loading.load_tokenizer(str(workspace["c"]))
    model = loading.load_model(str(workspace["c"]), "a", torch.device("cpu"), torch.float32)
    pieces = loading.read_text_pieces(str(workspace["text"]))
    text = loading.tokenize_file(tokenizer, str(workspace["text"]))
    bounds = words.boundaries("".join(pieces))
    item = prepare_input(model, tokenizer, pieces, None, bounds)
    assert torch.equal(item.token_ids, text.token_ids)
    result = score_words([item], text.num_bytes, len(bounds) + 1, list(words.WORD_STRATEGIES), [1.0], [1.0], 24, 10)
    spec = FusionSpec(["mixture"], [1.0, 1.0], [0.5, 0.5], [0.5, 0.5])
    token = evaluate([model, model], text.token_ids, text.num_bytes, rolling_windows(len(text.token_ids), 24, 10), spec)
    expected = token.bits_per_byte(token.model_nll[0])
    for strategy in words.WORD_STRATEGIES:
        assert abs(result.bits_per_byte(result.strategy_log_prob[strategy]) - expected) <= 1e-9


def test_word_unit_of_models_sharing_a_tokenizer_runs_all_three(workspace, capsys):
    code, stdout, _ = run_main(common(workspace, "a", "c", extra=["--fusion_unit", "word"]), capsys)
    assert code == 0
    for strategy in ("mixture", "mixture_bayes", "mixture_switch"):
        assert f"fused {strategy}" in stdout


@pytest.mark.parametrize(
    "models, extra, message",
    [
        (("a", "b"), ["--strategy", "entropy"], "--strategy entropy combines the models' logits token by token"),
        (("a", "b"), ["--strategy", "poe"], "needs one shared vocabulary"),
        (("a", "b"), ["--tokenizer", "{a}"], "--tokenizer names one shared tokenizer, but the models' own"),
        (("a", "b"), ["--switch_rate", "1.5"], "--switch_rate must be in [0, 1]"),
        (("a", "b"), ["--fusion_unit", "token"], "tokenizer mismatch"),
        (("a", "words"), [], "model b: no token starts at the word boundary at character"),
    ],
)
def test_user_errors_are_one_line_exit_2(workspace, tmp_path, capsys, models, extra, message):
    out = tmp_path / "never.json"
    extra = [e.format(a=workspace["a"]) for e in extra]
    code, _, err = run_main(common(workspace, *models, extra=[*extra, "--save_metrics", str(out)]), capsys)
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def _rank_worker(rank, world_size, port, argv):
    import os

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True",
    )  # fmt: skip
    code = main(argv)
    if code:
        raise SystemExit(code)


def test_two_gloo_processes_equal_one_process(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(backend, "_selected", None)
    single, double = tmp_path / "one.json", tmp_path / "two.json"
    assert run_main(common(workspace, "a", "b", extra=["--save_metrics", str(single)]), capsys)[0] == 0
    argv = common(workspace, "a", "b", extra=["--batch_size", "2", "--save_metrics", str(double)])
    store = torch.distributed.TCPStore("127.0.0.1", 0, world_size=2, is_master=True, wait_for_workers=False)
    torch.multiprocessing.start_processes(
        _rank_worker, args=(2, store.port, argv), nprocs=2, join=True, start_method="fork"
    )
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert two["config"]["world_size"] == 2 and one["config"]["world_size"] == 1
    for key, value in one["bits_per_byte"].items():
        assert math.isclose(two["bits_per_byte"][key], value, rel_tol=1e-6), key


def test_per_token_mixture_bayes_is_the_whole_text_mixture_and_switch_at_zero_equals_it(workspace, tmp_path, capsys):
    """Shared vocabulary, per token: w_{m,k} ∝ w_m prod_{i<k} p_m(x_i), so the fused NLL is
    -log sum_m w_m P_m(x) of the models at their temperatures; fixed share with alpha = 0 is the same."""
    out, zero = tmp_path / "t.json", tmp_path / "z.json"
    argv = common(workspace, "a", "c", extra=["--temp", "0.9", "--weight", "0.3", "--weight", "0.7"])
    assert run_main([*argv, "--strategy", "all", "--save_metrics", str(out)], capsys)[0] == 0
    switch_argv = [*argv, "--strategy", "mixture_switch", "--switch_rate", "0", "--save_metrics", str(zero)]
    assert run_main(switch_argv, capsys)[0] == 0
    metrics, switch = json.loads(out.read_text()), json.loads(zero.read_text())
    assert "fusion_unit" not in metrics  # the token path
    tempered = [m["nll_at_temperature"] for m in metrics["models"]]
    whole = -torch.logsumexp(
        torch.tensor([math.log(0.3) - tempered[0], math.log(0.7) - tempered[1]], dtype=torch.float64), 0
    )
    bayes = metrics["strategies"]["mixture_bayes"]["nll"]
    assert abs(bayes - float(whole)) <= 1e-9 * abs(bayes)
    assert bayes <= min(t - math.log(w) for t, w in zip(tempered, (0.3, 0.7))) + 1e-9
    assert abs(switch["strategies"]["mixture_switch"]["nll"] - bayes) <= 1e-9 * abs(bayes)
    assert metrics["strategies"]["mixture_switch"]["nll"] != bayes  # alpha = 0.01 moves the weights
    assert sum(metrics["strategies"]["mixture_bayes"]["mean_weights"].values()) == pytest.approx(1.0)


def test_per_token_posteriors_of_copies_of_one_model_are_that_model(workspace, tmp_path, capsys):
    out = tmp_path / "t.json"
    argv = common(workspace, "a", "a", extra=["--strategy", "all", "--save_metrics", str(out)])
    assert run_main(argv, capsys)[0] == 0
    bits = json.loads(out.read_text())["bits_per_byte"]
    for strategy in ("mixture_bayes", "mixture_switch"):
        assert abs(bits[strategy] - bits["a"]) <= 1e-9
