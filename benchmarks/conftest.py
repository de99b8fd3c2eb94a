"""Fixtures of the benchmark suites: the device (CUDA when present) and its benchmark shape."""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.shapes import BenchShape, shape_for

CPU_THREADS_ENV = "BENCH_CPU_THREADS"


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
    return [f"benchmarks on {where}; shape {shape_for(torch.device('cuda' if cuda else 'cpu')).describe()}"]
