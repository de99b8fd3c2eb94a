"""Benchmarks and GPU-readiness evidence (DESIGN §4).

    pytest benchmarks/ --benchmark-only [--benchmark-json RESULTS.json]   timings (any machine)
    python -m benchmarks.summary RESULTS.json                              markdown table + PNG chart
    python -m benchmarks.cost_model                                        FLOPs / HBM bytes (a model)
    python -m benchmarks.activation_memory                                 bytes saved for backward
    bash benchmarks/run_gpu.sh [OUTDIR]                                    all of it on a CUDA machine

Not collected by the plain ``python -m pytest`` of the test suite (pyproject's testpaths is ``tests``).
"""
