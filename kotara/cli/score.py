"""``kotara score`` (and the original flat command line): every model alone and fused, over a text.

Parse (``build_parser``) -> resolve (``kotara.cli.options``) -> score with the library
(``kotara.evaluate.evaluate`` per token; ``kotara.word_score.score_words`` per word, when the
models' tokenizers differ or with ``--fusion_unit word``) -> report (``kotara.report``).
"""

from __future__ import annotations

import argparse

import moc_kernels
from kotara.cli import options
from kotara.cli.options import PROG, SEQUENTIAL
from moc_kernels import STRATEGIES


def build_parser() -> argparse.ArgumentParser:
    """The ``score`` command's parser (also the original flat command line, without a subcommand)."""
    p = options.Parser(
        prog=PROG,
        description="Exact perplexity of two or more causal LMs, each alone and fused per token at the logit level "
        "(rolling windows: every target scored exactly once). This is 'kotara score' (the default command); "
        "'kotara generate --help' generates text from the fused model.",
    )
    options.add_model_flags(p)
    d = p.add_argument_group("data and windows")
    d.add_argument("--dataset_path", required=True, help="UTF-8 text file to evaluate")
    d.add_argument("--max_length", type=int, default=1024, help="tokens of context per forward (default 1024)")
    d.add_argument(
        "--stride",
        type=int,
        default=1024,
        help="targets scored per window, 1 <= stride <= max_length; smaller = more context per "
        "target, more forwards (default 1024)",
    )
    d.add_argument("--batch_size", type=int, default=1, help="windows per forward (default 1)")
    d.add_argument(
        "--prefix_token",
        choices=["bos", "eos", "none"],
        default=None,
        help="token prepended to the text as context, never scored (default: BOS if the tokenizer has one)",
    )
    d.add_argument(
        "--chunk_bytes",
        type=int,
        default=1 << 20,
        help="tokenize the file in pieces of about this many characters, cut at line ends",
    )

    options.add_fusion_flags(
        p,
        f"per token (one shared vocabulary): one of {', '.join(STRATEGIES + SEQUENTIAL)}, or 'all' (every one from "
        "the same forwards; mixture_bayes: weights = the posterior given the past tokens, mixture_switch: its fixed "
        "share with --switch_rate); default entropy. Per word (--fusion_unit word, and models whose tokenizers "
        "differ): mixture, mixture_bayes, mixture_switch or all (default)",
        default=None,
    )
    w = p.add_argument_group("fusion across tokenizers (DESIGN §5c)")
    w.add_argument(
        "--fusion_unit",
        choices=["token", "word"],
        default=None,
        help="token: fuse the logits per token (needs one vocabulary); word: the closed-word mixture, each model "
        "with its own tokenizer, bits/byte only. Default: token when the models' tokenizers agree, word when "
        "they differ (then --tokenizer is an error)",
    )
    w.add_argument(
        "--switch_rate",
        type=float,
        default=0.01,
        help="mixture_switch: the share alpha of weight moved back to 1/M after every word (per token: every "
        "token) (fixed share); default 0.01",
    )

    o = p.add_argument_group("output")
    o.add_argument("--save_metrics", help="write the metrics JSON here (atomically, at the end)")
    o.add_argument("--no_progress", action="store_true", help="no progress bar")
    o.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def run(args: argparse.Namespace) -> int:
    """``kotara score``: every model alone and fused, over the whole dataset."""
    from kotara import loading
    from kotara.evaluate import evaluate
    from kotara.report import build_metrics, format_table, run_config, write_json_atomic
    from kotara.windows import check_window_args, rolling_windows

    # Everything that can be checked cheaply is checked before any model is loaded.
    check_window_args(args.max_length, args.stride)
    options.check_switch_rate(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.chunk_bytes < 1:
        raise ValueError(f"--chunk_bytes must be >= 1, got {args.chunk_bytes}")
    if args.fusion_unit != "token":  # models with different tokenizers fuse per word (kotara.word_score)
        from kotara import word_score

        tokenizers = word_score.own_tokenizers(options.model_paths(args), args.trust_remote_code)
        if args.fusion_unit == "word" or word_score.tokenizers_differ(tokenizers):
            return run_words(args, tokenizers)
    args.strategy = args.strategy or "entropy"
    strategies = options.strategies(args.strategy)
    paths, device_names, devices, dtypes = options.resolve_models(args)
    spec = options.fusion_spec(args, len(paths), strategies)
    loading.read_text_pieces(args.dataset_path, args.chunk_bytes)  # missing / non-UTF-8 / empty, before loading
    options.check_output_file(args.save_metrics, "--save_metrics")
    if args.kernels:
        moc_kernels.set_backend(args.kernels)

    with options.process_group(devices) as rank:
        tokenizer, tokenizer_path = options.load_tokenizer(args, paths)
        text = loading.tokenize_file(tokenizer, args.dataset_path, args.prefix_token, args.chunk_bytes)
        models = options.load_models(args, paths, devices, dtypes, tokenizer, tokenizer_path)
        options.check_positions(models, len(text.token_ids), args.max_length)
        vocab_size = len(tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        windows = rolling_windows(len(text.token_ids), args.max_length, args.stride)
        result = evaluate(
            models, text.token_ids, text.num_bytes, windows, spec,
            batch_size=args.batch_size, vocab_size=vocab_size, pad_id=pad_id, progress=not args.no_progress,
        )  # fmt: skip
        if rank == 0:
            print(format_table(result, spec, paths))
            if args.save_metrics:
                config = run_config(
                    args, paths, models, device_names, devices, dtypes, tokenizer=tokenizer_path,
                    vocab_size=vocab_size, windows=len(windows), world_size=result.world_size,
                    protocol="rolling windows, each target scored once (DESIGN §5)",
                )  # fmt: skip
                metrics = build_metrics(result, spec, args.strategy, paths, config, text.prefix, text.prefix_id)
                write_json_atomic(args.save_metrics, metrics)
                print(f"metrics saved to {args.save_metrics}")
    return 0


def run_words(args: argparse.Namespace, tokenizers: list) -> int:
    """``kotara score`` fused per word: every check, then load, score, print and save."""
    from kotara import loading, words
    from kotara.report import build_word_metrics, run_config, write_json_atomic
    from kotara.word_score import format_word_table, prepare_input, score_words

    strategies = options.word_strategies(args.strategy)
    options.check_switch_rate(args)
    paths, device_names, devices, dtypes = options.resolve_models(args)
    spec = options.fusion_spec(args, len(paths), strategies)
    pieces = loading.read_text_pieces(args.dataset_path, args.chunk_bytes)
    options.check_output_file(args.save_metrics, "--save_metrics")
    if args.kernels:
        moc_kernels.set_backend(args.kernels)
    resolved = options.resolve_tokenizers(args, paths, tokenizers)
    text = "".join(pieces)
    bounds = words.boundaries(text)
    with options.process_group(devices) as rank:
        items = []
        for i, (path, tok) in enumerate(zip(paths, resolved)):
            model = loading.load_model(path, loading.model_label(i), devices[i], dtypes[i], args.trust_remote_code)
            items.append(prepare_input(model, tok, pieces, args.prefix_token, bounds))
            options.check_positions([model], items[-1].token_ids.numel(), args.max_length)
        result = score_words(
            items, len(text.encode("utf-8")), len(bounds) + 1, strategies, spec.temperatures, spec.weights,
            args.max_length, args.stride, args.switch_rate, args.batch_size, progress=not args.no_progress,
        )  # fmt: skip
        if rank == 0:
            print(format_word_table(result, spec.temperatures, paths))
            if args.save_metrics:
                config = run_config(
                    args, paths, [item.model for item in items], device_names, devices, dtypes, tokenizer=None,
                    vocab_size=[item.vocab_size for item in items], windows=None, world_size=result.world_size,
                    protocol="each model's own rolling windows (DESIGN §5), fused per closed word (DESIGN §5c)",
                )  # fmt: skip
                write_json_atomic(args.save_metrics, build_word_metrics(result, args, spec, paths, items, config))
                print(f"metrics saved to {args.save_metrics}")
    return 0
