"""``kotara`` / ``python kotara.py``: perplexity of 2+ causal LMs alone and fused per token, and
text generated from the fused model.

    kotara [score] --model A --model B --dataset_path text.txt --strategy entropy ...   # DESIGN §5
    kotara generate --model A --model B --prompt TEXT --strategy poe --poe_beta 1.5 --poe_beta -0.5 ...
    kotara eval --model A --model B --strategy all --tasks hellaswag,my_tasks/ --limit 200 ...   # DESIGN §5b

The original command line (no subcommand) keeps working unchanged and means ``score``::

    python kotara.py --model_a A --model_b B --dataset_path text.txt --strategy entropy \\
        --temp_a 0.85 --temp_b 1.1 --dtype bfloat16 --max_length 2048 --stride 1024 --save_metrics out.json

User errors print one line and exit with code 2 (``--debug`` shows the traceback); nothing is
written unless the run finished. Under ``torchrun`` scoring shards the windows across ranks (gloo
on CPU, nccl on CUDA) and all-reduces the sums; rank 0 prints and writes. Generation runs in one
process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

import moc_kernels
from moc_kernels import BACKENDS, STRATEGIES

if TYPE_CHECKING:
    from kotara.evaluate import FusionSpec
    from kotara.loading import LoadedModel

PROG = "kotara"
# Per-token weights learnt from the past tokens (scoring only): the posterior and the fixed share.
SEQUENTIAL = ("mixture_bayes", "mixture_switch")
COMMANDS = ("score", "generate", "eval")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse would add the whole usage)
        raise SystemExit(_fail(message))


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _add_model_flags(p: argparse.ArgumentParser) -> None:
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


def _add_fusion_flags(p: argparse.ArgumentParser, strategy_help: str, default: str | None = "entropy") -> None:
    f = p.add_argument_group("fusion")
    f.add_argument("--strategy", default=default, help=strategy_help)
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
        help="fixed mixture weight per model, > 0 (normalised to sum 1); default 1/M",
    )
    f.add_argument(
        "--poe_beta",
        type=float,
        action="append",
        default=[],
        help="PoE exponent beta per model; default 1/M (the original's 0.5/0.5). Sum != 1 sharpens "
        "(> 1) or flattens (< 1) the normalised product; a negative beta subtracts that model "
        "(--poe_beta 1.5 --poe_beta -0.5: contrastive decoding); at least one must be > 0",
    )
    f.add_argument("--poe_beta_a", type=float, help="alias: PoE beta of model a")
    f.add_argument("--poe_beta_b", type=float, help="alias: PoE beta of model b")


def build_parser() -> argparse.ArgumentParser:
    """The ``score`` command's parser (also the original flat command line, without a subcommand)."""
    p = _Parser(
        prog=PROG,
        description="Exact perplexity of two or more causal LMs, each alone and fused per token at the logit level "
        "(rolling windows: every target scored exactly once). This is 'kotara score' (the default command); "
        "'kotara generate --help' generates text from the fused model.",
    )
    _add_model_flags(p)
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

    _add_fusion_flags(
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


def build_generate_parser() -> argparse.ArgumentParser:
    """The ``generate`` command's parser."""
    p = _Parser(
        prog=f"{PROG} generate",
        description="Generate text from the fused model of two or more causal LMs: each step, one forward of every "
        "model over the new token (a KV cache per model) and the fused next-token distribution of --strategy "
        "over the whole vocabulary. Greedy unless --do_sample.",
    )
    _add_model_flags(p)
    _add_fusion_flags(
        p,
        f"one of {', '.join(STRATEGIES)}; default entropy. Models whose tokenizers differ generate per word: "
        "mixture (default), mixture_bayes or mixture_switch (with --switch_rate)",
        default=None,
    )
    p.add_argument(
        "--switch_rate", type=float, default=0.01, help="mixture_switch per word: the fixed share alpha; default 0.01"
    )
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt; repeat for several")
    g.add_argument(
        "--prompts_file",
        help='prompts from a file: one per line, or with a .jsonl name one JSON string or {"prompt": ...} per line '
        "(prompts with newlines)",
    )
    g.add_argument(
        "--prefix_token",
        choices=["bos", "eos", "none"],
        default=None,
        help="token put before every prompt (default: BOS if the tokenizer has one, as in scoring)",
    )
    d = p.add_argument_group("decoding")
    d.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate per prompt at most (default 64)")
    d.add_argument(
        "--do_sample",
        action="store_true",
        help="sample from the fused distribution (default: greedy). Per word (different tokenizers): draw a model "
        "by the weights, then a whole word from it; greedy there asks each model for its greedy next word and "
        "keeps the one with the highest fused probability",
    )
    d.add_argument(
        "--sampling_temperature",
        type=float,
        default=1.0,
        help="decoding temperature applied to the fused q (q^(1/t), renormalised); with --do_sample; default 1",
    )
    d.add_argument(
        "--top_k", type=int, help="sample among the k most probable fused tokens (ties kept); with --do_sample"
    )
    d.add_argument(
        "--top_p",
        type=float,
        help="then among the fewest most probable tokens whose probability sums to >= p, 0 < p <= 1; with --do_sample",
    )
    d.add_argument("--seed", type=int, help="seed of the sampling draws (reproducible runs)")
    d.add_argument("--batch_size", type=int, default=8, help="prompts decoded together, left-padded (default 8)")
    d.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STRING",
        help="stop a completion when it contains STRING (cut before it); repeatable. EOS always stops a row",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "--save_outputs",
        metavar="OUT.jsonl",
        help="write one JSON line per prompt (prompt, completion, token_ids, weights, strategy, finish_reason)",
    )
    o.add_argument("--no_progress", action="store_true", help="no progress bar")
    o.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def _per_model(
    values: list[float],
    aliases: Sequence[float | None],
    count: int,
    default: float,
    flag: str,
    signed: bool = False,
) -> list[float]:
    """One value per model from a repeated flag (once = for all) and the _a/_b aliases.

    Values must be > 0, except ``signed`` ones (PoE betas: a negative beta subtracts a model, q stays
    normalised), which must be finite with at least one > 0.
    """
    if len(values) not in (0, 1, count):
        raise ValueError(f"--{flag} given {len(values)} times for {count} models; give it once or once per model")
    out = [values[0] if len(values) == 1 else (values[i] if values else default) for i in range(count)]
    for i, alias in enumerate(aliases):
        if alias is not None:
            out[i] = alias
    if signed:
        if not all(math.isfinite(x) for x in out) or not any(x > 0 for x in out):
            raise ValueError(f"--{flag} values must be finite with at least one > 0, got {out}")
        return out
    for x in out:
        if not x > 0 or not math.isfinite(x):
            raise ValueError(f"--{flag} values must be > 0, got {x}")
    return out


