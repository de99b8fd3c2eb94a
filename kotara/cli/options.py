"""The flags every subcommand shares, and what they resolve to before anything is loaded.

``score``, ``generate`` and ``eval`` build their parsers from ``add_model_flags`` and
``add_fusion_flags`` and turn the parsed flags into what a run needs: the model paths, devices and
dtypes (``resolve_models``), the ``FusionSpec`` (``fusion_spec``), the strategies, the tokenizers
(shared, or each model's own per word), the models, the process group of a ``torchrun`` run, and
the check that an output file can be written. Every user error is a ``ValueError`` with one line
that names the bad value (``kotara.cli.main`` prints it and exits with code 2).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from kotara import loading, words
from kotara.loading import LoadedModel
from kotara.steps import FusionSpec
from moc_kernels import BACKENDS, STRATEGIES

PROG = "kotara"
# Per-token weights learnt from the past tokens (scoring only): the posterior and the fixed share.
SEQUENTIAL = ("mixture_bayes", "mixture_switch")
# Strategies that combine logits token by token: no meaning across tokenizers (fusion per word).
LOGIT_ONLY = ("average", "poe", "entropy", "gap", "mixture_entropy", "mixture_gap")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error and exit code 2 (argparse would add the whole usage)."""

    def error(self, message: str) -> None:
        raise SystemExit(fail(message))


def fail(message: str) -> int:
    """Print ``kotara: error: message`` on stderr; the exit code of a user error (2)."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------------------ flags


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--model (and its _a/_b aliases), --tokenizer, --trust_remote_code, --device, --dtype, --kernels."""
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


def add_fusion_flags(p: argparse.ArgumentParser, strategy_help: str, default: str | None = "entropy") -> None:
    """--strategy, and per model --temp, --weight, --poe_beta (with the original's _a/_b aliases)."""
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


# ------------------------------------------------------------------------------------------ fusion


def per_model(
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


def fusion_spec(args: argparse.Namespace, count: int, strategies: list[str]) -> FusionSpec:
    """The ``FusionSpec`` of ``count`` models from the fusion flags (the kernel's strategies, the sequential ones)."""
    return FusionSpec(
        strategies=[s for s in strategies if s not in SEQUENTIAL],
        sequential=[s for s in strategies if s in SEQUENTIAL],
        switch_rate=getattr(args, "switch_rate", 0.01),
        temperatures=per_model(args.temp, (args.temp_a, args.temp_b), count, 1.0, "temp"),
        weights=per_model(args.weight, (), count, 1.0 / count, "weight"),
        poe_betas=per_model(
            args.poe_beta, (args.poe_beta_a, args.poe_beta_b), count, 1.0 / count, "poe_beta", signed=True
        ),
    )


def strategies(name: str) -> list[str]:
    """The per-token strategies ``--strategy`` names: one, or with ``all`` every one."""
    if name == "all":
        return list(STRATEGIES) + list(SEQUENTIAL)
    if name not in STRATEGIES + SEQUENTIAL:
        raise ValueError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGIES + SEQUENTIAL)}, or all")
    return [name]


def word_strategies(name: str | None) -> list[str]:
    """The word-level strategies ``--strategy`` asks for (default and 'all': the three)."""
    if name in (None, "all"):
        return list(words.WORD_STRATEGIES)
    if name in words.WORD_STRATEGIES:
        return [name]
    if name in LOGIT_ONLY:
        raise ValueError(
            f"--strategy {name} combines the models' logits token by token, which needs one shared vocabulary; "
            f"fused per word use {', '.join(words.WORD_STRATEGIES)} or all"
        )
    raise ValueError(f"unknown strategy {name!r}; fused per word: {', '.join(words.WORD_STRATEGIES)}, or all")


# ------------------------------------------------------------------------------------------ models and devices


def model_paths(args: argparse.Namespace) -> list[str]:
    """The models in order: --model_a, --model_b, then every --model; at least two."""
    paths = [p for p in (args.model_a, args.model_b) if p] + list(args.model)
    if len(paths) < 2:
        raise ValueError(
            f"fusion needs at least 2 models, got {len(paths)}; pass --model twice (or --model_a/--model_b)"
        )
    return paths


def per_model_devices(names: list[str], count: int) -> list[str]:
    """One device name per model from --device (none: cuda if available, else cpu; once: for all)."""
    if not names:
        return ["cuda" if torch.cuda.is_available() else "cpu"] * count
    if len(names) == 1:
        return names * count
    if len(names) != count:
        raise ValueError(f"--device given {len(names)} times for {count} models; give it once or once per model")
    return names


