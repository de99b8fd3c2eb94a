"""Fixtures of the benchmark suites: the device (CUDA when present), its benchmark shape, and with
``BENCH_STREAM=FILE`` one JSON line per case appended to FILE as soon as the case ends (what the GPU
protocol reads: a run stopped at its time limit keeps every case it finished)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks.shapes import BenchShape, shape_for
from benchmarks.timing import SMOKE_ENV, smoke

CPU_THREADS_ENV = "BENCH_CPU_THREADS"
STREAM_ENV = "BENCH_STREAM"


@pytest.fixture(scope="session")
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    # One thread by default: on a shared, loaded machine extra intra-op threads mostly wait for a core
    # (measured by the Kotara tests: 220 ms -> 11 ms per tiny forward on the 2-core box).
    torch.set_num_threads(int(os.environ.get(CPU_THREADS_ENV, "1")))
    return torch.device("cpu")


@pytest.fixture(scope="session")
def shape(device: torch.device) -> BenchShape:
    return shape_for(device)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_report_header(config: pytest.Config) -> list[str]:
    from benchmarks.timing import cpu_model_name

    cuda = torch.cuda.is_available()
    if cuda:
        where = f"CUDA: {torch.cuda.get_device_name()}"
    else:
        threads = os.environ.get(CPU_THREADS_ENV, "1")
        where = f"CPU only ({cpu_model_name()}, {threads} torch threads): Triton cases are skipped"
    lines = [f"benchmarks on {where}; shape {shape_for(torch.device('cuda' if cuda else 'cpu')).describe()}"]
    if smoke():
        lines.append(f"{SMOKE_ENV}=1: each case runs once, no warm-up: a check that every benchmark works, not timings")
    return lines


def _stream(record: dict) -> None:
    path = os.environ.get(STREAM_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


@pytest.fixture(autouse=True)
def _stream_result(request: pytest.FixtureRequest):
    """After each timed case: its extra_info and median, in pytest-benchmark's JSON layout."""
    yield
    bench = request.node.funcargs.get("benchmark")
    stats = getattr(getattr(bench, "stats", None), "stats", None)
    if stats is not None:
        _stream({"name": request.node.nodeid, "extra_info": dict(bench.extra_info), "stats": {"median": stats.median}})


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Skipped and failed cases too, with their reason, so the summary can say what did not run."""
    if report.skipped and report.when == "setup" or report.skipped and report.when == "call":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _stream({"name": report.nodeid, "skipped": reason.removeprefix("Skipped: ")})
    elif report.failed:
        _stream({"name": report.nodeid, "failed": report.when, "error": str(report.longrepr).splitlines()[-1][:300]})
