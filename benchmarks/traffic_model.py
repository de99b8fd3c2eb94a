"""Wave-level HBM traffic model (a model, not a measurement) of the SwiGLU GEMM launches on an H100.

    python -m benchmarks.traffic_model [--json]

For every GEMM-like kernel launch of one MoC layer step (``expert_swiglu``) and one top-k MoE layer
step (``routed_swiglu``) at the GPT-2-small shape (N = 16384, D = 768, E = 8, F = 2048, k = 2, bf16),
as the launchers plan them (their own planning code, run on meta tensors):

- blocks resident per SM from the launch build's registers and shared memory on sm_90
  (``LAUNCH_BUILD_SM90``, from ``python -m moc_kernels.report --ops expert_swiglu,routed_swiglu
  --arch 90``) and the warps: min(65536 / (warps x 32 x registers rounded up to 8), 228 KiB /
  (shared + 1 KiB), 64 / warps, 32); a wave is that many blocks times 132 SMs, in launch order;
- the launch order, read from the plan: a grid ``(row blocks, column tiles, batch)`` runs row block
  fastest (CUDA numbers blocks x fastest); ``(row blocks x column tiles, 1, batch)``
  (``moc_kernels.triton.launch.tile_grid``) column tile fastest, or row block fastest where the
  kernel's ``ROWS_FASTEST`` is set (the weight-gradient GEMMs whose right operand is the larger);
- each block touches one tile of the left operand (its row block, over the whole K) and one of the
  right operand (its column tile, over the whole K); a wave reads every distinct tile it touches
  once (the blocks of a wave move through K together and share tiles in L2);
- L2 policy: a wave re-reads nothing the previous wave read if the previous wave's distinct bytes
  fit in L2 (50 MB); otherwise it keeps nothing useful (an LRU cache streaming more than its size in
  the same K order evicts each tile before the next wave asks for it);
- outputs and epilogue reads (G, U, stored results) are streamed once.

The fewest bytes are each distinct tile once plus the streamed bytes; the roofline time is
max(FLOPs / 990 TFLOP/s, modeled bytes / 3.35 TB/s).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch

SMS, L2_BYTES, REGISTERS, SHARED_BYTES, MAX_WARPS, MAX_BLOCKS = 132, 50e6, 65536, 228 * 1024, 64, 32
PEAK_FLOPS, PEAK_BYTES = 990e12, 3.35e12
LABEL = "wave-level traffic model (a model, not a measurement)"
SHAPE = {"N": 16384, "D": 768, "E": 8, "F": 2048, "k": 2}

# (registers, shared bytes) of the shipped bf16 configs' launch build on sm_90, by report config label.
LAUNCH_BUILD_SM90 = {
    ("_expert_dual_matmul", "gate_up-BM128-BN64-BK16-w8-s3-bf16"): (126, 24576),
    ("_expert_matmul", "down-BM128-BN128-BK64-w8-s3-bf16"): (98, 98304),
    ("_swiglu_grad", "swiglu_grad-BM64-BN64-BK32-w8-s3-bf16"): (126, 24576),
    ("_dx", "dx-BM128-BN128-BK16-w8-s4-bf16"): (238, 81920),
    ("_expert_dual_matmul", "dw13-BM128-BN64-BK64-w8-s3-bf16"): (108, 98304),
    ("_expert_matmul", "dw2-BM128-BN128-BK64-w8-s3-bf16"): (99, 98304),
    ("_routed_gate_up", "gate_up-BM128-BN64-BK32-w8-s3-bf16"): (128, 49152),
    ("_routed_rows_matmul", "down-BM128-BN128-BK64-w8-s3-bf16"): (112, 98304),
    ("_routed_swiglu_grad", "swiglu_grad-BM128-BN64-BK32-w8-s3-bf16"): (220, 36864),
    ("_routed_rows_matmul", "dx-BM128-BN64-BK32-w8-s3-bf16"): (64, 73728),
    ("_routed_weight_grad", "dw13-BM128-BN64-BK64-w8-s3-bf16"): (110, 65792),
    ("_routed_weight_grad", "dw2-BM128-BN128-BK64-w8-s3-bf16"): (114, 65792),
}


def blocks_per_sm(registers: int, shared_bytes: int, warps: int) -> int:
    """Blocks of one kernel resident on one SM (registers allocated per thread in units of 8)."""
    by_registers = REGISTERS // (warps * 32 * (-(-registers // 8) * 8))
    return max(1, min(by_registers, SHARED_BYTES // (shared_bytes + 1024), MAX_WARPS // warps, MAX_BLOCKS))


@dataclass
class Launch:
    """One GEMM-like launch: ``blocks`` lists (left tile, right tile) per block in launch order (None:
    a spare block that returns at once), ``tile_bytes`` the HBM bytes of each tile over the whole K."""

    op: str
    kernel: str
    config: str
    order: str
    blocks: list[tuple | None]
    tile_bytes: dict[tuple, float]
    streamed_bytes: float
    flops: float
    resident: int  # blocks per SM

    def min_bytes(self) -> float:
        return sum(self.tile_bytes.values()) + self.streamed_bytes

    def modeled_bytes(self, sms: int = SMS, l2_bytes: float = L2_BYTES) -> float:
        wave_size = self.resident * sms
        total, previous, previous_fits = self.streamed_bytes, set(), False
        for start in range(0, len(self.blocks), wave_size):
            tiles = {tile for block in self.blocks[start : start + wave_size] if block for tile in block}
            new = tiles - previous if previous_fits else tiles
            total += sum(self.tile_bytes[t] for t in new)
            previous, previous_fits = tiles, sum(self.tile_bytes[t] for t in tiles) <= l2_bytes
        return total

    def row(self) -> dict:
        modeled, fewest = self.modeled_bytes(), self.min_bytes()
        ms = max(self.flops / PEAK_FLOPS, modeled / PEAK_BYTES) * 1e3
        return {
            "op": self.op, "kernel": self.kernel, "config": self.config, "order": self.order,
            "resident_per_sm": self.resident, "blocks": len(self.blocks), "min_mb": fewest / 1e6,
            "modeled_mb": modeled / 1e6, "ratio": modeled / fewest, "roofline_ms": ms,
            "fraction_of_peak": self.flops / PEAK_FLOPS * 1e3 / ms,
        }  # fmt: skip


def launch_blocks(rows: list, cols: int, batch: int, order: str, left, right) -> list[tuple | None]:
    """The blocks of a (rows x cols x batch) grid in launch order; ``rows[m]`` is None for a spare row
    block; ``left(m, z)`` and ``right(n, m, z)`` name the tiles a block touches."""
    blocks = []
    for z in range(batch):
        pairs = [(m, n) for m in range(len(rows)) for n in range(cols)]
        if order == "row block fastest":
            pairs = [(m, n) for n in range(cols) for m in range(len(rows))]
        blocks += [None if rows[m] is None else (left(m, z), right(n, m, z)) for m, n in pairs]
    return blocks


def grid_order(grid: tuple[int, ...], row_blocks: int, cols: int, rows_fastest: bool = False) -> str:
    """The order of a plan's grid: 2-D (row blocks, column tiles) numbers row blocks fastest; 1-D
    (``tile_grid``) column tiles fastest, or row blocks when the kernel's ROWS_FASTEST is set."""
    if grid[:2] == (row_blocks * cols, 1):
        return "row block fastest" if rows_fastest else "column tile fastest"
    if grid[:2] == (row_blocks, cols):
        return "row block fastest"
    raise ValueError(f"unknown launch order of grid {grid} ({row_blocks} row blocks, {cols} column tiles)")


