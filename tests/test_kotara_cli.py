"""The Kotara CLI end to end: the original command line, --strategy all with M = 3, the JSON, user
errors (one line, exit 2, nothing written) and torchrun with 2 gloo processes equal to one process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
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

import moc_kernels as mk
from kotara.cli import main
from moc_kernels import backend

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("kotara_cli")
    text = write_corpus(root / "text.txt", num_lines=10)
    tok = build_tokenizer(root / "tok", text)
    other_tok = build_tokenizer(root / "other_tok", text, extra_words=("zebra",))
    return {
        "root": root,
        "text": text,
        "a": build_gpt2(root / "a", tok, seed=1),
        "b": build_gpt2(root / "b", tok, seed=2, extra_columns=5),
        "c": build_gpt2(root / "c", tok, seed=3),
        "foreign": build_gpt2(root / "foreign", other_tok, seed=4),
    }


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    return env


def test_original_command_line_works_unchanged(workspace, tmp_path):
    out = tmp_path / "out.json"
    cmd = [
        sys.executable, "kotara.py", "--model_a", str(workspace["a"]), "--model_b", str(workspace["b"]),
        "--dataset_path", str(workspace["text"]), "--strategy", "entropy", "--temp_a", "0.85", "--temp_b", "1.1",
        "--dtype", "bfloat16", "--max_length", "16", "--stride", "8", "--save_metrics", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fused entropy" in proc.stdout and "tokens/s" in proc.stdout
    # Alone = T 1 (the original baseline); tempered models get one more row, alone at their temperature.
    assert "model a (T=1)" in proc.stdout and "model a (T=0.85)" in proc.stdout and "model b (T=1.1)" in proc.stdout
    metrics = json.loads(out.read_text())
    for key in ("baseline_ppl_a", "baseline_ppl_b", "fused_ppl", "strategy", "temps", "poe_betas", "weights", "config"):
        assert key in metrics, key
    assert metrics["strategy"] == "entropy"
    assert metrics["temps"] == {"a": 0.85, "b": 1.1}
    assert metrics["poe_betas"] == {"a": 0.5, "b": 0.5}  # the original's defaults
    assert set(metrics["weights"]) == {"w_a_mean", "w_b_mean"}
    assert metrics["weights"]["w_a_mean"] + metrics["weights"]["w_b_mean"] == pytest.approx(1.0)
    assert metrics["config"]["max_length"] == 16 and metrics["config"]["dtypes"] == ["bfloat16", "bfloat16"]
    assert tuple(metrics["config"]) == RUN_CONFIG_KEYS
    assert metrics["config"]["tokenizer"] == str(workspace["a"]) and metrics["config"]["windows"] > 0
    model_a = metrics["models"][0]
    assert metrics["baseline_ppl_a"] == model_a["ppl"] and model_a["temperature"] == 0.85
    assert model_a["ppl_at_temperature"] == pytest.approx(math.exp(model_a["nll_at_temperature"] / metrics["tokens"]))
    assert model_a["ppl_at_temperature"] != pytest.approx(model_a["ppl"], rel=1e-3)
    assert metrics["config"]["logit_columns"][1] == metrics["config"]["vocab_size"] + 5
    tokens = metrics["tokens"]
    assert tokens == metrics["models"][0]["tokens"] > 0
    assert metrics["prefix_token"] == {"kind": "bos", "id": 1, "scored": False}
    nll = metrics["strategies"]["entropy"]["nll"]
    assert metrics["fused_ppl"] == pytest.approx(math.exp(nll / tokens))
    assert metrics["bits_per_byte"]["entropy"] == pytest.approx(nll / (math.log(2) * metrics["bytes"]))
    assert metrics["bytes"] == workspace["text"].stat().st_size
    assert metrics["throughput"]["tokens_per_s"] > 0
    assert len(metrics["similarity"]["pairs"]) == 1


def _run_main(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_strategy_all_with_three_models(workspace, tmp_path, capsys):
    out = tmp_path / "all.json"
    argv = ["--model", str(workspace["a"]), "--model", str(workspace["b"]), "--model", str(workspace["c"])]
    argv += ["--dataset_path", str(workspace["text"]), "--strategy", "all", "--max_length", "12", "--stride", "5"]
    argv += ["--temp", "0.9", "--weight", "1", "--weight", "2", "--weight", "1", "--poe_beta", "1.0"]
    argv += ["--batch_size", "3", "--device", "cpu", "--no_progress", "--save_metrics", str(out)]
    code, stdout, _ = _run_main(argv, capsys)
    assert code == 0
    metrics = json.loads(out.read_text())
    per_token_posteriors = {"mixture_bayes", "mixture_switch"}  # Kotara's own, not kernel strategies
    assert set(metrics["fused_ppl"]) == set(mk.STRATEGIES) | per_token_posteriors
    assert [m["name"] for m in metrics["models"]] == ["a", "b", "c"]
    assert {"baseline_ppl_a", "baseline_ppl_b", "baseline_ppl_c"} <= set(metrics)
    assert metrics["temps"] == {"a": 0.9, "b": 0.9, "c": 0.9}
    assert all(m["ppl_at_temperature"] > 0 for m in metrics["models"])
    assert metrics["poe_betas"] == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert [p["models"] for p in metrics["similarity"]["pairs"]] == [["a", "b"], ["a", "c"], ["b", "c"]]
    assert metrics["strategies"]["mixture"]["mean_weights"] == pytest.approx(
        {"w_a_mean": 0.25, "w_b_mean": 0.5, "w_c_mean": 0.25}
    )
    assert metrics["strategies"]["average"]["mean_weights"]["w_b_mean"] == pytest.approx(1 / 3)
    for strategy in mk.STRATEGIES:
        assert f"fused {strategy}" in stdout
        assert metrics["bits_per_byte"][strategy] > 0


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_dataset", "dataset not found"),
        ("empty_dataset", "is empty"),
        ("binary_dataset", "not valid UTF-8"),
        ("stride_too_big", "stride must satisfy"),
        ("stride_zero", "stride must satisfy"),
        ("unknown_strategy", "unknown strategy 'vote'"),
        ("one_model", "at least 2 models"),
        ("missing_model_dir", "model b directory not found"),
        ("cuda_absent", "CUDA is not available"),
        # Tokenizers that differ fuse per word, which these whitespace word-level ones cannot (no token
        # starts at a space): tests/test_kotara_word_score.py has the working case.
        ("foreign_tokenizer", "no token starts at the word boundary"),
        ("temperature_zero", "--temp values must be > 0"),
        ("negative_weight", "--weight values must be > 0"),
        ("all_betas_negative", "--poe_beta values must be finite with at least one > 0"),
        ("bad_flag", "unrecognized arguments"),
    ],
)
def test_user_errors_are_one_line_exit_2_and_write_nothing(workspace, tmp_path, capsys, case, message):
    if case == "cuda_absent" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out.json"
    dataset, model_b = workspace["text"], workspace["b"]
    extra = []
    if case == "missing_dataset":
        dataset = tmp_path / "nope.txt"
    elif case == "empty_dataset":
        dataset = tmp_path / "empty.txt"
        dataset.write_text("  \n\n", encoding="utf-8")
    elif case == "binary_dataset":
        dataset = tmp_path / "latin1.txt"
        dataset.write_bytes("caf\xe9 ol\xe9\n".encode("latin-1"))
    elif case == "missing_model_dir":
        model_b = tmp_path / "no_such_model"
    elif case == "foreign_tokenizer":
        model_b = workspace["foreign"]
    extra = {
        "stride_too_big": ["--stride", "17"],
        "stride_zero": ["--stride", "0"],
        "unknown_strategy": ["--strategy", "vote"],
        "cuda_absent": ["--device", "cuda"],
        "temperature_zero": ["--temp_b", "0"],
        "negative_weight": ["--strategy", "mixture", "--weight", "1", "--weight", "-1"],
        "all_betas_negative": ["--strategy", "poe", "--poe_beta", "-1", "--poe_beta", "-0.5"],
        "bad_flag": ["--frobnicate"],
    }.get(case, [])
    argv = ["--model_a", str(workspace["a"])]
    if case != "one_model":
        argv += ["--model_b", str(model_b)]
    argv += ["--dataset_path", str(dataset), "--max_length", "16", "--stride", "8", "--save_metrics", str(out)]
    argv += ["--no_progress", *extra]
    try:
        code, _, stderr = _run_main(argv, capsys)
    except SystemExit as exit_:  # argparse errors leave through SystemExit
        code, stderr = exit_.code, capsys.readouterr().err
    assert code == 2
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert list(tmp_path.glob(".kotara-*")) == []


def test_score_subcommand_is_the_flat_command_and_scores_contrastive_poe(workspace, tmp_path, capsys):
    """``kotara score ...`` = the original flat command line; a negative poe beta scores the normalised
    contrastive distribution (finite, and different from the default betas)."""
    common = ["--model", str(workspace["a"]), "--model", str(workspace["b"]), "--dataset_path", str(workspace["text"])]
    common += ["--strategy", "poe", "--max_length", "16", "--stride", "8", "--no_progress"]
    results = {}
    for name, argv in (
        ("flat", common),
        ("score", ["score", *common]),
        ("contrastive", ["score", *common, "--poe_beta", "1.5", "--poe_beta", "-0.5"]),
    ):
        out = tmp_path / f"{name}.json"
        code, _, _ = _run_main([*argv, "--save_metrics", str(out)], capsys)
        assert code == 0, name
        results[name] = json.loads(out.read_text())
    assert results["score"]["strategies"] == results["flat"]["strategies"]
    contrastive = results["contrastive"]
    assert contrastive["poe_betas"] == {"a": 1.5, "b": -0.5}
    assert math.isfinite(contrastive["fused_ppl"])
    assert contrastive["fused_ppl"] != pytest.approx(results["flat"]["fused_ppl"], rel=1e-3)


def test_torchrun_rank_selects_its_gpu_before_nccl_init_and_leaves_the_group(monkeypatch):
    """Under torchrun with CUDA devices, each rank makes cuda:LOCAL_RANK current before the process
    group exists (NCCL communicates on the current device), and every rank leaves the group: after
    a barrier when scoring ends, at once when it raises."""
    from kotara.cli import options

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: calls.append(("barrier",)))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: calls.append(("destroy",)))
    with options.process_group([torch.device("cuda", 1), torch.device("cuda", 1)]) as rank:
        assert rank == 1 and calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl")]
    assert calls[2:] == [("barrier",), ("destroy",)]
    calls.clear()
    with pytest.raises(ValueError), options.process_group([torch.device("cpu")]):
        raise ValueError("a rank fails: no barrier (the other rank may never reach it)")
    assert calls == [("init", "gloo"), ("destroy",)]


def _rank_worker(rank: int, world_size: int, port: int, argv: list[str]) -> None:
    """One process of a 2-process run, with the environment torchrun gives its workers: the store is
    the launcher's (here the test's), which the ranks join as clients."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True",
    )  # fmt: skip
    code = main(argv)
    if code:
        raise SystemExit(code)


