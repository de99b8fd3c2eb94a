"""Timings of the whole MoC layer, a training step, and Kotara's fusion step and evaluation.

- ``test_moc_layer``: the model's ``CollaborativeExpertsModule`` forward+backward as reference,
  ``torch.compile`` and Triton.
- ``test_moe_layer``: the same for the top-k MoE baseline (``TopKMoEModule``, ``ffn: moe``) at the
  same E, k and F: its k routed experts per token (``routed_swiglu``) against MoC's E.
- ``test_moc_sparse_layer``: the sparse MoC layer (``ffn: moc_sparse``, DESIGN §2c, token router) at
  the same E, k and F: MoC's collaboration over only the k routed experts (``routed_swiglu``).
- ``test_moc_layer_vs_loop``: the functional layer of ``benchmarks.moc_layer`` with the vectorised
  ``expert_swiglu`` reference vs a ``for e in range(E)`` loop over experts (same code otherwise).
- ``test_training_step``: forward, backward and AdamW step of the CPU default's LunarisLM
  (``configs/tiny.yaml``; GPT-2-small-sized on CUDA), also with the per-expert loop (tokens/s).
- ``test_kotara_fusion_step``: what ``kotara.evaluate`` does per batch after the forwards
  (``token_stats`` and every strategy of ``fused_logit_nll_multi``).
- ``test_kotara_evaluation``: ``kotara.evaluate`` end to end with two random GPT-2 models.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import yaml

import moc_kernels
from benchmarks.impls import IMPLS, compiled, require_triton
from benchmarks.moc_layer import (
    build_moc_module,
    build_moe_module,
    init_params,
    moc_layer,
    model_config,
    per_expert_loop_swiglu,
)
from benchmarks.shapes import BenchShape
from benchmarks.timing import forward_backward, measure


def _backend(impl: str) -> str:
    return "triton" if impl == "triton" else "reference"


@pytest.mark.parametrize("impl", IMPLS)
def test_moc_layer(benchmark, device, shape, impl):
    """Forward + backward (out and the aux losses) of the model's MoC layer."""
    _time_expert_layer(benchmark, device, shape, impl, build_moc_module(shape, device), "moc_layer")


@pytest.mark.parametrize("impl", IMPLS)
def test_moe_layer(benchmark, device, shape, impl):
    """Forward + backward (out and the balance loss) of the model's top-k MoE layer, MoC's E, k and F."""
    _time_expert_layer(benchmark, device, shape, impl, build_moe_module(shape, device), "moe_layer")


@pytest.mark.parametrize("impl", IMPLS)
def test_moc_sparse_layer(benchmark, device, shape, impl):
    """Forward + backward (out and the aux losses) of the sparse MoC layer (token router), MoC's E, k and F."""
    from benchmarks.moc_layer import _random_weights
    from model.moc import SparseCollaborativeExpertsModule

    config = model_config(shape, ffn="moc_sparse", router_context=False)
    module = _random_weights(SparseCollaborativeExpertsModule(config), shape, device)
    _time_expert_layer(benchmark, device, shape, impl, module, "moc_sparse_layer")


def _time_expert_layer(benchmark, device, shape, impl: str, module: torch.nn.Module, op: str) -> None:
    """Time forward + backward of an expert layer returning MoCOutput (MoC or MoE) as ``op``."""
    if impl == "triton":
        require_triton(device)
    forward = compiled(module) if impl == "compile" else module
    backend = _backend(impl)

    def layer(x):
        with moc_kernels.use_backend(backend):
            result = forward(x)
        return result.out, result.balance_loss + result.diversity_loss

    def step(x, grads):
        out, aux = layer(x)
        wrt = [x, *module.parameters()]
        return torch.autograd.grad([out, aux], wrt, [grads, torch.ones_like(aux)])

    sets = []
    for _ in range(3 if device.type == "cuda" else 2):
        x = torch.randn(1, shape.tokens, shape.dim, device=device, dtype=shape.dtype, requires_grad=True)
        sets.append((x, torch.randn_like(x)))
    measure(benchmark, step, sets, device, shape.tokens, op=op, impl=impl, pass_="fwd+bwd", shape=shape.describe())
    benchmark.group = f"{op} fwd+bwd"


@pytest.mark.parametrize("impl", ["reference", "loop"])
def test_moc_layer_vs_loop(benchmark, device, shape, impl):
    """Vectorised reference vs a per-expert Python loop, in the same functional layer."""
    params = init_params(shape, device)

    def layer(x, *_):
        with moc_kernels.use_backend("reference"):
            return moc_layer(x, params, shape, loop_experts=impl == "loop")

    run = forward_backward(lambda x: layer(x))
    sets = []
    for _ in range(2):
        x = torch.randn(shape.tokens, shape.dim, device=device, dtype=shape.dtype, requires_grad=True)
        sets.append((x, (torch.randn_like(x), torch.ones((), device=device))))
    measure(
        benchmark, run, sets, device, shape.tokens, op="moc_layer_functional", impl=impl, pass_="fwd+bwd",
        shape=shape.describe(),
    )  # fmt: skip
    benchmark.group = "moc_layer_functional fwd+bwd"


def _training_setup(shape: BenchShape, device: torch.device):
    """(config, batch, seq): the CPU default's model and batch (configs/tiny.yaml) on CPU, a
    GPT-2-small-sized MoC model on CUDA.

    CUDA batch 4 x 1024: the reference path saves ~0.5 MB per token per MoC layer
    (``python -m benchmarks.activation_memory``), ~25 GB for 12 layers at 4096 tokens.
    """
    if device.type == "cuda":
        return model_config(shape, n_layers=12, vocab_size=shape.vocab, max_seq_len=1024), 4, 1024
    from model.config import ModelConfig

    tiny = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml").read_text())
    config = ModelConfig.from_dict(tiny["model"])
    return config, tiny["batch_size"], config.max_seq_len