def _gemm(
    op, plan, m_rows, cols, left_row_bytes, right_col_bytes, streamed, flops, *, row_experts=None, shared_left=False
):
    """A Launch from a launcher's plan: ``m_rows`` rows (M), ``cols`` columns (N); a left tile is a row
    block's rows x ``left_row_bytes`` (all of K), a right tile a column tile's columns x
    ``right_col_bytes``. ``row_experts``: the routed kernels' row blocks as (expert, rows) or None
    (spare), else M is cut into BLOCK_M blocks per batch entry (grid axis 2, the expert), whose left
    tiles are shared by every expert when ``shared_left`` (x in the gate/up and dW13 GEMMs)."""
    block_m, block_n, batch = plan.args["BLOCK_M"], plan.args["BLOCK_N"], plan.grid[2]
    rows = row_experts or [(None, min(block_m, m_rows - m)) for m in range(0, m_rows, block_m)]
    col_tiles = -(-cols // block_n)
    tile_bytes: dict[tuple, float] = {}

    def left(m, z):
        key = ("A", m, 0 if shared_left or row_experts else z)
        tile_bytes[key] = rows[m][1] * left_row_bytes
        return key

    def right(n, m, z):
        key = ("B", n, rows[m][0] if row_experts else z)
        tile_bytes[key] = min(block_n, cols - n * block_n) * right_col_bytes
        return key

    order = grid_order(plan.grid, len(rows), col_tiles, plan.args.get("ROWS_FASTEST", False))
    blocks = launch_blocks(rows, col_tiles, batch, order, left, right)
    from moc_kernels.triton.launch import plan_label

    kernel, config = plan.fn.__name__, plan_label(plan, torch.bfloat16)
    registers, shared = LAUNCH_BUILD_SM90[(kernel, config)]
    resident = blocks_per_sm(registers, shared, plan.num_warps)
    return Launch(op, kernel, config, order, blocks, tile_bytes, streamed, flops, resident)


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def expert_swiglu_launches(shape=SHAPE) -> list[Launch]:
    """The six GEMMs of one MoC layer step (forward, backward with every gradient), bf16."""
    from moc_kernels.triton import expert_swiglu as es

    N, D, E, F, b = shape["N"], shape["D"], shape["E"], shape["F"], 2
    packed = _meta(E, D, 2 * F)
    w1, w3, w2, x = packed[..., :F], packed[..., F:], _meta(E, F, D), _meta(N, D)
    _, g, u, (gate_up, down) = es._forward_plans(x, w1, w3, w2, recompute=False)
    _, (swiglu_grad, dx, dw13, dw2) = es._backward_plans(_meta(N, E, D), x, w1, w3, w2, g, u, recompute=False)
    hidden, out, gemm = N * E * F * b, N * E * D * b, 2 * N * D * F  # gemm: one product, one expert
    op = "expert_swiglu"
    return [
        _gemm(op, gate_up, N, F, D * b, 2 * D * b, 3 * hidden, 2 * E * gemm, shared_left=True),
        _gemm(op, down, N, D, F * b, F * b, out, E * gemm),
        _gemm(op, swiglu_grad, N, F, D * b, D * b, 5 * hidden, E * gemm),
        _gemm(op, dx, N, D, 2 * E * F * b, 2 * E * F * b, N * D * b, 2 * E * gemm),
        _gemm(op, dw13, D, F, N * b, 2 * N * b, E * D * 2 * F * b, 2 * E * gemm, shared_left=True),
        _gemm(op, dw2, F, D, N * b, N * b, E * F * D * b, E * gemm),
    ]


def routed_swiglu_launches(shape=SHAPE) -> list[Launch]:
    """The six GEMMs of one top-k MoE layer step, bf16, balanced routing (P / E rows per expert)."""
    from moc_kernels.triton import routed_swiglu as rs

    N, D, E, F, k, b = shape["N"], shape["D"], shape["E"], shape["F"], shape["k"], 2
    P = N * k
    packed = _meta(E, D, 2 * F)
    w1, w3, w2, x = packed[..., :F], packed[..., F:], _meta(E, F, D), _meta(N, D)
    routing = (_meta(P, dtype=torch.int32), _meta(E + 1, dtype=torch.int32), k)
    _, g, u, (gate_up, down) = rs._forward_plans(x, w1, w3, w2, routing)
    _, (swiglu_grad, dx, dw13, dw2) = rs._backward_plans(_meta(P, D), x, w1, w3, w2, routing, g, u, (True,) * 3)

    def routed_rows(plan):
        """Row blocks numbered expert by expert, then the grid's spare ones (ceil(P / BLOCK_M) + E in all)."""
        block_m, per_expert = plan.args["BLOCK_M"], P // E
        rows = [(e, min(block_m, per_expert - r)) for e in range(E) for r in range(0, per_expert, block_m)]
        return rows + [None] * (-(-P // block_m) + E - len(rows))

    hidden, gemm, op = P * F * b, 2 * P * D * F, "routed_swiglu"
    return [
        _gemm(op, gate_up, P, F, D * b, 2 * D * b, 3 * hidden, 2 * gemm, row_experts=routed_rows(gate_up)),
        _gemm(op, down, P, D, F * b, F * b, P * D * b, gemm, row_experts=routed_rows(down)),
        _gemm(op, swiglu_grad, P, F, D * b, D * b, 5 * hidden, gemm, row_experts=routed_rows(swiglu_grad)),
        _gemm(op, dx, P, D, 2 * F * b, 2 * F * b, P * D * 4, 2 * gemm, row_experts=routed_rows(dx)),
        _gemm(op, dw13, D, F, P // E * b, 2 * P // E * b, E * D * 2 * F * b, 2 * gemm),
        _gemm(op, dw2, F, D, P // E * b, P // E * b, E * F * D * b, gemm),
    ]


def all_launches(shape=SHAPE) -> list[Launch]:
    return [*expert_swiglu_launches(shape), *routed_swiglu_launches(shape)]


def pass_ratios(launches: list[Launch] | None = None) -> dict[tuple[str, str], float]:
    """{(op, pass): modeled / fewest bytes of the pass's GEMM launches}; the forward is each op's first
    two launches (gate/up, down), forward+backward all six."""
    launches = all_launches() if launches is None else launches
    ratios = {}
    for op in ("expert_swiglu", "routed_swiglu"):
        mine = [launch for launch in launches if launch.op == op]
        for pass_, part in (("fwd", mine[:2]), ("fwd+bwd", mine)):
            ratios[(op, pass_)] = sum(x.modeled_bytes() for x in part) / sum(x.min_bytes() for x in part)
    return ratios


def format_table(launches: list[Launch]) -> str:
    lines = [
        f"**{LABEL}**: H100 (132 SMs, 50 MB L2), N={SHAPE['N']} D={SHAPE['D']} E={SHAPE['E']} F={SHAPE['F']} "
        f"k={SHAPE['k']} bf16; roofline at {PEAK_FLOPS / 1e12:.0f} TFLOP/s and {PEAK_BYTES / 1e12:.2f} TB/s.",
        "",
        "| op | kernel | config | launch order | blocks/SM | fewest MB | modeled MB | modeled / fewest "
        "| roofline ms | fraction of 990 TFLOP/s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in (launch.row() for launch in launches):
        lines.append(
            f"| {r['op']} | {r['kernel']} | {r['config']} | {r['order']} | {r['resident_per_sm']} | {r['min_mb']:.0f} "
            f"| {r['modeled_mb']:.0f} | {r['ratio']:.2f}x | {r['roofline_ms']:.3f} | {r['fraction_of_peak']:.0%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.traffic_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON (labelled as a model)")
    args = parser.parse_args(argv)
    launches = all_launches()
    if args.json:
        print(json.dumps({"label": LABEL, "rows": [launch.row() for launch in launches]}, indent=1))
    else:
        print(format_table(launches))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
