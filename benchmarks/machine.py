"""``python -m benchmarks.machine``: what a benchmark run ran on, and its two ceilings measured on the spot.

    python -m benchmarks.machine [--json FILE] [--text FILE] [--size gpu|cpu|smoke]

Facts: date, git commit, CPU, GPU (name, driver, memory, compute capability), Python and package
versions. Ceilings, measured here rather than taken from a data sheet: the bandwidth of a large
device-to-device copy (bytes read + bytes written per second) and the rate of a large matrix product
(bf16 on CUDA, fp32 on the CPU), each the median of timed repeats after a warm-up (CUDA events on a
GPU, ``time.perf_counter`` on the CPU). The summary divides achieved rates by these two numbers.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks.timing import cpu_model_name

# (copy bytes, matmul n, repeats) per size: the GPU sizes fill HBM bandwidth and tensor cores for
# milliseconds per repeat; the CPU sizes take well under a second each.
SIZES = {
    "gpu": {"copy_bytes": 2 << 30, "matmul_n": 8192, "repeats": 20},
    "cpu": {"copy_bytes": 256 << 20, "matmul_n": 1024, "repeats": 5},
    "smoke": {"copy_bytes": 16 << 20, "matmul_n": 256, "repeats": 3},
}
PACKAGES = ("torch", "triton", "transformers", "numpy", "tokenizers", "pytest", "pytest-benchmark", "pytest-xdist")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def facts() -> dict[str, Any]:
    """Everything a figure needs next to it to be reproduced or compared."""
    root = Path(__file__).resolve().parents[1]
    status = _run(["git", "-C", str(root), "status", "--porcelain"])
    info: dict[str, Any] = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": _run(["git", "-C", str(root), "rev-parse", "HEAD"]),
        "git_changed_files": None if status is None else len(status.splitlines()),
        "host": platform.node(),
        "cpu": cpu_model_name(),
        "cpu_count": torch.multiprocessing.cpu_count(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "cuda_runtime": torch.version.cuda,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["gpu_multiprocessors"] = props.multi_processor_count
        query = "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit"
        smi = _run(["nvidia-smi", query, "--format=csv,noheader"])
        if smi:
            driver, sm_clock, mem_clock, power = (field.strip() for field in smi.splitlines()[0].split(","))
            info.update(driver=driver, max_sm_clock=sm_clock, max_memory_clock=mem_clock, power_limit=power)
    return info


def _median_seconds(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` after two warm-up calls (CUDA events on a GPU)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _copy_seconds(num_bytes: int, repeats: int, device: torch.device) -> float:
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return _median_seconds(lambda: dst.copy_(src), repeats, device)


def measure_ceilings(device: torch.device, size: str) -> dict[str, Any]:
    """The copy bandwidth (bytes/s, read + write) and matrix-product rate (FLOP/s) of ``device``."""
    cfg = SIZES[size]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = cfg["matmul_n"]
    copy_s = _copy_seconds(cfg["copy_bytes"], cfg["repeats"], device)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    matmul_s = _median_seconds(lambda: torch.mm(a, b, out=out), cfg["repeats"], device)
    return {
        "bytes_per_s": 2 * cfg["copy_bytes"] / copy_s,
        "flops_per_s": 2 * n**3 / matmul_s,
        "copy": f"{cfg['copy_bytes'] / 2**20:.0f} MiB device-to-device copy, median of {cfg['repeats']}",
        "matmul": f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')} matmul, median of {cfg['repeats']}",
        "device": str(device),
    }


def format_text(info: dict[str, Any], ceilings: dict[str, Any]) -> str:
    lines = [f"{key}: {value}" for key, value in info.items() if key != "packages"]
    lines += [f"{name}: {version or 'not installed'}" for name, version in info["packages"].items()]
    lines += [
        f"ceiling, memory: {ceilings['bytes_per_s'] / 1e9:,.1f} GB/s ({ceilings['copy']})",
        f"ceiling, compute: {ceilings['flops_per_s'] / 1e12:,.2f} TFLOP/s ({ceilings['matmul']})",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.machine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the facts and ceilings here as JSON")
    parser.add_argument("--text", help="write them here as 'key: value' lines (also printed)")
    parser.add_argument("--size", choices=sorted(SIZES), help="default: gpu on CUDA, else cpu")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or ("gpu" if device.type == "cuda" else "cpu")
    info = facts()
    ceilings = measure_ceilings(device, size)
    text = format_text(info, ceilings)
    print(text, end="")
    if args.text:
        Path(args.text).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"facts": info, "ceilings": ceilings}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
