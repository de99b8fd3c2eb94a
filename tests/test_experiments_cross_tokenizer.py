"""experiments/cross_tokenizer.py: claim 2 with a BPE per domain, fused per word, end to end at smoke size."""

from __future__ import annotations

import json

import pytest

from experiments import cross_tokenizer


@pytest.mark.slow  # trains two toy models and tokenizers: 30-90 s on the shared 2-core machine
def test_smoke_run_fuses_two_own_tokenizer_models_per_word(tmp_path):
    assert cross_tokenizer.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results_cross_tokenizer.json").read_text())
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
    report = (tmp_path / "RESULTS_cross_tokenizer.md").read_text()
    for row in ("model a (web) alone", "model b (devtools) alone", "fused mixture ", "fused mixture_switch"):
        assert f"| {row}" in report
