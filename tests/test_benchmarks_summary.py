"""benchmarks/summary.py on a synthetic pytest-benchmark JSON: table, ratios, chart, user errors."""

import json
import sys

import pytest

from benchmarks import summary


def _bench(op, impl, median_ms, pass_="fwd", tokens=1000):
    extra = {"op": op, "impl": impl, "pass_": pass_, "median_ms": median_ms, "tokens": tokens, "shape": "tiny"}
    extra.update(cpu="Test CPU", torch_threads=1, torch="x", timer="perf_counter")
    return {"name": f"test_{op}[{impl}]", "stats": {"median": median_ms / 1e3}, "extra_info": extra}


@pytest.fixture
def results(tmp_path):
    data = {
        "benchmarks": [
            _bench("expert_swiglu", "reference", 4.0),
            _bench("expert_swiglu", "compile", 2.0),
            _bench("expert_swiglu", "triton", 1.0),
            _bench("moc_layer_functional", "reference", 3.0, "fwd+bwd"),
            _bench("moc_layer_functional", "loop", 6.0, "fwd+bwd"),
        ]
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    return path


def test_table_ratios_and_chart(results, tmp_path):
    markdown = summary.build(results, tmp_path / "out", report=False, cost_model=False)
    row = next(line for line in markdown.splitlines() if line.startswith("| expert_swiglu"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # reference, compile, triton ms; best tokens/s = 1000 tokens / 1 ms; triton/reference, triton/compile
    assert cells[2:5] == ["4.000", "2.000", "1.000"]
    assert cells[6] == "1,000,000" and cells[7] == "0.25" and cells[8] == "0.50"
    loop_row = next(line for line in markdown.splitlines() if line.startswith("| moc_layer_functional"))
    assert loop_row.rstrip(" |").endswith("0.50")  # reference/loop
    assert (tmp_path / "out" / "summary.md").read_text() == markdown
    assert (tmp_path / "out" / "benchmarks.png").stat().st_size > 1000


def test_compile_report_from_saved_json(results, tmp_path):
    report = tmp_path / "report.json"
    row = {"kernel": "_k", "config": "c", "arch": "sm_90", "registers": 96, "spill_bytes": 0}
    report.write_text(json.dumps([{**row, "shared_bytes": 1024, "tensor_cores": "wgmma"}]))
    markdown = summary.build(results, tmp_path, cost_model=False, report_json=report)
    assert "| _k | c | sm_90 | 96 | 0 | 1024 | wgmma |" in markdown


@pytest.mark.parametrize("content", [None, "not json", json.dumps({"benchmarks": []}), json.dumps([1, 2])])
def test_bad_results_exit_2_with_one_line(tmp_path, capsys, content):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    assert summary.main([str(path), "--no-report", "--no-cost-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def _fusion_results(tmp_path, single_ms: float, all_ms: float, suffix: str = ".json"):
    shape = "N=512 D=64 E=8 F=192 H=2 k=2 V=50257 M=2 float32"
    cases = [("log_softmax", "torch", 10.0), ("entropy", "reference", single_ms), ("all", "reference", all_ms)]
    records = []
    for case, impl, ms in cases:
        bench = _bench(summary.FUSION_OP, impl, ms, pass_=case, tokens=512)
        bench["extra_info"]["shape"] = shape
        records.append(bench)
    path = tmp_path / f"fusion{suffix}"
    if suffix == ".jsonl":  # what BENCH_STREAM writes, a skipped case among them
        lines = [json.dumps(r) for r in records] + [json.dumps({"name": "x", "skipped": "CUDA only"})]
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text(json.dumps({"benchmarks": records}))
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_check_passes_within_the_bounds(tmp_path, capsys, suffix):
    path = _fusion_results(tmp_path, single_ms=19.9, all_ms=29.9, suffix=suffix)  # 1.99x and 2.99x
    assert summary.main([str(path), "--no-report", "--no-cost-model", "--check"]) == 0
    assert "ok     fusion_vs_log_softmax[all] reference / log_softmax = 2.99x" in capsys.readouterr().out


@pytest.mark.parametrize(("single_ms", "all_ms", "missed"), [(20.1, 25.0, "entropy"), (15.0, 30.1, "all")])
def test_check_fails_when_a_bound_is_missed(tmp_path, capsys, single_ms, all_ms, missed):
    path = _fusion_results(tmp_path, single_ms, all_ms)
    assert summary.main([str(path), "--no-report", "--no-cost-model", "--check"]) == 1
    err = capsys.readouterr().err
    assert err.count("bound missed") == 1 and f"[{missed}]" in err


def test_check_without_fusion_cases_is_a_user_error(results, capsys):
    assert summary.main([str(results), "--no-report", "--no-cost-model", "--check"]) == 2
    assert "no fusion_vs_log_softmax cases" in capsys.readouterr().err


def test_ceiling_fractions_from_the_cost_model(tmp_path):
    """The baseline reads 2 x 512 x 50257 fp32 logits and writes fp32: 411.7 MB; at 10 ms that is
    41.2 GB/s, 41% of a 100 GB/s ceiling (the FLOP ceiling does not bind: no FLOPs)."""
    rows, _ = summary.collect(summary.load_results(_fusion_results(tmp_path, 15.0, 25.0)))
    table = summary.timings_table(rows, {"flops_per_s": 1e12, "bytes_per_s": 100e9})
    baseline = next(line for line in table.splitlines() if "| log_softmax |" in line)
    assert "10.000 (41%)" in baseline


def test_no_chart_without_matplotlib(results, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    markdown = summary.build(results, tmp_path / "out", report=False, cost_model=False)
    assert "no chart: matplotlib is not installed" in markdown
    assert not (tmp_path / "out" / "benchmarks.png").exists()


def test_a_case_may_state_its_own_work():
    """A training step states its FLOPs (no cost-model row): 2e12 FLOPs in 40 ms at a 1e14 FLOP/s
    ceiling is 50%; a row with neither gets no fraction."""
    step = _bench("training_step", "reference", 40.0, pass_="step")
    step["extra_info"]["work_flops"] = 2e12
    rows, _ = summary.collect({"benchmarks": [step, _bench("kotara_evaluation", "reference", 5.0)]})
    table = summary.timings_table(rows, {"flops_per_s": 1e14, "bytes_per_s": 1e12})
    assert "| training_step | step | 40.000 (50%) |" in table
    assert "| kotara_evaluation | fwd | 5.000 |" in table
