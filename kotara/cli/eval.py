"""``kotara eval``: the fused model on lm-evaluation-harness tasks.

Parse (``build_parser``; the model, fusion and device flags are ``kotara.cli.options``', shared
with ``score`` and ``generate``) -> resolve -> evaluate with the library (``kotara.harness.FusedLM``
and ``evaluate_rows``, tasks from ``kotara.tasks``) -> report (``kotara.harness_report``).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

import moc_kernels
from kotara.cli import options
from kotara.cli.options import PROG
from kotara.steps import FusionSpec
from moc_kernels import STRATEGIES


def build_parser() -> argparse.ArgumentParser:
    """The ``eval`` command's parser (lm-evaluation-harness tasks on the fused model)."""
    p = options.Parser(
        prog=f"{PROG} eval",
        description="Evaluate the fused model of two or more causal LMs on lm-evaluation-harness tasks "
        "(needs the 'eval' extra: pip install -e '.[eval]'). Tokenisation, truncation and batching are lm-eval's "
        "'hf' model's; --strategy all scores each model alone and every strategy from one set of forwards.",
    )
    options.add_model_flags(p)
    options.add_fusion_flags(
        p,
        f"one of {', '.join(STRATEGIES)}, or 'all' (each model alone and every strategy); default entropy. Per word "
        "(--fusion_unit word, and models whose tokenizers differ): mixture, mixture_bayes, mixture_switch or all "
        "(default)",
        default=None,
    )
    w = p.add_argument_group("fusion across tokenizers (DESIGN §5b, §5c)")
    w.add_argument(
        "--fusion_unit",
        choices=["token", "word"],
        default=None,
        help="token: fuse the logits per token (one vocabulary); word: the closed-word mixture, each model reading "
        "the requests with its own tokenizer (kotara.harness_words). Default: word when the tokenizers differ. "
        "Per word, a request whose continuation does not start a token for some model (or a model that merges "
        "across a word boundary) fails the run with one line, as lm-eval fails on its other errors (no skipping)",
    )
    w.add_argument(
        "--switch_rate", type=float, default=0.01, help="mixture_switch's share alpha moved back to 1/M per word"
    )
    t = p.add_argument_group("tasks")
    t.add_argument(
        "--tasks",
        required=True,
        help="comma-separated lm-eval task names (their data must be cached: HF_DATASETS_OFFLINE is honoured), "
        "task YAML files, or directories of them",
    )
    t.add_argument("--include_path", action="append", default=[], help="more directories of task YAML files")
    t.add_argument("--num_fewshot", type=int, help="few-shot examples per request (default: each task's own, or 0)")
    t.add_argument("--limit", type=float, help="at most this many documents per task (< 1: that fraction of them)")
    t.add_argument("--batch_size", type=int, default=1, help="requests per forward (default 1)")
    t.add_argument("--max_length", type=int, help="context tokens per forward (default: the smallest of the models')")
    t.add_argument("--seed", type=int, help="lm-eval's seeds (python, numpy, torch, few-shot) and the sampling draws")
    t.add_argument(
        "--bootstrap_iters", type=int, default=100000, help="bootstrap resamples for stderrs (lm-eval's default)"
    )
    o = p.add_argument_group("output")
    o.add_argument("--output_path", help="write the JSON of every row (lm-eval's results per row) here")
    o.add_argument("--log_samples", action="store_true", help="with --output_path: also every request's samples")
    o.add_argument("--no_progress", action="store_true", help="no progress bars")
    o.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def check_eval_args(args: argparse.Namespace) -> None:
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num_fewshot must be >= 0, got {args.num_fewshot}")
    if args.limit is not None and not args.limit > 0:
        raise ValueError(f"--limit must be > 0, got {args.limit:g}")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.max_length is not None and args.max_length < 1:
        raise ValueError(f"--max_length must be >= 1, got {args.max_length}")
    if args.log_samples and not args.output_path:
        raise ValueError("--log_samples needs --output_path")
    options.check_output_file(args.output_path, "--output_path")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("eval runs in one process: run it without torchrun")