def _fusion_spec(args: argparse.Namespace, count: int, strategies: list[str]) -> FusionSpec:
    from kotara.evaluate import FusionSpec

    return FusionSpec(
        strategies=[s for s in strategies if s not in SEQUENTIAL],
        sequential=[s for s in strategies if s in SEQUENTIAL],
        switch_rate=getattr(args, "switch_rate", 0.01),
        temperatures=_per_model(args.temp, (args.temp_a, args.temp_b), count, 1.0, "temp"),
        weights=_per_model(args.weight, (), count, 1.0 / count, "weight"),
        poe_betas=_per_model(
            args.poe_beta, (args.poe_beta_a, args.poe_beta_b), count, 1.0 / count, "poe_beta", signed=True
        ),
    )


def _model_paths(args: argparse.Namespace) -> list[str]:
    paths = [p for p in (args.model_a, args.model_b) if p] + list(args.model)
    if len(paths) < 2:
        raise ValueError(
            f"fusion needs at least 2 models, got {len(paths)}; pass --model twice (or --model_a/--model_b)"
        )
    return paths


def _strategies(name: str) -> list[str]:
    if name == "all":
        return list(STRATEGIES) + list(SEQUENTIAL)
    if name not in STRATEGIES + SEQUENTIAL:
        raise ValueError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGIES + SEQUENTIAL)}, or all")
    return [name]


def _devices(names: list[str], count: int) -> list[str]:
    if not names:
        return ["cuda" if torch.cuda.is_available() else "cpu"] * count
    if len(names) == 1:
        return names * count
    if len(names) != count:
        raise ValueError(f"--device given {len(names)} times for {count} models; give it once or once per model")
    return names


