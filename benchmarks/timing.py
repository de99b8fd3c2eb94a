"""How every benchmark case is timed: one helper, so CPU and CUDA cases are measured the same way.

CUDA: ``triton.testing.do_bench`` median (CUDA events, L2 flushed before every call) after its own
warm-up, cycling through several input sets so no call reuses the previous one's inputs; the
pytest-benchmark stats of the same case (a few synchronised rounds) are kept too, but the summary
reads ``extra_info["median_ms"]``. CPU: pytest-benchmark's own rounds (``time.perf_counter``) after
one warm-up call (10 to 30 rounds, about 1 s per case), again cycling through the input sets.

``BENCH_SMOKE=1`` (what CI sets: ``BENCH_SMOKE=1 pytest benchmarks/ --benchmark-only``): every case
runs its timed function exactly once, with no warm-up and no CUDA timer, so a broken benchmark fails
fast; its "median" is that one call, labelled so, and is not a figure to report.
"""

from __future__ import annotations

import functools
import itertools
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

CPU_MIN_ROUNDS, CPU_MAX_ROUNDS, CPU_TARGET_S = 10, 30, 1.0
SMOKE_ENV = "BENCH_SMOKE"
SMOKE_TIMER = "smoke run (BENCH_SMOKE=1): one call, not a timing"


def smoke() -> bool:
    """Whether ``BENCH_SMOKE`` asks for the smoke mode (each case run once: CI's check that it works)."""
    return os.environ.get(SMOKE_ENV, "") not in ("", "0")


@functools.cache
def cpu_model_name() -> str:
    """``lscpu``'s "Model name" (falls back to ``platform.processor()``)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "cpu": cpu_model_name(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def measure(
    benchmark: Any,
    fn: Callable[..., Any],
    input_sets: Sequence[tuple],
    device: torch.device,
    tokens: int,
    **extra: Any,
) -> None:
    """Time ``fn(*input_sets[i])`` cycling over i; record the median and the machine in extra_info.

    ``tokens``: tokens one call processes (the summary turns medians into tokens/s).
    """
    cycle = itertools.cycle(input_sets)

    def call() -> Any:
        return fn(*next(cycle))

    benchmark.extra_info.update(extra)
    benchmark.extra_info.update(machine_info(device))
    benchmark.extra_info["tokens"] = tokens
    benchmark.extra_info["input_sets"] = len(input_sets)
    if smoke():
        benchmark.pedantic(call, rounds=1, warmup_rounds=0, iterations=1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        benchmark.extra_info["median_ms"] = float(benchmark.stats.stats.median * 1e3)
        benchmark.extra_info["timer"] = SMOKE_TIMER
        return
    if device.type == "cuda":
        import triton.testing

        for _ in range(2 * len(input_sets)):  # compile / autotune outside the timed region
            call()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        benchmark.extra_info["peak_memory_bytes"] = peak
        benchmark.extra_info["peak_working_bytes"] = peak - baseline
        median_ms = triton.testing.do_bench(call, warmup=25, rep=200, return_mode="median")
        benchmark.extra_info["median_ms"] = float(median_ms)
        benchmark.extra_info["timer"] = "triton.testing.do_bench median (CUDA events, L2 flushed)"

        def call_synced() -> None:
            call()
            torch.cuda.synchronize(device)

        benchmark.pedantic(call_synced, rounds=5, warmup_rounds=1, iterations=1)
    else:
        # The warm-up call also sizes the run: cheap cases get more rounds (a median of 5 rounds of a
        # sub-millisecond case on a shared machine is mostly noise), each case about CPU_TARGET_S.
        start = time.perf_counter()
        call()
        once = time.perf_counter() - start
        rounds = int(min(CPU_MAX_ROUNDS, max(CPU_MIN_ROUNDS, CPU_TARGET_S / max(once, 1e-6))))
        benchmark.pedantic(call, rounds=rounds, warmup_rounds=0, iterations=1)
        benchmark.extra_info["median_ms"] = float(benchmark.stats.stats.median * 1e3)
        benchmark.extra_info["timer"] = f"time.perf_counter median of {rounds} rounds after 1 warm-up call"


def forward_backward(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` followed by the gradients of all its differentiable inputs (no ``.grad`` accumulation).

    The gradient of every floating output is a fixed random tensor passed as the last input, so the
    backward does real work on every element (a ``.sum()`` would give a broadcast gradient).
    """

    def run(*args: Any) -> Any:
        *inputs, grads = args
        outputs = fn(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None]
        wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        return torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs])

    return run
