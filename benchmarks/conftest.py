"""Fixtures of the benchmark suites: the device (CUDA when present) and its benchmark shape."""

from __future__ import annotations

import pytest
import torch

from benchmarks.shapes import BenchShape, shape_for


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
        where = f"CPU only ({cpu_model_name()}, {torch.get_num_threads()} threads): Triton cases are skipped"
    return [f"benchmarks on {where}; shape {shape_for(torch.device('cuda' if cuda else 'cpu')).describe()}"]
