"""Cost model (a model, not a measurement): FLOPs, fewest HBM bytes and H100 roofline time per op.

    python -m benchmarks.cost_model [--json] [--tokens N] [--traffic]

For each op (forward, and forward+backward where it trains) and for the whole MoC layer at the
GPT-2-small MoC shape (``benchmarks.shapes.GPT2_SMALL``):

- kernel FLOPs: the useful matrix-product FLOPs of the kernel design (2 per multiply-add; the
  backward of ``expert_swiglu`` recomputes G and U, so it counts that GEMM again). Element-wise work
  (softmax, exp, SiLU) is not counted: it runs on the CUDA cores next to the memory traffic.
- kernel bytes: the fewest HBM bytes of the kernel design (DESIGN §3): each input read and each
  output written once, plus the intermediates the design must round-trip through HBM (the SwiGLU
  hidden H and its gradient, the logits' second pass of ``fused_logit_nll``). Formulas in
  :func:`kernel_costs`.
- reference FLOPs / bytes: what the PyTorch reference does, run on the meta device (no memory, no
  time) under ``torch.utils.flop_counter.FlopCounterMode`` and :class:`ByteCounter`, a
  ``TorchDispatchMode`` that adds up the input + output bytes of every aten op except views
  (a view moves no data). Eager PyTorch reads and writes every op's operands in HBM, so this is the
  traffic of the reference on a GPU, up to what the caches catch.
- roofline time = max(FLOPs / 990 TFLOP/s, bytes / 3.35 TB/s), H100 SXM dense bf16 and HBM3. The
  reference's fp32 matrix products would run at the TF32 rate at best (half that), so its compute
  time is flattered.
- MoC layer, kernel path: the reference layer's counts with the four ops' reference counts replaced
  by their kernel-design counts (the projections, norms and losses around the ops are the same
  PyTorch code on both paths).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

import moc_kernels
from benchmarks.shapes import GPT2_SMALL, BenchShape

PEAK_FLOPS = 990e12  # H100 SXM, dense bf16 tensor cores
PEAK_BYTES = 3.35e12  # H100 SXM, HBM3
LABEL = "cost model (a model, not a measurement)"
FP32, INDEX = 4, 8
FUSION_ROWS = 64


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of ``t`` (broadcast dimensions, stride 0, count once)."""
    distinct = math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0)
    return distinct * t.element_size()


