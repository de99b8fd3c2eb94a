"""``kotara generate``: complete prompts with the fused model.

Parse (``build_parser``) -> resolve (``kotara.cli.options``) -> generate with the library
(``kotara.generate.generate`` per token; ``kotara.word_generate.generate_words`` per word, when the
models' tokenizers differ) -> report (``kotara.report.show_generations``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence

import moc_kernels
from kotara.cli import options
from kotara.cli.options import PROG
from moc_kernels import STRATEGIES


def build_parser() -> argparse.ArgumentParser:
    """The ``generate`` command's parser."""
    p = options.Parser(
        prog=f"{PROG} generate",
        description="Generate text from the fused model of two or more causal LMs: each step, one forward of every "
        "model over the new token (a KV cache per model) and the fused next-token distribution of --strategy "
        "over the whole vocabulary. Greedy unless --do_sample.",
    )
    options.add_model_flags(p)
    options.add_fusion_flags(
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


def check_decoding_args(args: argparse.Namespace) -> None:
    """The decoding flags' ranges and combinations, before anything is loaded."""
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
    if args.seed is not None and not -(2**63) <= args.seed < 2**64:  # what torch.Generator.manual_seed takes
        raise ValueError(f"--seed must be in [-2**63, 2**64), got {args.seed}")
    if any(not s for s in args.stop):
        raise ValueError("--stop: a stop string must not be empty")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("generate runs in one process: run it without torchrun")


def run(args: argparse.Namespace) -> int:
    """``kotara generate``: complete every prompt with the fused model."""
    from kotara.generate import generate
    from kotara.report import format_generation, show_generations

    check_decoding_args(args)
    options.check_switch_rate(args)
    prompts = list(args.prompt) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise ValueError("no prompt: give --prompt TEXT (repeatable) or --prompts_file FILE")
    from kotara import word_score  # models with different tokenizers generate per word (kotara.word_generate)

    tokenizers = word_score.own_tokenizers(options.model_paths(args), args.trust_remote_code)
    if word_score.tokenizers_differ(tokenizers):
        return run_words(args, prompts, tokenizers)
    args.strategy = args.strategy or "entropy"
    if args.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {args.strategy!r}; expected one of {', '.join(STRATEGIES)}")
    paths, _, devices, dtypes = options.resolve_models(args)
    spec = options.fusion_spec(args, len(paths), [args.strategy])
    options.check_output_file(args.save_outputs, "--save_outputs")
    if args.kernels:
        moc_kernels.set_backend(args.kernels)
    tokenizer, tokenizer_path = options.load_tokenizer(args, paths)
    models = options.load_models(args, paths, devices, dtypes, tokenizer, tokenizer_path)
    generations = generate(
        models, tokenizer, prompts, args.strategy, args.max_new_tokens,
        temperatures=spec.temperatures, weights=spec.poe_betas if args.strategy == "poe" else spec.weights,
        do_sample=args.do_sample, sampling_temperature=args.sampling_temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, stop=args.stop, batch_size=args.batch_size,
        prefix_token=args.prefix_token, progress=not args.no_progress,
    )  # fmt: skip
    show_generations(generations, format_generation, [m.name for m in models], args.save_outputs)
    return 0


def run_words(args: argparse.Namespace, prompts: Sequence[str], tokenizers: list) -> int:
    """``kotara generate`` fused per word: checks, load, generate every prompt, print and save."""
    import torch

    from kotara import loading
    from kotara.report import show_generations
    from kotara.word_generate import HFWordLM, format_word_generation, generate_words

    strategy = args.strategy or "mixture"
    if strategy == "all" or len(options.word_strategies(strategy)) != 1:
        raise ValueError("generate takes one strategy: mixture, mixture_bayes or mixture_switch")
    if args.top_k is not None or args.top_p is not None or args.sampling_temperature != 1.0:
        raise ValueError("--top_k, --top_p and --sampling_temperature reshape one vocabulary's distribution; "
                         "fused per word they do not apply")  # fmt: skip
    options.check_switch_rate(args)
    paths, _, devices, dtypes = options.resolve_models(args)
    spec = options.fusion_spec(args, len(paths), [strategy])
    options.check_output_file(args.save_outputs, "--save_outputs")
    resolved = options.resolve_tokenizers(args, paths, tokenizers)
    lms = []
    for i, (path, tok) in enumerate(zip(paths, resolved)):
        model = loading.load_model(path, loading.model_label(i), devices[i], dtypes[i], args.trust_remote_code)
        _, prefix_id = loading.resolve_prefix(tok, args.prefix_token)
        if prefix_id is None:
            raise ValueError(
                f"model {model.name} ({path!r}): fusion per word needs a prefix token; pass --prefix_token eos"
            )
        lms.append(HFWordLM(model, tok, prefix_id, spec.temperatures[i]))
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    generations = [
        generate_words(lms, prompt, strategy, spec.weights, args.max_new_tokens, args.do_sample, args.switch_rate,
                       generator, args.stop)
        for prompt in prompts
    ]  # fmt: skip
    show_generations(generations, format_word_generation, [lm.name for lm in lms], args.save_outputs)
    return 0