def run(args: argparse.Namespace) -> int:
    """``kotara eval``: lm-eval tasks on each row (the fusion, or with ``all`` each model and strategy)."""
    check_eval_args(args)
    quiet_lm_eval(args.no_progress)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ValueError(
            "kotara eval needs lm-evaluation-harness: pip install -e '.[eval]' (or pip install 'lm-eval[hf]')"
        ) from None
    if args.fusion_unit != "token":  # models whose tokenizers differ are fused per word (kotara.harness_words)
        from kotara import word_score

        tokenizers = word_score.own_tokenizers(options.model_paths(args), args.trust_remote_code)
        if args.fusion_unit == "word" or word_score.tokenizers_differ(tokenizers):
            return run_words(args, tokenizers)
    args.strategy = args.strategy or "entropy"
    strategies = options.strategies(args.strategy)
    from kotara.harness import FusedLM
    from kotara.tasks import resolve_tasks

    paths, _, devices, dtypes = options.resolve_models(args)
    spec = options.fusion_spec(args, len(paths), strategies)
    tasks, manager = resolve_tasks(args.tasks, args.include_path)
    if args.kernels:
        moc_kernels.set_backend(args.kernels)
    tokenizer, tokenizer_path = options.load_tokenizer(args, paths)
    models = options.load_models(args, paths, devices, dtypes, tokenizer, tokenizer_path)
    lm = FusedLM(
        models, strategy=args.strategy, tokenizer=tokenizer, temperatures=spec.temperatures, weights=spec.weights,
        poe_betas=spec.poe_betas, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
    )  # fmt: skip
    lm.progress = not args.no_progress
    labels = {m.name: path for m, path in zip(models, paths)}
    own = {"poe_betas": spec.poe_betas, "tokenizer": tokenizer_path}
    return evaluate_and_report(lm, args, tasks, manager, labels, args.strategy, spec, own, devices)


def run_words(args: argparse.Namespace, tokenizers: list[Any | None]) -> int:
    """``kotara eval`` fused per word (models whose tokenizers differ, or ``--fusion_unit word``):
    ``kotara.harness_words.WordFusedLM`` on the tasks, each model with its own tokenizer."""
    from kotara import loading
    from kotara.harness_words import WordFusedLM
    from kotara.tasks import resolve_tasks

    strategy = args.strategy or "all"
    strategies = options.word_strategies(strategy)
    options.check_switch_rate(args)
    if args.poe_beta or args.poe_beta_a is not None or args.poe_beta_b is not None:
        raise ValueError("--poe_beta is a logit strategy's: across tokenizers it does not apply")
    paths, _, devices, dtypes = options.resolve_models(args)
    spec = options.fusion_spec(args, len(paths), strategies)
    tasks, manager = resolve_tasks(args.tasks, args.include_path)
    if args.kernels:
        moc_kernels.set_backend(args.kernels)
    resolved = options.resolve_tokenizers(args, paths, tokenizers)
    models = [
        (loading.load_model(p, loading.model_label(i), devices[i], dtypes[i], args.trust_remote_code), tok)
        for i, (p, tok) in enumerate(zip(paths, resolved))
    ]
    lm = WordFusedLM(
        models, strategy=strategy, temperatures=spec.temperatures, weights=spec.weights, switch_rate=args.switch_rate,
        batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
    )  # fmt: skip
    labels = {r.name: path for r, path in zip(lm.readers, paths)}
    own = {"fusion_unit": "word", "switch_rate": args.switch_rate}
    return evaluate_and_report(lm, args, tasks, manager, labels, strategy, spec, own, devices)


def evaluate_and_report(
    lm: Any, args: argparse.Namespace, tasks: list[str], manager: Any, labels: dict[str, str], strategy: str,
    spec: FusionSpec, own: dict[str, Any], devices: list[torch.device],
) -> int:  # fmt: skip
    """Both paths' last steps: lm-eval on every row, the table, and with --output_path the JSON, whose
    config is the run's settings plus the path's ``own`` (token: PoE betas, tokenizer; word: switch rate)."""
    from kotara.harness import evaluate_rows
    from kotara.harness_report import format_rows, rows_json
    from kotara.report import write_json_atomic

    seeds = {} if args.seed is None else {
        f"{k}_seed": args.seed for k in ("random", "numpy_random", "torch_random", "fewshot_random")
    }  # fmt: skip
    rows = evaluate_rows(
        lm, tasks, task_manager=manager, num_fewshot=args.num_fewshot,
        limit=int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit,
        bootstrap_iters=args.bootstrap_iters, log_samples=args.log_samples, **seeds,
    )  # fmt: skip
    print(format_rows(rows, labels))
    if args.output_path:
        config = {
            "command": "kotara eval", "tasks": args.tasks, "resolved_tasks": tasks, "include_path": args.include_path,
            "num_fewshot": args.num_fewshot, "limit": args.limit, "batch_size": args.batch_size,
            "max_length": lm.max_length, "seed": args.seed, "bootstrap_iters": args.bootstrap_iters,
            "strategy": strategy, "temperatures": spec.temperatures, "weights": spec.weights, **own,
            "dtype": args.dtype, "devices": [str(d) for d in devices], "kernels": moc_kernels.get_backend(),
        }  # fmt: skip
        write_json_atomic(args.output_path, rows_json(rows, lm, labels, config, args.log_samples))
        print(f"results saved to {args.output_path}")
    return 0


def quiet_lm_eval(no_progress: bool) -> None:
    """lm-eval logs every task and request at INFO/WARNING; the table is what Kotara prints.

    tqdm reads TQDM_DISABLE when a bar is made, so setting it here silences lm-eval's bars too.
    """
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    if no_progress:
        os.environ["TQDM_DISABLE"] = "1"