def test_two_gloo_processes_equal_one_process(workspace, tmp_path, capsys, monkeypatch):
    """The torchrun path (env RANK/WORLD_SIZE/MASTER_*, gloo, windows sharded, sums all-reduced).

    The two ranks are forked from this process with torchrun's environment rather than launched by
    ``torchrun kotara.py``: identical code path from ``main`` down, without importing torch and
    transformers twice more (measured: 70 s instead of ~2 s on the loaded 2-core box).
    """
    monkeypatch.setattr(backend, "_selected", None)
    common = ["--model", str(workspace["a"]), "--model", str(workspace["b"]), "--dataset_path", str(workspace["text"])]
    common += ["--strategy", "all", "--max_length", "16", "--stride", "6", "--device", "cpu", "--no_progress"]
    single, double = tmp_path / "one.json", tmp_path / "two.json"
    code, _, _ = _run_main([*common, "--kernels", "reference", "--save_metrics", str(single)], capsys)
    assert code == 0
    argv = [*common, "--batch_size", "2", "--save_metrics", str(double)]
    # The store listens on a port the OS picked (no free-port guess another process could take first).
    store = torch.distributed.TCPStore("127.0.0.1", 0, world_size=2, is_master=True, wait_for_workers=False)
    torch.multiprocessing.start_processes(
        _rank_worker, args=(2, store.port, argv), nprocs=2, join=True, start_method="fork"
    )
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert two["config"]["world_size"] == 2 and one["config"]["world_size"] == 1
    assert one["config"]["kernels_ran"] == "reference"
    assert two["tokens"] == one["tokens"]
    for a, b in zip(one["models"], two["models"]):
        assert b["nll"] == pytest.approx(a["nll"], rel=1e-6)
    for strategy in mk.STRATEGIES:
        assert two["strategies"][strategy]["nll"] == pytest.approx(one["strategies"][strategy]["nll"], rel=1e-6)
        assert two["weights"][strategy] == pytest.approx(one["weights"][strategy], rel=1e-6)
    pair_one, pair_two = one["similarity"]["pairs"][0], two["similarity"]["pairs"][0]
    for key in ("top1_agreement", "mean_js_divergence_nats", "nll_pearson"):
        assert pair_two[key] == pytest.approx(pair_one[key], rel=1e-6), key


