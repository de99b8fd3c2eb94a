"""``python -m benchmarks.training_check``: a short training run on the kernels, checked against the reference.

    python -m benchmarks.training_check --out FILE.json [--size gpu|cpu|smoke] [--data-dir DIR]

Trains a MoC model with ``model.training.train`` on the embedded corpus (prepared into the data
directory on first use) with the Triton kernels, then the same run (same seed, weights and batches)
on the reference path for its first steps, and checks: every logged loss finite, the validation
loss lower at the end than at the start, and the first steps' training losses of the two paths
equal within ``TOLERANCE`` (relative; bf16 autocast on CUDA, fp32 on the CPU). Writes the losses,
tokens/s and, on CUDA, the peak memory to FILE.json; exits 1 when a check fails.

On a CPU the kernels run under Triton's interpreter; where that cannot run them
(``moc_kernels.backend.triton_problem()``), both runs use the reference and the JSON says why.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from moc_kernels import backend

# The model and run per size. gpu: under a minute on one H100/H200 with the kernels (8 MoC layers of
# 8 experts at d 512, 16 x 512 tokens per step, 40 steps) plus the corpus preparation and the
# kernels' first compilation at these shapes; cpu / smoke: tiny, as the interpreter is slow.
SIZES: dict[str, dict[str, Any]] = {
    "gpu": {
        "model": dict(d_model=512, n_layers=8, n_heads=8, max_seq_len=512, n_experts=8, top_k=2, multiple_of=64),
        "run": dict(batch_size=16, max_steps=40, warmup_steps=8, eval_interval=20, eval_batches=4),
        "compare_steps": 5,
    },
    # cpu: 4 steps of 2 x 32 tokens; the kernels' run takes ~40 s of its 75 s limit under Triton 3.9's
    # interpreter on the 2-core VM (8 steps of 4 x 32 tokens took ~140 s: the CPU dry run timed out).
    "cpu": {
        "model": dict(d_model=32, n_layers=1, n_heads=2, max_seq_len=32, n_experts=4, top_k=2, multiple_of=16),
        "run": dict(batch_size=2, max_steps=4, warmup_steps=1, eval_interval=4, eval_batches=1),
        "compare_steps": 3,
    },
    # smoke (the suite's dry run of the protocol): the plumbing, at the least that still checks something:
    # 2 steps, both compared with the reference path, the validation loss at step 0 and step 2.
    "smoke": {
        "model": dict(d_model=32, n_layers=1, n_heads=2, max_seq_len=16, n_experts=4, top_k=2, multiple_of=16),
        "run": dict(batch_size=2, max_steps=2, warmup_steps=1, eval_interval=2, eval_batches=1),
        "compare_steps": 2,
    },
}
# Relative difference allowed between the two paths' losses over the first steps. fp32: the model
# test's bound (tests/test_model_kernels.py). bf16: both paths round activations to 8 bits of
# mantissa (2^-8 ~ 4e-3) through every layer, and an optimizer step amplifies differences.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
VOCAB = 2048  # the embedded corpus' tokenizer of configs/tiny.yaml (its data_dir is reused)


def _config(size: str, data_dir: Path, out_dir: Path, kernels: str, steps: int):
    from model.train_config import config_from_dict

    spec = SIZES[size]
    raw = {
        "model": {**spec["model"], "vocab_size": VOCAB, "ffn_hidden_multiplier": 2.0},
        **spec["run"],
        "max_steps": steps,
        "data_dir": str(data_dir),
        "corpus": "stdlib",
        "val_fraction": 0.1,
        "out_dir": str(out_dir),
        "learning_rate": 2e-3,
        "log_interval": 1,
        "save_interval": 10**9,  # the run's end still saves once (tests the path, costs one write)
        "keep_checkpoints": 1,
        "export_hf": False,
        "wandb_project": None,
        "dtype": "auto",  # bf16 autocast on CUDA, fp32 on the CPU: as a real run
        "kernels": kernels,
        "seed": 1234,
    }
    return config_from_dict(raw)


def _losses(history: list[dict[str, Any]]) -> list[float]:
    return [r["loss/main"] for r in history if "loss/main" in r]


def run(size: str, data_dir: Path) -> dict[str, Any]:
    """Both runs and the checks; the returned dict is what FILE.json holds."""
    from model.training import train

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    problem = backend.triton_problem()
    kernels = "triton" if problem is None else "reference"
    steps, compare = SIZES[size]["run"]["max_steps"], SIZES[size]["compare_steps"]
    with tempfile.TemporaryDirectory() as tmp:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        kernel_run = train(_config(size, data_dir, Path(tmp) / "kernels", kernels, steps), progress=False)
        peak = torch.cuda.max_memory_allocated() if cuda else None
        reference_run = train(_config(size, data_dir, Path(tmp) / "reference", "reference", compare), progress=False)
    losses, reference = _losses(kernel_run.history), _losses(reference_run.history)
    diffs = [abs(a - b) / abs(b) for a, b in zip(losses[:compare], reference)]
    rates = [r["tokens_per_sec"] for r in kernel_run.history if "tokens_per_sec" in r][2:]  # after warm-up
    checks = {
        "finite": all(math.isfinite(x) for x in losses + reference),
        "loss_fell": kernel_run.val_loss_end < kernel_run.val_loss_start,
        "paths_agree": len(diffs) == compare and max(diffs) <= TOLERANCE[dtype],
    }
    return {
        "size": size,
        "device": "cuda" if cuda else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "kernels": kernels,
        "kernels_note": problem,
        "model": SIZES[size]["model"],
        "steps": steps,
        "losses": losses,
        "reference_losses": reference,
        "max_relative_difference": max(diffs) if diffs else None,
        "tolerance": TOLERANCE[dtype],
        "val_loss_start": kernel_run.val_loss_start,
        "val_loss_end": kernel_run.val_loss_end,
        "tokens_per_s": statistics.median(rates) if rates else None,
        "peak_memory_bytes": peak,
        "wall_s": kernel_run.wall_seconds,
        "checks": checks,
        "ok": all(checks.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file for the losses, rates and checks")
    parser.add_argument("--size", choices=sorted(SIZES), help="default: gpu on CUDA, else cpu")
    parser.add_argument(
        "--data-dir", default=f"data_cache/stdlib_docs_v{VOCAB}", help="prepared (or to be prepared) token shards"
    )
    args = parser.parse_args(argv)
    size = args.size or ("gpu" if torch.cuda.is_available() else "cpu")
    result = run(size, Path(args.data_dir))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    losses = result["losses"]
    print(
        f"training check ({size}, {result['device']}, {result['dtype']}, kernels {result['kernels']}): "
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
        f"val {result['val_loss_start']:.4f} -> {result['val_loss_end']:.4f}, "
        f"first {len(result['reference_losses'])} steps vs reference: max relative difference "
        f"{result['max_relative_difference']:.2e} (tolerance {result['tolerance']:.0e}); checks {result['checks']}"
    )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
