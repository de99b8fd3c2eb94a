"""benchmarks/summary.py on a synthetic pytest-benchmark JSON: table, ratios, chart, user errors."""

import json

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
