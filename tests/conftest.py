"""Shared test helpers: the one tolerance table and the relative-error measure (DESIGN §4); how the
whole suite spreads over the machine's cores, and the costs it skips (Triton's interpreter: its overflow
sanitizer, and swapping the language in again at every helper call; lm-eval's environment report
collected again for every evaluation)."""

import dataclasses
import functools
import os

import pytest
import torch
from torch.utils import collect_env

import moc_kernels  # noqa: F401  first: on a machine without CUDA it switches Triton to its interpreter
from moc_kernels import backend

# ||out - ref|| / ||ref|| computed in fp64. One table for every kernel test.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, name: str = "") -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten output?)"
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.3e} > {TOLERANCE[dtype]:.0e} ({dtype})"


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """``python -m pytest`` with no path (the whole suite, from ``testpaths``) runs on every core: one
    pytest-xdist worker per core, idle workers stealing queued tests. A run naming its tests, one given
    ``-n``, or a machine without pytest-xdist (the GPU image) runs in this process, as pytest does."""
    whole_suite = config.args_source == pytest.Config.ArgsSource.TESTPATHS
    if not (whole_suite and config.pluginmanager.has_plugin("xdist")) or config.option.numprocesses is not None:
        return
    if os.environ.get("PYTEST_XDIST_WORKER") or config.option.usepdb:
        return
    config.option.numprocesses = "auto"
    config.option.dist = "worksteal"
    if config.pluginmanager.has_plugin("benchmark"):  # tests/ holds no benchmark: no "disabled" warning
        config.option.benchmark_disable = True


def pytest_configure(config: pytest.Config) -> None:
    """In an xdist worker, torch (and every process a test starts) gets this worker's share of the
    cores: two workers with two intra-op threads each on two cores would make every op wait for a
    descheduled thread."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
        # A command a test starts is not an xdist worker (pytest-benchmark would disable itself there).
        for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
            os.environ.pop(name, None)


def _interpreter_without_overflow_sanitizer() -> None:
    """Triton's interpreter checks every int32 ``+``, ``-`` and ``*`` of a kernel for overflow (redone in
    int64 and compared with int32's range), a debug check compiled kernels run only with ``debug=True``:
    a quarter to a third of the interpreter's time in these tests. Off here: it changes no result (the
    check sits beside the op), and at the tests' shapes (the largest tensor a kernel gets in the whole
    suite has 150,771 elements) no offset a kernel computes comes near 2^31, so it could only fire on an
    offset so wrong that reading through it fails the comparison with the reference anyway. Overflow
    at real sizes is read from the compiled IR (``tests/test_kernels_report.py``: the fusion's 64-bit
    offsets). Processes the tests start, and a Triton without the option, keep Triton's default."""
    from triton.runtime import interpreter

    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if dataclasses.is_dataclass(options) and hasattr(options, "sanitize_overflow"):
        builder.options = dataclasses.replace(options, sanitize_overflow=False)


def _interpreter_patches_the_language_once_per_launch() -> None:
    """Triton's interpreter swaps ``triton.language``'s builtins for interpreted ones when a launch
    starts (``inspect.getmembers`` over its modules, 100s of attributes) and restores them when it
    ends; it also redoes the swap at every call of a ``@triton.jit`` helper inside the kernel, for
    every program of the grid, though the launch in progress already swapped the same modules (the
    kernel tests: 172 -> 151 user CPU-s without it). Here a helper call inside a launch skips the swap when
    the modules it sees (``triton.language`` / ``triton.language.core``) are among those the launch
    swapped, so it runs on the very functions it would have installed again; anything else (a call
    outside a launch, a helper seeing another module) takes Triton's path. Results are unchanged:
    the same interpreted builtins run, only their reinstallation is skipped."""
    from triton import language as tl
    from triton.runtime import interpreter

    if not all(hasattr(interpreter, name) for name in ("_patch_lang", "GridExecutor", "InterpretedFunction")):
        return  # another Triton: its own path
    launch, device_call = interpreter.GridExecutor.__call__, interpreter.InterpretedFunction.__call__
    launched: list[set] = []  # for each launch in progress, the modules it swapped

    def swapped_modules(fn) -> set:
        return {v for v in fn.__globals__.values() if v is tl or v is tl.core}

    def run_launch(self, *args, **kwargs):
        launched.append(swapped_modules(self.fn))
        try:
            return launch(self, *args, **kwargs)
        finally:
            launched.pop()

    def call_helper(self, *args, **kwargs):
        if not (launched and swapped_modules(self.fn) <= launched[-1]):
            return device_call(self, *args, **kwargs)
        patch_lang, interpreter._patch_lang = interpreter._patch_lang, lambda fn: None  # the launch's swap is in place
        try:
            return device_call(self, *args, **kwargs)
        finally:
            interpreter._patch_lang = patch_lang

    interpreter.GridExecutor.__call__, interpreter.InterpretedFunction.__call__ = run_launch, call_helper


if backend.interpreting() and backend.triton_problem() is None:  # the test process runs kernels interpreted
    _interpreter_without_overflow_sanitizer()
    _interpreter_patches_the_language_once_per_launch()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``triton`` skip, with the reason, where the kernels cannot run (no triton, or an
    interpreter that cannot run them on this CPU); on a GPU they always run."""
    problem = backend.triton_problem()
    if problem is None:
        return
    skip = pytest.mark.skip(reason=f"Triton kernels cannot run here: {problem}")
    for item in items:
        if item.get_closest_marker("triton"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _kernel_tests_on_the_gpu(request):
    """Tests marked ``triton`` create their tensors on the GPU where there is one (the compiled
    kernels), else on the CPU (Triton's interpreter): both through the default device."""
    if not (torch.cuda.is_available() and request.node.get_closest_marker("triton")):
        yield
        return
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device("cpu")


@pytest.fixture(scope="session", autouse=True)
def _environment_report_once():
    """lm-eval's ``simple_evaluate`` puts torch's environment report in every results dict, and
    collecting it runs ``pip list`` and a dozen other commands (~0.6 s of CPU, ~40 times a suite).
    The environment stays the same while the tests run: each process collects it once."""
    original = collect_env.get_pretty_env_info
    collect_env.get_pretty_env_info = functools.cache(original)
    yield
    collect_env.get_pretty_env_info = original


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