def resolve_models(args: argparse.Namespace) -> tuple[list[str], list[str], list[torch.device], list[torch.dtype]]:
    """Model paths, device names, devices and dtypes, checked before anything is loaded."""
    paths = model_paths(args)
    device_names = per_model_devices(args.device, len(paths))
    resolved = [loading.resolve_device(d) for d in device_names]
    dtypes = [loading.resolve_dtype(args.dtype, d) for d in resolved]
    for i, path in enumerate(paths):
        loading.check_model_path(path, f"model {loading.model_label(i)}")
    return paths, device_names, resolved, dtypes


def check_output_file(path: str | None, flag: str) -> None:
    """``flag``'s file can be written, checked before any model is loaded: not a directory, in a
    directory that exists and takes a new file (a temporary one is created there and removed)."""
    if not path:
        return
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a directory; give a file name")
    out_dir = os.path.dirname(os.path.abspath(path))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{flag} {path!r}: {out_dir!r} is a file, not a directory")
    if not os.path.isdir(out_dir):
        raise ValueError(f"{flag}: directory {out_dir!r} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=".kotara-probe-", dir=out_dir)
    except OSError as err:
        raise ValueError(f"{flag} {path!r}: cannot write into {out_dir!r} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def process_group(devices: list[torch.device]) -> Iterator[int]:
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


# ------------------------------------------------------------------------------------------ tokenizers and models


def quiet_transformers() -> None:
    """transformers' warnings and per-file "Loading weights" bars off: Kotara shows its own."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(args: argparse.Namespace, paths: list[str]) -> tuple[Any, str]:
    """The shared tokenizer (--tokenizer, default the first model's) and its path."""
    quiet_transformers()
    tokenizer_path = args.tokenizer or paths[0]
    return loading.load_tokenizer(tokenizer_path, args.trust_remote_code), tokenizer_path


def load_models(
    args: argparse.Namespace,
    paths: list[str],
    devices: list[torch.device],
    dtypes: list[torch.dtype],
    tokenizer: Any,
    tokenizer_path: str,
) -> list[LoadedModel]:
    """Every model, after checking (cheaply, first) that each one's own tokenizer is the shared one."""
    for path in paths:
        if path != tokenizer_path:
            loading.check_same_tokenizer(tokenizer, path, args.trust_remote_code)
    models = [
        loading.load_model(path, loading.model_label(i), devices[i], dtypes[i], args.trust_remote_code)
        for i, path in enumerate(paths)
    ]
    loading.check_vocab(models, len(tokenizer))
    return models


def check_positions(models: Sequence[LoadedModel], num_tokens: int, max_length: int) -> None:
    """Every model has a position for each input token of the longest window of a text of ``num_tokens``
    tokens (prefix included): min(max_length, num_tokens - 1) of them. Checked after loading (the limit is
    in each model's config), before the first forward; a model without a stated limit is not checked."""
    longest = min(max_length, num_tokens - 1)
    for model in models:
        limit = getattr(model.module.config, "max_position_embeddings", None)
        if isinstance(limit, int) and longest > limit:
            raise ValueError(
                f"--max_length {max_length}: windows of {longest} tokens, but model {model.name} ({model.path!r}) "
                f"has {limit} positions; pass --max_length {limit} or less"
            )


def resolve_tokenizers(args: Any, paths: Sequence[str], own: list[Any | None]) -> list[Any]:
    """Fused per word: each model's own tokenizer, or --tokenizer for a model directory without one."""
    from kotara.word_score import tokenizers_differ

    if args.tokenizer and tokenizers_differ(own):
        raise ValueError(
            "--tokenizer names one shared tokenizer, but the models' own tokenizers differ: drop it "
            "(fused per word, each model reads the text with its own)"
        )
    shared = loading.load_tokenizer(args.tokenizer, args.trust_remote_code) if args.tokenizer else None
    out = []
    for i, (path, tok) in enumerate(zip(paths, own)):
        if tok is None and shared is None:
            raise ValueError(f"model {loading.model_label(i)} ({path!r}) has no tokenizer; pass --tokenizer")
        out.append(tok if tok is not None else shared)
    return out


def check_switch_rate(args: argparse.Namespace) -> None:
    """mixture_switch's share alpha is a probability."""
    if not 0.0 <= args.switch_rate <= 1.0:
        raise ValueError(f"--switch_rate must be in [0, 1], got {args.switch_rate}")