class ByteCounter(TorchDispatchMode):
    """Adds up ``bytes`` = input + output bytes of every aten op that is not a view."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            tensors = [t for t in tree_flatten((args, kwargs or {}, out))[0] if isinstance(t, torch.Tensor)]
            self.bytes += sum(tensor_bytes(t) for t in tensors)
            self.ops += 1
        return out


@dataclass
class Cost:
    """One row of the model. FLOPs and bytes are totals for the pass; times in ms."""

    op: str
    pass_: str
    kernel_flops: float
    kernel_bytes: float
    reference_flops: float
    reference_bytes: float

    @staticmethod
    def roofline_ms(flops: float, num_bytes: float) -> float:
        return max(flops / PEAK_FLOPS, num_bytes / PEAK_BYTES) * 1e3

    @property
    def kernel_ms(self) -> float:
        return self.roofline_ms(self.kernel_flops, self.kernel_bytes)

    @property
    def reference_ms(self) -> float:
        return self.roofline_ms(self.reference_flops, self.reference_bytes)

    @property
    def kernel_bound(self) -> str:
        return "compute" if self.kernel_flops / PEAK_FLOPS > self.kernel_bytes / PEAK_BYTES else "memory"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(kernel_ms=self.kernel_ms, reference_ms=self.reference_ms, kernel_bound=self.kernel_bound)
        return d


def kernel_costs(op: str, shape: BenchShape, length: int | None = None, strategies: int = 1) -> dict[str, tuple]:
    """{pass: (FLOPs, fewest HBM bytes)} of the kernel design of ``op`` at ``shape``.

    length: L of ``small_attention`` (E for the router, k for the collab attention).
    strategies: number of strategies computed in one ``fused_logit_nll`` pass.
    """
    N, D, E, F, H, k = shape.tokens, shape.dim, shape.experts, shape.hidden, shape.heads, shape.top_k
    b = torch.finfo(shape.dtype).bits // 8
    if op == "expert_swiglu":
        x, w13, w2, y, h = N * D * b, E * D * 2 * F * b, E * F * D * b, N * E * D * b, N * E * F * b
        # fwd: GEMM 1 reads x, w13, writes H = silu(G)*U; GEMM 2 reads H, w2, writes Y.
        fwd_bytes = (x + w13 + h) + (h + w2 + y)
        # bwd: GEMM 1 reads x, w13, dY, w2, recomputes G, U, H and writes dG|dU and H;
        # dx = [dG|dU] w13^T, dW13 = x^T [dG|dU], dW2 = H^T dY each read their operands, write their result.
        bwd_bytes = (x + w13 + y + w2 + 2 * h + h) + (2 * h + w13 + x) + (x + 2 * h + w13) + (h + y + w2)
        gemm = 2 * N * D * F * E  # one [N, D] x [D, F] product per expert
        return {"fwd": (3 * gemm, fwd_bytes), "fwd+bwd": (3 * gemm + 8 * gemm, fwd_bytes + bwd_bytes)}
    if op == "routed_swiglu":
        return _routed_swiglu_costs(shape)
    if op == "topk_gather":
        idx, s, y = N * k * INDEX, N * k * D * b, N * E * D * b
        fwd_bytes = idx + 2 * s  # read the k selected rows, write S
        bwd_bytes = idx + s + y  # read dS, write all of dY (zeros where not selected)
        return {"fwd": (0.0, fwd_bytes), "fwd+bwd": (0.0, fwd_bytes + bwd_bytes)}
    if op == "small_attention":
        L = length
        qkv, row_stats = N * L * D * b, N * H * L * FP32
        fwd_bytes = 3 * qkv + qkv + 2 * row_stats  # read q, k, v; write out, entropy, log-sum-exp
        bwd_bytes = 3 * qkv + qkv + 2 * row_stats + 3 * qkv  # read q, k, v, d_out, lse, d_entropy; write dq, dk, dv
        product = 2 * N * L * L * D  # Q K^T (or P V) over all heads
        return {"fwd": (2 * product, fwd_bytes), "fwd+bwd": (2 * product + 5 * product, fwd_bytes + bwd_bytes)}
    if op == "fused_logit_nll":
        M, V = shape.models, shape.vocab
        # pass 1 (per-model statistics) and pass 2 (log-sum-exp of the fused row) both read every logit.
        logits, outputs = M * N * V * b, strategies * (N + 2 * M * N) * FP32
        return {"fwd": (0.0, 2 * logits + N * INDEX + outputs)}
    raise ValueError(
        f"unknown op {op!r}; expected expert_swiglu, routed_swiglu, topk_gather, small_attention or fused_logit_nll"
    )


def _routed_swiglu_costs(shape: BenchShape) -> dict[str, tuple]:
    """``routed_swiglu``'s kernel design (moc_kernels/triton/routed_swiglu.py) on P = N k (token, slot)
    rows: the routing reads idx and writes the int32 sort order, which every GEMM reads again; x and dY
    rows are gathered per pair in the loads (read once per pair); no G/U recompute in the backward."""
    N, D, E, F = shape.tokens, shape.dim, shape.experts, shape.hidden
    b, P = torch.finfo(shape.dtype).bits // 8, shape.tokens * shape.top_k
    rows_d, rows_f, w13, w2, order = P * D * b, P * F * b, E * D * 2 * F * b, E * F * D * b, P * 4
    route = P * INDEX + order + (E + 1) * 4
    # fwd: gate/up reads the x rows and w13, writes G, U (saved) and H; down reads H, w2, writes Y.
    fwd_bytes = route + (rows_d + w13 + 3 * rows_f + order) + (rows_f + w2 + rows_d + order)
    # bwd: dH reads dY rows, w2, G, U, writes dG, dU, H; dX_pair = [dG|dU] w13^T (fp32) and its sum over
    # the k slots; dW13 = X^T [dG|dU]; dW2 = H^T dY.
    bwd_bytes = (
        (rows_d + w2 + 2 * rows_f + 3 * rows_f + order)
        + (2 * rows_f + w13 + P * D * FP32 + order)
        + (P * D * FP32 + N * D * b)
        + (rows_d + 2 * rows_f + w13 + order)
        + (rows_f + rows_d + w2 + order)
    )
    gemm = 2 * P * D * F  # one [rows, D] x [D, F] product over all experts' rows: k/E of expert_swiglu's
    return {"fwd": (3 * gemm, fwd_bytes), "fwd+bwd": (9 * gemm, fwd_bytes + bwd_bytes)}


def useful_work(op: str, pass_: str, shape: BenchShape) -> tuple[float, float] | None:
    """(FLOPs, fewest HBM bytes) of the kernel design for a benchmark row (its ``op`` and ``pass_``),
    or None for rows the model does not cover (training step, Kotara end to end). A measured time
    turns them into achieved TFLOP/s and GB/s, the work any implementation of the op must do."""
    if op.startswith("small_attention[") and pass_ in ("fwd", "fwd+bwd"):
        length = int(op.split("L=")[1].rstrip("]"))
        return kernel_costs("small_attention", shape, length=length)[pass_]
    if op in ("expert_swiglu", "routed_swiglu", "topk_gather") and pass_ in ("fwd", "fwd+bwd"):
        return kernel_costs(op, shape)[pass_]
    if op in ("fused_logit_nll[one]", "fused_logit_nll[all]"):
        strategies = len(moc_kernels.STRATEGIES) if op.endswith("[all]") else 1
        return kernel_costs("fused_logit_nll", shape, strategies=strategies)["fwd"]
    if op == "fusion_vs_log_softmax":  # benchmarks/test_bench_fusion_bounds.py: pass_ is the strategy
        if pass_ == "log_softmax":  # read every logit, write its fp32 log-probability
            return 0.0, shape.models * shape.tokens * shape.vocab * (torch.finfo(shape.dtype).bits // 8 + FP32)
        strategies = len(moc_kernels.STRATEGIES) if pass_ == "all" else 1
        return kernel_costs("fused_logit_nll", shape, strategies=strategies)["fwd"]
    if op == "moc_layer" and pass_ == "fwd+bwd":
        row = layer_row(shape)
        return row.kernel_flops, row.kernel_bytes
    return None


def measure_reference(fn, *args, grads: tuple | None = None) -> tuple[float, float]:
    """(matrix-product FLOPs, non-view aten bytes) of ``fn(*args)`` and, with ``grads``, its backward."""
    counter, flops = ByteCounter(), FlopCounterMode(display=False)
    with flops, counter:
        outputs = fn(*args)
        if grads is not None:
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None]
            wrt = [a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor) and a.requires_grad]
            torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs])
    return float(flops.get_total_flops()), float(counter.bytes)


def _meta(*size: int, dtype: torch.dtype, grad: bool = False) -> torch.Tensor:
    return torch.empty(*size, device="meta", dtype=dtype).requires_grad_(grad)


def _op_cases(shape: BenchShape) -> list[tuple[str, str, Any, tuple, tuple, dict]]:
    """(row name, op, reference fn, inputs, output grads, kernel_costs kwargs) for every op row."""
    from moc_kernels import reference

    N, D, E, F, H, k, dt = shape.tokens, shape.dim, shape.experts, shape.hidden, shape.heads, shape.top_k, shape.dtype
    w13 = _meta(E, D, 2 * F, dtype=dt, grad=True)
    w1, w3 = w13.split(F, dim=-1)
    cases = [
        (
            "expert_swiglu",
            "expert_swiglu",
            reference.expert_swiglu,
            (_meta(N, D, dtype=dt, grad=True), w1, w3, _meta(E, F, D, dtype=dt, grad=True)),
            (_meta(N, E, D, dtype=dt),),
            {},
        ),
        (
            "topk_gather",
            "topk_gather",
            reference.topk_gather,
            (_meta(N, E, D, dtype=dt, grad=True), _meta(N, k, dtype=torch.int64)),
            (_meta(N, k, D, dtype=dt),),
            {},
        ),
    ]
    for role, L in (("router", E), ("collab", k)):
        qkv = tuple(_meta(N, L, H, D // H, dtype=dt, grad=True) for _ in range(3))
        grads = (_meta(N, L, H, D // H, dtype=dt), _meta(N, H, L, dtype=torch.float32))
        cases.append(
            (
                f"small_attention[{role} L={L}]",
                "small_attention",
                reference.small_attention,
                (*qkv, True),
                grads,
                {"length": L},
            )
        )
    return cases


def op_rows(shape: BenchShape = GPT2_SMALL) -> list[Cost]:
    """Cost rows of the four ops at ``shape`` (fused_logit_nll: one strategy and all strategies)."""
    from moc_kernels import reference

    rows = []
    for name, op, fn, inputs, grads, kwargs in _op_cases(shape):
        model = kernel_costs(op, shape, **kwargs)
        for pass_, (kflops, kbytes) in model.items():
            rflops, rbytes = measure_reference(fn, *inputs, grads=grads if pass_ != "fwd" else None)
            rows.append(Cost(name, pass_, kflops, kbytes, rflops, rbytes))
    # The fusion reference branches on data (rows with -inf logits are redone), which the meta device
    # cannot do: it runs on real CPU tensors for FUSION_ROWS rows, and its bytes are scaled to N rows
    # (the work is row-wise, so bytes are linear in N).
    V, M, rows_run = shape.vocab, shape.models, FUSION_ROWS
    logits = [torch.randn(rows_run, V, dtype=shape.dtype) for _ in range(M)]
    targets = torch.randint(0, V, (rows_run,))
    for label, strategies in (("one", ["entropy"]), ("all", list(moc_kernels.STRATEGIES))):
        kflops, kbytes = kernel_costs("fused_logit_nll", shape, strategies=len(strategies))["fwd"]
        rflops, rbytes = measure_reference(reference.fused_logit_nll_multi, logits, targets, strategies, None, None)
        scale = shape.tokens / rows_run
        rows.append(Cost(f"fused_logit_nll[{label}]", "fwd", kflops, kbytes, rflops * scale, rbytes * scale))
    return rows


ROUTED_TOKENS = (32, 64)


def routed_rows(shape: BenchShape = GPT2_SMALL) -> list[Cost]:
    """Cost rows of ``routed_swiglu`` (the top-k MoE's experts) at ``shape``.

    Its reference splits the sorted rows by per-expert counts, which are data: it cannot run on the
    meta device. It runs on CPU tensors at the two token counts of ``ROUTED_TOKENS`` with a balanced
    routing (token n's slot j on expert (n k + j) mod E, so every expert gets N k / E rows); each of
    its ops then moves a fixed amount (weights) plus an amount linear in N, so FLOPs and bytes are
    extrapolated linearly to ``shape.tokens``.
    """
    from moc_kernels import reference

    D, E, F, k, dt = shape.dim, shape.experts, shape.hidden, shape.top_k, shape.dtype
    measured = []
    for tokens in ROUTED_TOKENS:
        x = torch.randn(tokens, D, dtype=dt, requires_grad=True)
        w13 = torch.randn(E, D, 2 * F, dtype=dt, requires_grad=True)
        w2 = torch.randn(E, F, D, dtype=dt, requires_grad=True)
        idx = (torch.arange(tokens * k) % E).view(tokens, k)
        inputs = (x, idx, *w13.split(F, dim=-1), w2)
        dy = torch.randn(tokens, k, D, dtype=dt)
        fwd = measure_reference(reference.routed_swiglu, *inputs)
        measured.append({"fwd": fwd, "fwd+bwd": measure_reference(reference.routed_swiglu, *inputs, grads=(dy,))})
    (n1, n2), rows = ROUTED_TOKENS, []
    for pass_, (kflops, kbytes) in kernel_costs("routed_swiglu", shape).items():
        (f1, b1), (f2, b2) = measured[0][pass_], measured[1][pass_]
        scale = (shape.tokens - n1) / (n2 - n1)
        rows.append(Cost("routed_swiglu", pass_, kflops, kbytes, f1 + (f2 - f1) * scale, b1 + (b2 - b1) * scale))
    return rows


def _reference_layer_cost(module: torch.nn.Module, shape: BenchShape) -> tuple[float, float]:
    """(FLOPs, bytes) of one forward + backward of an expert layer on the reference backend (meta device)."""
    x = _meta(1, shape.tokens, shape.dim, dtype=shape.dtype, grad=True)
    counter, flops = ByteCounter(), FlopCounterMode(display=False)
    with moc_kernels.use_backend("reference"), flops, counter:
        result = module(x)
        aux = result.balance_loss + result.diversity_loss
        # .backward, not autograd.grad: FlopCounterMode's module hooks do not support grad() w.r.t. leaves.
        torch.autograd.backward([result.out, aux], [torch.empty_like(result.out), torch.ones_like(aux)])
    return float(flops.get_total_flops()), float(counter.bytes)


def layer_row(shape: BenchShape = GPT2_SMALL, op_costs: list[Cost] | None = None) -> Cost:
    """The whole MoC layer (the model's CollaborativeExpertsModule), forward + backward."""
    from benchmarks.moc_layer import build_moc_module

    op_costs = op_costs if op_costs is not None else op_rows(shape)
    with torch.device("meta"):
        module = build_moc_module(shape, "meta")
    rflops, rbytes = _reference_layer_cost(module, shape)
    # The layer calls expert_swiglu, topk_gather and the two small attentions once each.
    in_layer = [c for c in op_costs if c.pass_ == "fwd+bwd"]
    kflops = rflops - sum(c.reference_flops for c in in_layer) + sum(c.kernel_flops for c in in_layer)
    kbytes = rbytes - sum(c.reference_bytes for c in in_layer) + sum(c.kernel_bytes for c in in_layer)
    return Cost("moc_layer", "fwd+bwd", kflops, kbytes, rflops, rbytes)


def sparse_layer_row(
    shape: BenchShape = GPT2_SMALL, op_costs: list[Cost] | None = None, routed_costs: list[Cost] | None = None
) -> Cost:
    """The sparse MoC layer (``ffn: moc_sparse``, token router; DESIGN §2c, issue 28), forward + backward.

    Measured as :func:`layer_row` on the meta device, where the layer runs ``routed_swiglu``'s GEMMs with
    the rows split evenly among the experts (``model.moc.even_routed_swiglu``, also measured alone here);
    that pass and the collab attention's reference costs are replaced by the kernels' modelled ones.
    """
    from benchmarks.moc_layer import _random_weights, model_config
    from model.moc import SparseCollaborativeExpertsModule, even_routed_swiglu

    op_costs = op_costs if op_costs is not None else op_rows(shape)
    routed_costs = routed_costs if routed_costs is not None else routed_rows(shape)
    config = model_config(shape, ffn="moc_sparse", router_context=False)
    with torch.device("meta"):
        module = _random_weights(SparseCollaborativeExpertsModule(config), shape, "meta")
    rflops, rbytes = _reference_layer_cost(module, shape)
    N, D, E, F, k, dt = shape.tokens, shape.dim, shape.experts, shape.hidden, shape.top_k, shape.dtype
    experts_in = (_meta(N, D, dtype=dt, grad=True), _meta(N, k, dtype=torch.int64))
    weights = (_meta(E, D, 2 * F, dtype=dt, grad=True), None, _meta(E, F, D, dtype=dt, grad=True))
    eflops, ebytes = measure_reference(even_routed_swiglu, *experts_in, *weights, grads=(_meta(N, k, D, dtype=dt),))
    collab = next(c for c in op_costs if c.op.startswith("small_attention[collab") and c.pass_ == "fwd+bwd")
    routed = next(c for c in routed_costs if c.pass_ == "fwd+bwd")
    kflops = rflops - eflops - collab.reference_flops + routed.kernel_flops + collab.kernel_flops
    kbytes = rbytes - ebytes - collab.reference_bytes + routed.kernel_bytes + collab.kernel_bytes
    return Cost("moc_sparse_layer", "fwd+bwd", kflops, kbytes, rflops, rbytes)


def all_rows(shape: BenchShape = GPT2_SMALL) -> list[Cost]:
    ops, routed = op_rows(shape), routed_rows(shape)
    return [*ops, *routed, sparse_layer_row(shape, ops, routed), layer_row(shape, ops)]


def format_table(rows: list[Cost], shape: BenchShape = GPT2_SMALL, traffic: dict | None = None) -> str:
    """Markdown table of the model, titled as a model. ``traffic``: {(op, pass): modeled / fewest bytes of
    its GEMM launches} from the wave-level traffic model (``benchmarks.traffic_model.pass_ratios``, at the
    GPT-2-small shape only); "-" where absent."""
    traffic = traffic or {}
    lines = [
        f"**Cost model (a model, not a measurement)**: {shape.describe()}; "
        f"H100 roofline at {PEAK_FLOPS / 1e12:.0f} TFLOP/s and {PEAK_BYTES / 1e12:.2f} TB/s.",
        "",
        "| op | pass | kernel GFLOP | kernel MB | reference GFLOP | reference MB | ref/kernel bytes "
        "| kernel roofline ms | reference roofline ms | kernel bound | GEMM traffic / fewest (wave model) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for c in rows:
        ratio = c.reference_bytes / c.kernel_bytes if c.kernel_bytes else float("nan")
        modeled = traffic.get((c.op, c.pass_))
        lines.append(
            f"| {c.op} | {c.pass_} | {c.kernel_flops / 1e9:.1f} | {c.kernel_bytes / 1e6:.1f} "
            f"| {c.reference_flops / 1e9:.1f} | {c.reference_bytes / 1e6:.1f} | {ratio:.2f}x "
            f"| {c.kernel_ms:.3f} | {c.reference_ms:.3f} | {c.kernel_bound} "
            f"| {'-' if modeled is None else f'{modeled:.2f}x'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cost_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON (each labelled as a model)")
    parser.add_argument("--tokens", type=int, default=GPT2_SMALL.tokens, help="N, tokens per batch (default 16384)")
    parser.add_argument("--traffic", action="store_true", help="also print the wave-level traffic model per launch")
    args = parser.parse_args(argv)
    if args.tokens < 1:
        print(f"error: --tokens must be >= 1, got {args.tokens}", file=sys.stderr)
        return 2
    shape = GPT2_SMALL.with_tokens(args.tokens)
    rows = all_rows(shape)
    if args.json:
        print(json.dumps({"label": LABEL, "shape": shape.describe(), "rows": [r.as_dict() for r in rows]}, indent=1))
    else:
        traffic = None
        if shape == GPT2_SMALL and moc_kernels.backend.TRITON_INSTALLED:  # the traffic model's one shape
            from benchmarks import traffic_model

            traffic = traffic_model.pass_ratios()
        print(format_table(rows, shape, traffic))
        if args.traffic and traffic is not None:
            print("\n" + traffic_model.format_table(traffic_model.all_launches()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
