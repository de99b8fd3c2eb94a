"""Issue 33's two Kotara findings.

- The ``*`` of a fused row ("beats every single-model row") needs a lead of more than
  ``steps.BEATS_MARGIN_NATS_PER_TOKEN`` nats per scored token, in the token table and in the word
  table: a model fused with itself led by rounding alone (PPL 4288.3418 against 4288.3419).
- ``kotara eval --no_progress`` shows no progress bar of Kotara's ("kotara loglikelihood").
"""

from __future__ import annotations

import math
import os

import pytest
from test_kotara_support import build_gpt2, build_tokenizer, one_torch_thread, write_corpus  # noqa: F401
from tqdm import tqdm

from kotara.evaluate import EvalResult
from kotara.report import format_table
from kotara.steps import BEATS_MARGIN_NATS_PER_TOKEN, FusionSpec
from kotara.word_score import WordResult, format_word_table

TOKENS = 2000
MODEL_NLL = TOKENS * math.log(4288.3419)  # the PPL, as a sum over the scored tokens


def _token_result(lead_per_token: float) -> EvalResult:
    fused = MODEL_NLL - lead_per_token * TOKENS
    return EvalResult(
        model_names=["a", "b"], strategies=["average"], tokens=TOKENS, num_bytes=3 * TOKENS,
        model_nll=[MODEL_NLL, MODEL_NLL], strategy_nll={"average": fused},
        strategy_mean_weights={"average": [0.5, 0.5]}, pairs=[(0, 1)], top1_agreement=[1.0], mean_jsd=[0.0],
        nll_pearson=[1.0], elapsed_s=1.0, forward_s=0.5, fusion_s=0.5,
    )  # fmt: skip


def _word_result(lead_per_token: float) -> WordResult:
    log_prob = -MODEL_NLL
    return WordResult(
        model_names=["a", "b"], strategies=["mixture"], num_bytes=3 * TOKENS, segments=TOKENS // 2,
        model_tokens=[TOKENS, TOKENS - 100], model_log_prob=[log_prob, log_prob - 50.0],
        model_log_prob_at_temperature=[log_prob, log_prob - 50.0],
        strategy_log_prob={"mixture": log_prob + lead_per_token * TOKENS},
        strategy_mean_weights={"mixture": [0.5, 0.5]}, elapsed_s=1.0, forward_s=0.5, fusion_s=0.5,
    )  # fmt: skip


def _fused_line(table: str, strategy: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(f"fused {strategy}"))


@pytest.mark.parametrize(
    ("lead", "marked"),
    [
        (math.log(4288.3419 / 4288.3418), False),  # the rounding: 2e-8 nats/token
        (0.5 * BEATS_MARGIN_NATS_PER_TOKEN, False),
        (2 * BEATS_MARGIN_NATS_PER_TOKEN, True),
        (1e-3, True),
        (-1e-3, False),
    ],
)
def test_a_fused_row_is_starred_only_past_the_rounding_margin(lead, marked):
    spec = FusionSpec(strategies=["average"], temperatures=[1.0, 1.0], weights=[0.5, 0.5], poe_betas=[0.5, 0.5])
    token_table = format_table(_token_result(lead), spec, ["A", "B"])
    word_table = format_word_table(_word_result(lead), [1.0, 1.0], ["A", "B"])
    assert _fused_line(token_table, "average").endswith(" *") is marked
    assert _fused_line(word_table, "mixture").endswith(" *") is marked
    margin = f"by more than {BEATS_MARGIN_NATS_PER_TOKEN:g} nats"
    assert margin in token_table and margin in word_table  # the footnote states the margin


@pytest.mark.slow  # one lm-eval run of two tiny models on two documents: 10-20 s on the 2-core VM, more under load
def test_eval_no_progress_shows_no_kotara_bar(tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")
    from test_kotara_harness import BOOTSTRAP, WORDS, write_tasks

    from kotara import harness
    from kotara.cli import main

    bars = []  # (desc, disable) of every bar the harness makes

    def recording_tqdm(*args, **kwargs):
        bars.append((kwargs.get("desc"), kwargs.get("disable")))
        return tqdm(*args, **kwargs)

    monkeypatch.setattr(harness, "tqdm", recording_tqdm)
    text = write_corpus(tmp_path / "text.txt", num_lines=4)
    tokenizer = build_tokenizer(tmp_path / "tok", text, extra_words=tuple(WORDS))
    a, b = build_gpt2(tmp_path / "a", tokenizer, seed=1), build_gpt2(tmp_path / "b", tokenizer, seed=2)
    tasks = write_tasks(tmp_path / "tasks", num_docs=2)
    argv = ["eval", "--model", str(a), "--model", str(b), "--tasks", str(tasks / "kt_mc.yaml"), "--device", "cpu",
            "--bootstrap_iters", str(BOOTSTRAP), "--no_progress"]  # fmt: skip
    had = os.environ.get("TQDM_DISABLE")
    try:
        assert main(argv) == 0
    finally:  # --no_progress sets TQDM_DISABLE for lm-eval's own bars: not for the other tests
        if had is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = had
    captured = capsys.readouterr()
    assert "kt_mc" in captured.out and "kotara loglikelihood" not in captured.err
    assert ("kotara loglikelihood", True) in bars and all(disable for _, disable in bars), bars
