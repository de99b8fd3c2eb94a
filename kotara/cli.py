"""``kotara`` / ``python kotara.py``: perplexity of 2+ causal LMs, alone and fused per token.

The original command line keeps working unchanged::

    python kotara.py --model_a A --model_b B --dataset_path text.txt --strategy entropy \\
        --temp_a 0.85 --temp_b 1.1 --dtype bfloat16 --max_length 2048 --stride 1024 --save_metrics out.json

User errors print one line and exit with code 2 (``--debug`` shows the traceback); nothing is
written unless the evaluation finished. Under ``torchrun`` the windows are sharded across ranks
(gloo on CPU, nccl on CUDA) and the sums all-reduced; rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from moc_kernels import BACKENDS, STRATEGIES

PROG = "kotara"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse would add the whole usage)
        raise SystemExit(_fail(message))


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Exact perplexity of two or more causal LMs, each alone and fused per token at the logit level "
        "(rolling windows: every target scored exactly once).",
    )
    g = p.add_argument_group("models")
    g.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="PATH",
        help="a model: local HF directory or cached hub id; repeat for M >= 2 models (order = a, b, c, ...)",
    )
    g.add_argument("--model_a", help="alias: first model (the original tool's flag)")
    g.add_argument("--model_b", help="alias: second model (the original tool's flag)")
    g.add_argument("--tokenizer", help="shared tokenizer (default: the first model's); must be the models' vocabulary")
    g.add_argument("--trust_remote_code", action="store_true", help="allow custom model code from the model dirs")
    g.add_argument(
        "--device",
        action="append",
        default=[],
        help="cpu, cuda or cuda:N; once for all models or once per model in --model order "
        "(default: cuda if available, else cpu)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="weights/compute dtype (auto: bf16 on GPUs that support it, fp16 on others, fp32 on CPU); "
        "log-softmax and all sums are fp32/fp64 whatever this is",
    )
    g.add_argument(
        "--kernels",
        default=None,
        choices=list(BACKENDS),
        help="moc_kernels backend for the fusion (default: $MOC_KERNELS or auto = Triton on CUDA)",
    )

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

    f = p.add_argument_group("fusion")
    f.add_argument(
        "--strategy",
        default="entropy",
        help=f"one of {', '.join(STRATEGIES)}, or 'all' (every one from the same forwards); default entropy",
    )
    f.add_argument(
        "--temp",
        type=float,
        action="append",
        default=[],
        help="temperature per model (repeat in model order, or once for all); default 1",
    )
    f.add_argument("--temp_a", type=float, help="alias: temperature of model a")
    f.add_argument("--temp_b", type=float, help="alias: temperature of model b")
    f.add_argument(
        "--weight",
        type=float,
        action="append",
        default=[],
        help="fixed mixture weight per model (normalised to sum 1); default 1/M",
    )
    f.add_argument(
        "--poe_beta",
        type=float,
        action="append",
        default=[],
        help="PoE exponent beta per model; default 1/M (the original's 0.5/0.5). Sum != 1 sharpens "
        "(> 1) or flattens (< 1) the normalised product",
    )
    f.add_argument("--poe_beta_a", type=float, help="alias: PoE beta of model a")
    f.add_argument("--poe_beta_b", type=float, help="alias: PoE beta of model b")

    o = p.add_argument_group("output")
    o.add_argument("--save_metrics", help="write the metrics JSON here (atomically, at the end)")
    o.add_argument("--no_progress", action="store_true", help="no progress bar")
    o.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def _per_model(
    values: list[float], aliases: Sequence[float | None], count: int, default: float, flag: str
) -> list[float]:
    """One value per model from a repeated flag (once = for all) and the _a/_b aliases."""
    if len(values) not in (0, 1, count):
        raise ValueError(f"--{flag} given {len(values)} times for {count} models; give it once or once per model")
    out = [values[0] if len(values) == 1 else (values[i] if values else default) for i in range(count)]
    for i, alias in enumerate(aliases):
        if alias is not None:
            out[i] = alias
    for x in out:
        if not x > 0:
            raise ValueError(f"--{flag} values must be > 0, got {x}")
    return out


def _model_paths(args: argparse.Namespace) -> list[str]:
    paths = [p for p in (args.model_a, args.model_b) if p] + list(args.model)
    if len(paths) < 2:
        raise ValueError(
            f"fusion needs at least 2 models, got {len(paths)}; pass --model twice (or --model_a/--model_b)"
        )
    return paths


def _strategies(name: str) -> list[str]:
    if name == "all":
        return list(STRATEGIES)
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}, or all")
    return [name]


def _devices(names: list[str], count: int) -> list[str]:
    if not names:
        return ["cuda" if torch.cuda.is_available() else "cpu"] * count
    if len(names) == 1:
        return names * count
    if len(names) != count:
        raise ValueError(f"--device given {len(names)} times for {count} models; give it once or once per model")
    return names


def run(args: argparse.Namespace) -> int:
    from kotara import loading
    from kotara.evaluate import FusionSpec, evaluate
    from kotara.report import build_metrics, format_table, write_json_atomic
    from kotara.windows import check_window_args, rolling_windows

    # Everything that can be checked cheaply is checked before any model is loaded.
    paths = _model_paths(args)
    count = len(paths)
    strategies = _strategies(args.strategy)
    check_window_args(args.max_length, args.stride)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.chunk_bytes < 1:
        raise ValueError(f"--chunk_bytes must be >= 1, got {args.chunk_bytes}")
    spec = FusionSpec(
        strategies=strategies,
        temperatures=_per_model(args.temp, (args.temp_a, args.temp_b), count, 1.0, "temp"),
        weights=_per_model(args.weight, (), count, 1.0 / count, "weight"),
        poe_betas=_per_model(args.poe_beta, (args.poe_beta_a, args.poe_beta_b), count, 1.0 / count, "poe_beta"),
    )
    loading.read_text_pieces(args.dataset_path, args.chunk_bytes)  # missing / non-UTF-8 / empty, before loading
    if args.save_metrics:
        out_dir = os.path.dirname(os.path.abspath(args.save_metrics))
        if not os.path.isdir(out_dir):
            raise ValueError(f"--save_metrics: directory {out_dir!r} does not exist")
    device_names = _devices(args.device, count)
    devices = [loading.resolve_device(d) for d in device_names]
    dtypes = [loading.resolve_dtype(args.dtype, d) for d in devices]
    for i, path in enumerate(paths):
        loading.check_model_path(path, f"model {loading.model_label(i)}")
    import moc_kernels

    if args.kernels:
        moc_kernels.set_backend(args.kernels)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if devices[0].type == "cuda" else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # per-file "Loading weights" bars; Kotara shows its own
        tokenizer_path = args.tokenizer or paths[0]
        tokenizer = loading.load_tokenizer(tokenizer_path, args.trust_remote_code)
        text = loading.tokenize_file(tokenizer, args.dataset_path, args.prefix_token, args.chunk_bytes)
        for path in paths:  # before any model is loaded: a vocabulary mismatch is cheap to find
            if path != tokenizer_path:
                loading.check_same_tokenizer(tokenizer, path, args.trust_remote_code)
        models = []
        for i, path in enumerate(paths):
            models.append(
                loading.load_model(path, loading.model_label(i), devices[i], dtypes[i], args.trust_remote_code)
            )
        vocab_size = len(tokenizer)
        loading.check_vocab(models, vocab_size)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        windows = rolling_windows(len(text.token_ids), args.max_length, args.stride)
        result = evaluate(
            models, text.token_ids, text.num_bytes, windows, spec,
            batch_size=args.batch_size, vocab_size=vocab_size, pad_id=pad_id, progress=not args.no_progress,
        )  # fmt: skip
        if rank == 0:
            print(format_table(result, spec, paths))
            if args.save_metrics:
                config = {
                    "models": paths,
                    "model_a": paths[0],
                    "model_b": paths[1],
                    "tokenizer": tokenizer_path,
                    "vocab_size": vocab_size,
                    "logit_columns": [m.logit_columns for m in models],
                    "dataset_path": args.dataset_path,
                    "max_length": args.max_length,
                    "stride": args.stride,
                    "batch_size": args.batch_size,
                    "chunk_bytes": args.chunk_bytes,
                    "windows": len(windows),
                    "dtype": args.dtype,
                    "dtypes": [str(d).removeprefix("torch.") for d in dtypes],
                    "device": device_names[0],
                    "devices": [str(d) for d in devices],
                    "kernels": moc_kernels.get_backend(),
                    "kernels_ran": moc_kernels.backend.resolve(devices[0]),
                    "trust_remote_code": args.trust_remote_code,
                    "world_size": result.world_size,
                    "protocol": "rolling windows, each target scored once (DESIGN §5)",
                }
                metrics = build_metrics(result, spec, args.strategy, paths, config, text.prefix, text.prefix_id)
                write_json_atomic(args.save_metrics, metrics)
                print(f"metrics saved to {args.save_metrics}")
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kotara`` and ``python kotara.py``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, NotImplementedError) as err:
        if args.debug:
            raise
        return _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
