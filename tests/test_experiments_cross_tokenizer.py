"""experiments/cross_tokenizer.py: claim 2 with a BPE per domain, fused per word, end to end at smoke size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import cross_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # trains two toy models and tokenizers: 30-90 s on the shared 2-core machine
def test_smoke_run_fuses_two_own_tokenizer_models_per_word(tmp_path):
    # A results directory holding the committed CPU run's results.json: the table is folded into it.
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    (results_dir / "results.json").write_text((REPO / "experiments" / "results.json").read_text())
    argv = ["--smoke", "--out-dir", str(tmp_path), "--results-dir", str(results_dir)]
    assert cross_tokenizer.main(argv) == 0
    folded = json.loads((results_dir / "results.json").read_text())
    assert folded["claim2"]["own_tokenizers"]["kotara"]["fusion_unit"] == "word"
    assert "### Extra: each model with its own tokenizer, fused per word" in (results_dir / "RESULTS.md").read_text()
    results = json.loads((results_dir / "results_cross_tokenizer.json").read_text())
    metrics = results["kotara"]
    assert metrics["fusion_unit"] == "word" and metrics["segments"] > 1
    vocabularies = [
        json.loads((tmp_path / "data" / f"own_tokenizer_{n}" / "tokenizer" / "tokenizer.json").read_text())["model"][
            "vocab"
        ]
        for n in results["domains"]
    ]
    assert vocabularies[0] != vocabularies[1]  # each domain's own BPE
    bits = metrics["bits_per_byte"]
    alone = [bits["a"], bits["b"]]
    assert bits["mixture"] <= sum(alone) / 2 + 1e-12
    assert bits["mixture_bayes"] <= min(alone) + 1 / metrics["bytes"] + 1e-12  # log2(1 / 0.5) = 1 bit
    report = (results_dir / "RESULTS_cross_tokenizer.md").read_text()
    for row in ("model a (web) alone", "model b (devtools) alone", "fused mixture ", "fused mixture_switch"):
        assert f"| {row}" in report