def _check_output_dir(path: str | None, flag: str) -> None:
    if path:
        out_dir = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(out_dir):
            raise ValueError(f"{flag}: directory {out_dir!r} does not exist")


@contextlib.contextmanager
def _process_group(devices: list[torch.device]) -> Iterator[int]:
    """torchrun's process group for scoring (gloo on CPU, nccl on CUDA) for the block; yields the rank.

    NCCL communicates on the *current* CUDA device, so each rank makes its own current first
    (``cuda`` resolves to cuda:LOCAL_RANK in ``loading.resolve_device``); otherwise every rank would
    launch on GPU 0 with its tensors on another GPU. The group is left on every rank: after a
    barrier when the block ends normally (no rank tears down while another is still in it), at
    once on an error; a process that exits with a live gloo group can abort at interpreter exit
    (see ``model.distributed.process_group``, where that was measured).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield 0
        return
    if torch.distributed.is_initialized():  # someone else's group: theirs to leave
        yield torch.distributed.get_rank()
        return
    if devices[0].type == "cuda":
        torch.cuda.set_device(devices[0])
    torch.distributed.init_process_group(backend="nccl" if devices[0].type == "cuda" else "gloo")
    try:
        yield torch.distributed.get_rank()
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _resolve_models(args: argparse.Namespace) -> tuple[list[str], list[str], list[torch.device], list[torch.dtype]]:
    """Model paths, device names, devices and dtypes, checked before anything is loaded."""
    from kotara import loading

    paths = _model_paths(args)
    device_names = _devices(args.device, len(paths))
    devices = [loading.resolve_device(d) for d in device_names]
    dtypes = [loading.resolve_dtype(args.dtype, d) for d in devices]
    for i, path in enumerate(paths):
        loading.check_model_path(path, f"model {loading.model_label(i)}")
    return paths, device_names, devices, dtypes


def _load_tokenizer(args: argparse.Namespace, paths: list[str]) -> tuple[Any, str]:
    from transformers.utils import logging as hf_logging

    from kotara import loading

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars; Kotara shows its own
    tokenizer_path = args.tokenizer or paths[0]
    return loading.load_tokenizer(tokenizer_path, args.trust_remote_code), tokenizer_path


def _load_models(
    args: argparse.Namespace,
    paths: list[str],
    devices: list[torch.device],
    dtypes: list[torch.dtype],
    tokenizer: Any,
    tokenizer_path: str,
) -> list[LoadedModel]:
    """Every model, after checking (cheaply, first) that each one's own tokenizer is the shared one."""
    from kotara import loading

    for path in paths:
        if path != tokenizer_path:
            loading.check_same_tokenizer(tokenizer, path, args.trust_remote_code)
    models = [
        loading.load_model(path, loading.model_label(i), devices[i], dtypes[i], args.trust_remote_code)
        for i, path in enumerate(paths)
    ]
    loading.check_vocab(models, len(tokenizer))
    return models


def run(args: argparse.Namespace) -> int:
    """``kotara score``: every model alone and fused, over the whole dataset."""
    from kotara import loading
    from kotara.evaluate import evaluate
    from kotara.report import build_metrics, format_table, run_config, write_json_atomic
    from kotara.windows import check_window_args, rolling_windows

    # Everything that can be checked cheaply is checked before any model is loaded.
    check_window_args(args.max_length, args.stride)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.chunk_bytes < 1:
        raise ValueError(f"--chunk_bytes must be >= 1, got {args.chunk_bytes}")
    if args.fusion_unit != "token":  # models with different tokenizers fuse per word (kotara.word_score)
        from kotara import word_score

        tokenizers = word_score.own_tokenizers(_model_paths(args), args.trust_remote_code)
        if args.fusion_unit == "word" or word_score.tokenizers_differ(tokenizers):
            return word_score.run_word_score(args, tokenizers)
    args.strategy = args.strategy or "entropy"
    strategies = _strategies(args.strategy)
    paths, device_names, devices, dtypes = _resolve_models(args)
    spec = _fusion_spec(args, len(paths), strategies)
    loading.read_text_pieces(args.dataset_path, args.chunk_bytes)  # missing / non-UTF-8 / empty, before loading
    _check_output_dir(args.save_metrics, "--save_metrics")
    if args.kernels:
        moc_kernels.set_backend(args.kernels)

    with _process_group(devices) as rank:
        tokenizer, tokenizer_path = _load_tokenizer(args, paths)
        text = loading.tokenize_file(tokenizer, args.dataset_path, args.prefix_token, args.chunk_bytes)
        models = _load_models(args, paths, devices, dtypes, tokenizer, tokenizer_path)
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