@pytest.mark.parametrize("impl", [*IMPLS, "loop"])
def test_training_step(benchmark, device, shape, impl, monkeypatch):
    """One optimizer step: forward (main + aux loss), backward, AdamW; bf16 autocast on CUDA as the trainer does.

    ``loop``: the reference path with ``expert_swiglu`` as a per-expert Python loop (issue 4 asks the
    vectorised reference to be at least as fast on CPU).
    """
    from model.lm import LunarisLM

    if impl == "triton":
        require_triton(device)
    if impl == "loop":
        monkeypatch.setattr(moc_kernels.reference, "expert_swiglu", per_expert_loop_swiglu)
    config, batch, seq = _training_setup(shape, device)
    config.kernels = _backend(impl)
    model = LunarisLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    forward = compiled(model) if impl == "compile" else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step(input_ids, targets):
        with autocast:
            out = forward(input_ids, targets)
        (out.loss + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sets = []
    for _ in range(2):
        ids = torch.randint(0, config.vocab_size, (batch, seq + 1), device=device)
        sets.append((ids[:, :-1], ids[:, 1:]))
    from model.info import flops_per_token

    # Useful work for the summary's fraction of the compute ceiling: forward matmul FLOPs x 3 (the
    # backward's two products per forward one), from model.info's count.
    flops = 3 * flops_per_token(config, seq)["total"] * batch * seq
    measure(
        benchmark, step, sets, device, batch * seq, op="training_step", impl=impl, pass_="step",
        shape=f"LunarisLM d={config.d_model} L={config.n_layers} E={config.n_experts} B={batch} T={seq}",
        work_flops=flops,
    )  # fmt: skip
    benchmark.group = "training_step"


@pytest.mark.parametrize("impl", IMPLS)
def test_kotara_fusion_step(benchmark, device, shape, impl):
    """Per batch after the forwards: similarity stats and all strategies in one fused pass."""
    from kotara.similarity import token_stats

    if impl == "triton":
        require_triton(device)
    fuse = (
        compiled(moc_kernels.reference.fused_logit_nll_multi)
        if impl == "compile"
        else moc_kernels.fused_logit_nll_multi
    )
    strategies = list(moc_kernels.STRATEGIES)

    def step(logits, targets):
        with moc_kernels.use_backend(_backend(impl)):
            return token_stats(logits, targets), fuse(logits, targets, strategies, [1.0] * len(logits), None)

    sets = []
    for _ in range(2):
        logits = [
            torch.randn(shape.tokens, shape.vocab, device=device, dtype=shape.dtype) * 3 for _ in range(shape.models)
        ]
        sets.append((logits, torch.randint(0, shape.vocab, (shape.tokens,), device=device)))
    with torch.no_grad():
        measure(
            benchmark, step, sets, device, shape.tokens, op="kotara_fusion_step", impl=impl, pass_="fwd",
            shape=shape.describe(),
        )  # fmt: skip
    benchmark.group = "kotara_fusion_step"


def _gpt2(vocab: int, width: int, layers: int, heads: int, positions: int, seed: int, device, dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=layers, n_head=heads)
    return GPT2LMHeadModel(config).to(device=device, dtype=dtype).eval()


@pytest.mark.parametrize("impl", IMPLS)
def test_kotara_evaluation(benchmark, device, shape, impl):
    """``kotara.evaluate`` with two random GPT-2 models (GPT-2 small on CUDA), all strategies; tokens/s.

    compile = both models' forwards under ``torch.compile``; the fusion backend follows ``impl``.
    """
    from kotara.evaluate import FusionSpec, evaluate
    from kotara.loading import LoadedModel
    from kotara.windows import rolling_windows

    if impl == "triton":
        require_triton(device)
    if device.type == "cuda":
        width, layers, heads, max_length, num_tokens, batch = 768, 12, 12, 1024, 16385, 8
    else:
        width, layers, heads, max_length, num_tokens, batch = 64, 2, 2, 64, 257, 4
    models = []
    for i in range(shape.models):
        module = _gpt2(shape.vocab, width, layers, heads, max_length, i, device, shape.dtype)
        runner = compiled(module) if impl == "compile" else module
        models.append(LoadedModel(chr(ord("a") + i), f"random-gpt2-{i}", runner, device, shape.dtype, shape.vocab))
    strategies = list(moc_kernels.STRATEGIES)
    spec = FusionSpec(strategies, [1.0] * len(models), [1.0 / len(models)] * len(models), [1.0] * len(models))
    windows = rolling_windows(num_tokens, max_length, max_length)

    def run(token_ids):
        with moc_kernels.use_backend(_backend(impl)):
            return evaluate(models, token_ids, num_tokens * 4, windows, spec, batch_size=batch)

    sets = [(torch.randint(0, shape.vocab, (num_tokens,)),) for _ in range(2)]
    measure(
        benchmark, run, sets, device, num_tokens - 1, op="kotara_evaluation", impl=impl, pass_="fwd",
        shape=f"2 x GPT-2 d={width} L={layers} V={shape.vocab}, {num_tokens - 1} tokens, max_length={max_length}",
    )  # fmt: skip
    benchmark.group = "kotara_evaluation"