def test_fuses_our_own_exported_models(workspace, tmp_path, capsys):
    """Two LunarisCodex-MoC models exported by ``model.hf.export_hf`` (what train_moe.py calls), one
    with its vocabulary padded past the tokenizer, fused with each other and with a GPT-2."""
    hf = pytest.importorskip("model.hf", reason="the project's model package is not available")
    from model.config import ModelConfig
    from model.lm import LunarisLM

    tokenizer = loading_tokenizer(workspace["a"])
    dirs = []
    for seed, extra in ((1, 0), (2, 3)):
        torch.manual_seed(seed)
        config = dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=len(tokenizer) + extra)
        config.update(multiple_of=16, max_seq_len=32, n_experts=4, top_k=2, kernels="reference")
        lm = LunarisLM(ModelConfig.from_dict(config)).eval()
        dirs.append(str(hf.export_hf(lm, tmp_path / f"lunaris{seed}", tokenizer=tokenizer)))
    out = tmp_path / "ours.json"
    argv = ["--model", dirs[0], "--model", dirs[1], "--model", str(workspace["b"]), "--strategy", "all"]
    argv += ["--dataset_path", str(workspace["text"]), "--max_length", "16", "--stride", "8", "--batch_size", "2"]
    argv += ["--device", "cpu", "--no_progress", "--save_metrics", str(out)]
    code, stdout, _ = _run_main(argv, capsys)
    assert code == 0
    metrics = json.loads(out.read_text())
    assert metrics["config"]["logit_columns"] == [len(tokenizer), len(tokenizer) + 3, len(tokenizer) + 5]
    assert all(math.isfinite(v) for v in metrics["fused_ppl"].values())
    assert 0 < metrics["baseline_ppl_a"] < 10 * len(tokenizer)  # a random model: about uniform, not broken
    assert "fused mixture_gap" in stdout


def loading_tokenizer(path):
    from kotara.loading import load_tokenizer

    return load_tokenizer(str(path))