def read_prompts_file(path: str) -> list[str]:
    """Prompts from ``path``: one per non-empty line, or (``.jsonl``) one JSON string or
    ``{"prompt": ...}`` object per line, for prompts that hold newlines."""
    if not os.path.isfile(path):
        raise ValueError(f"prompts file not found: {path!r}")
    try:
        with open(path, encoding="utf-8") as handle:
            lines = [line.rstrip("\r\n") for line in handle]
    except UnicodeDecodeError as err:
        raise ValueError(f"prompts file {path!r} is not valid UTF-8 (byte {err.start}: {err.reason})") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not path.endswith(".jsonl"):
            prompts.append(line)
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"prompts file {path!r} line {number}: not JSON ({err.msg})") from None
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str):
            raise ValueError(f'prompts file {path!r} line {number}: expected a string or {{"prompt": string}}')
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"prompts file {path!r} has no prompts")
    return prompts


def _check_decoding_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top_k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {args.top_p}")
    if not args.sampling_temperature > 0 or not math.isfinite(args.sampling_temperature):
        raise ValueError(f"--sampling_temperature must be > 0, got {args.sampling_temperature}")
    shaping = args.top_k is not None or args.top_p is not None or args.sampling_temperature != 1.0
    if shaping and not args.do_sample:
        raise ValueError("--top_k, --top_p and --sampling_temperature shape sampling: add --do_sample")
    if any(not s for s in args.stop):
        raise ValueError("--stop: a stop string must not be empty")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("generate runs in one process: run it without torchrun")


def run_generate(args: argparse.Namespace) -> int:
    """``kotara generate``: complete every prompt with the fused model."""
    from kotara.generate import generate
    from kotara.report import format_generation, show_generations

    _check_decoding_args(args)
    prompts = list(args.prompt) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise ValueError("no prompt: give --prompt TEXT (repeatable) or --prompts_file FILE")
    from kotara import word_score  # models with different tokenizers generate per word (kotara.word_generate)

    tokenizers = word_score.own_tokenizers(_model_paths(args), args.trust_remote_code)
    if word_score.tokenizers_differ(tokenizers):
        from kotara.word_generate import run_word_generate

        return run_word_generate(args, prompts, tokenizers)
    args.strategy = args.strategy or "entropy"
    if args.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {args.strategy!r}; expected one of {', '.join(STRATEGIES)}")
    paths, _, devices, dtypes = _resolve_models(args)
    spec = _fusion_spec(args, len(paths), [args.strategy])
    _check_output_dir(args.save_outputs, "--save_outputs")
    if args.kernels:
        moc_kernels.set_backend(args.kernels)
    tokenizer, tokenizer_path = _load_tokenizer(args, paths)
    models = _load_models(args, paths, devices, dtypes, tokenizer, tokenizer_path)
    generations = generate(
        models, tokenizer, prompts, args.strategy, args.max_new_tokens,
        temperatures=spec.temperatures, weights=spec.poe_betas if args.strategy == "poe" else spec.weights,
        do_sample=args.do_sample, sampling_temperature=args.sampling_temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, stop=args.stop, batch_size=args.batch_size,
        prefix_token=args.prefix_token, progress=not args.no_progress,
    )  # fmt: skip
    show_generations(generations, format_generation, [m.name for m in models], args.save_outputs)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kotara`` and ``python kotara.py``; returns the exit code.

    ``kotara generate ...`` generates; ``kotara eval ...`` runs lm-eval tasks; ``kotara score ...`` or
    no subcommand (the original flat command line) scores.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "score"
    if argv and argv[0] in COMMANDS:
        argv = argv[1:]
    from kotara.eval_cli import build_eval_parser, run_eval  # it builds on this module's helpers

    parser, runner = {
        "generate": (build_generate_parser, run_generate),
        "eval": (build_eval_parser, run_eval),
    }.get(command, (build_parser, run))
    parser = parser()
    args = parser.parse_args(argv)
    try:
        return runner(args)
    except (ValueError, NotImplementedError) as err:
        if args.debug:
            raise
        return _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
