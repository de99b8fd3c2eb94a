"""experiments/: the smoke run end to end, the FLOPs count behind the iso-FLOP arms, config errors, verdicts."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from experiments import run as exp_run
from experiments.common import CONFIG_DIR, SMOKE_CONFIG, ExperimentError, split_held_out
from experiments.config import arm_model_keys, check_runs, load_experiment
from experiments.flops import iso_flop_width, train_flops_per_token
from experiments.report import RESULTS_MD, RESULTS_PNG, arm_roles, compare_arms, paired_difference
from moc_kernels import STRATEGIES
from model.config import ModelConfig
from model.info import flops_per_token
from model.lm import LunarisLM

REPO = Path(__file__).resolve().parent.parent
# Claim 1's arms in every shipped config (issue 20): the baselines the claim needs and MoC's two ablations,
# then (issue 28) MoC at a top-k MoE's cost, at MoC's E/k/F and at its FLOPs; the CPU run and the smoke run
# also keep the no-collaboration ablation as first run (it removed the RMSNorm before Wo too).
SEVEN_ARMS = ["dense", "moc", "dense_iso_flops", "moe", "moe_iso_flops", "moc_no_context", "moc_no_collab"]
SPARSE_ARMS = ["moc_sparse", "moc_sparse_iso_flops", "moc_preview", "moc_preview_iso_flops"]
ARMS = {
    "cpu.yaml": SEVEN_ARMS + ["moc_no_collab_v1"] + SPARSE_ARMS,
    "smoke.yaml": SEVEN_ARMS + ["moc_no_collab_v1"] + SPARSE_ARMS,
    "gpu.yaml": SEVEN_ARMS + SPARSE_ARMS,
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, dict]:
    """One ``python -m experiments.run --smoke`` into a temporary directory (shared by the tests below)."""
    real = REPO / "experiments" / RESULTS_MD
    before = real.stat().st_mtime_ns if real.exists() else None
    out = tmp_path_factory.mktemp("smoke")
    assert exp_run.main(["--smoke", "--out-dir", str(out)]) == 0
    after = real.stat().st_mtime_ns if real.exists() else None
    assert before == after, "the smoke run must never touch experiments/RESULTS.md"
    return out, json.loads((out / "results.json").read_text())


def test_smoke_claim1_every_arm_and_seed(smoke):
    out, results = smoke
    cfg = load_experiment(SMOKE_CONFIG)
    arms = results["claim1"]["arms"]
    assert list(arms) == list(cfg["arms"]) == ARMS["smoke.yaml"]
    for name, arm in arms.items():
        assert arm["seeds"] == cfg["seeds"], name
        assert len(arm["val_ppl"]) == len(cfg["seeds"])
        assert all(math.isfinite(p) and p > 1 for p in arm["val_ppl"]), (name, arm["val_ppl"])
        assert arm["val_ppl_std"] is not None and arm["val_ppl_std"] >= 0
        assert arm["val_ppl_min"] <= arm["val_ppl_mean"] <= arm["val_ppl_max"]
    # Same tokens for every arm; each iso-FLOP arm keeps its kind and is within 5% of MoC's FLOPs/token.
    assert len({a["train_tokens"] for a in arms.values()}) == 1
    moc = arms["moc"]
    kinds = {name: a["ffn_kind"] for name, a in arms.items()}
    assert kinds == {
        "dense": "dense",
        "moc": "moc",
        "dense_iso_flops": "dense",
        "moe": "moe",
        "moe_iso_flops": "moe",
        "moc_no_context": "moc",
        "moc_no_collab": "moc",
        "moc_no_collab_v1": "moc",
    } | dict.fromkeys(SPARSE_ARMS, "moc_sparse")
    pairs = (("dense_iso_flops", "dense"), ("moe_iso_flops", "moe"))
    for iso, base in pairs + (("moc_sparse_iso_flops", "moc_sparse"), ("moc_preview_iso_flops", "moc_preview")):
        assert abs(arms[iso]["forward_flops_per_token"] / moc["forward_flops_per_token"] - 1) < 0.05, iso
        assert arms[iso]["ffn_hidden"] > arms[base]["ffn_hidden"], iso
    # MoE at MoC's E/k/F: the same expert weights, k/E of the expert FLOPs, fewer active than total parameters.
    moe = arms["moe"]
    assert moe["ffn_hidden"] == moc["ffn_hidden"] and moe["forward_flops_per_token"] < moc["forward_flops_per_token"]
    assert moe["active_parameters"] < moe["parameters"] and moc["active_parameters"] == moc["parameters"]
    # Each ablation drops its modules: fewer parameters and FLOPs than full MoC, switches recorded.
    for name, switch in (("moc_no_context", "router_context"), ("moc_no_collab", "collaboration")):
        a = arms[name]
        assert a[switch] is False and moc[switch] is True, name
        assert a["parameters"] < moc["parameters"] and a["forward_flops_per_token"] < moc["forward_flops_per_token"]
    # The corrected ablation keeps RMSNorm(S) (one weight vector per layer more than the first one).
    keeps, first = arms["moc_no_collab"], arms["moc_no_collab_v1"]
    assert keeps["ablation_keeps_norm"] is True and first["ablation_keeps_norm"] is False
    assert keeps["parameters"] - first["parameters"] == 32  # the RMSNorm's weight, D = 32, in the one layer
    # Sparse MoC: k of the E experts, so fewer FLOPs than MoC and fewer active than total parameters.
    for name in ("moc_sparse", "moc_preview"):
        a = arms[name]
        assert a["forward_flops_per_token"] < moc["forward_flops_per_token"] and a["ffn_hidden"] == moc["ffn_hidden"]
        assert a["active_parameters"] < a["parameters"]


def test_smoke_claim2_every_text_and_strategy(smoke):
    out, results = smoke
    c2 = results["claim2"]
    assert set(c2["evaluations"]) == {"mixed", "web only", "devtools only"}
    for label, ev in c2["evaluations"].items():
        assert ev["tokens"] > 0 and ev["bytes"] > 0
        assert set(ev["models"]) == {"a", "b"}
        assert all(math.isfinite(m["ppl"]) for m in ev["models"].values()), label
        per_token_posteriors = {"mixture_bayes", "mixture_switch"}  # Kotara's, not kernel strategies
        assert set(ev["strategies"]) == set(STRATEGIES) | per_token_posteriors, label
        for s, v in ev["strategies"].items():
            assert math.isfinite(v["ppl"]), (label, s)
            assert sum(v["mean_weights"]) == pytest.approx(1.0, abs=1e-4), (label, s)
        assert 0 <= ev["similarity"]["top1_agreement"] <= 1
    # Held-out modules are disjoint from the training modules and the mixed text has both domains'.
    for name, d in c2["domains"].items():
        assert d["test_modules"] and d["train_modules"] >= 1, name
    mixed = set(c2["evaluations"]["mixed"]["modules"])
    assert mixed == {m for d in c2["domains"].values() for m in d["test_modules"]}


def test_smoke_results_md_has_every_row(smoke):
    out, results = smoke
    md = (out / RESULTS_MD).read_text()
    assert "## Summary" in md and results["command"] in md
    for name in results["claim1"]["arms"]:
        assert f"| `{name}` |" in md, name
    # The generated verdicts: MoC against each baseline, each ablation against full MoC, wall time per arm.
    summary = md.split("## Summary")[1].split("## Setup")[0]
    for other in ("dense", "dense_iso_flops", "moe", "moe_iso_flops"):
        assert f"`{other}` at " in summary, other
    for name in ("moc_no_context", "moc_no_collab", "moc_no_collab_v1"):
        assert f"(`{name}`), MoC's val PPL was" in summary and "difference of means" in summary, name
    assert "the RMSNorm before `Wo` (the ablation as first run" in summary
    # Each sparse arm's verdicts against the dense and MoE arms, at equal tokens and at MoC's FLOPs.
    for name in SPARSE_ARMS:
        assert f"(`{name}`, at MoC's" in summary, name
        for other in ("dense", "moe", "dense_iso_flops", "moe_iso_flops"):
            assert f"| `{name}` | `{other}` |" in md, (name, other)
    assert "| `moc_preview` | `moc_sparse` |" in md and "| `moc_preview_iso_flops` | `moc_sparse_iso_flops` |" in md
    assert "Wall time per run (mean over seeds, this machine): `dense`" in md
    for label in results["claim2"]["evaluations"]:
        section = md.split(f"### Held-out text: {label} ")[1].split("###")[0]
        for s in STRATEGIES:
            assert f"fused {s}" in section, (label, s)
    # Numbers in the markdown are the ones in results.json (rounded as printed).
    dense = results["claim1"]["arms"]["dense"]
    assert f"{dense['val_ppl_mean']:.2f}" in md
    assert (out / RESULTS_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_reuse_reads_back_identical_runs(smoke, capsys):
    """--reuse keeps the finished runs and prepared data (no retraining) and reproduces their numbers."""
    out, results = smoke
    again = out / "again"
    assert exp_run.main(["--smoke", "--out-dir", str(out), "--results-dir", str(again), "--reuse"]) == 0
    log = capsys.readouterr().out
    runs = len(ARMS["smoke.yaml"]) * len(results["config"]["seeds"]) + 2  # claim 1, then the two domain models
    assert "[train]" not in log and log.count("--reuse: keeping the finished run") == runs
    second = json.loads((again / "results.json").read_text())
    assert second["claim1"]["arms"] == results["claim1"]["arms"]
    for label, ev in results["claim2"]["evaluations"].items():
        for s, v in ev["strategies"].items():
            assert second["claim2"]["evaluations"][label]["strategies"][s]["ppl"] == pytest.approx(v["ppl"]), (label, s)


def test_arms_trains_only_those_and_keeps_the_others_runs_by_their_model_keys(smoke, tmp_path, capsys):
    """``--arms``: only the named arms train; the others' runs come from results.json under the arm whose
    model keys they were trained with, read with their meaning then: results written before issue 28 called
    the first no-collaboration ablation ``moc_no_collab`` (no ablation_keeps_norm key)."""
    out, results = smoke
    old = json.loads(json.dumps(results))
    v1 = old["claim1"]["arms"].pop("moc_no_collab_v1")
    del old["claim1"]["arms"]["moc_no_collab"]
    v1["model"].pop("ablation_keeps_norm")
    old["claim1"]["arms"]["moc_no_collab"] = v1
    old["claim1"]["runs"] = [
        r | {"arm": "moc_no_collab"} if r["arm"] == "moc_no_collab_v1" else r
        for r in old["claim1"]["runs"]
        if r["arm"] != "moc_no_collab"
    ]
    merged_dir = tmp_path / "merged"
    merged_dir.mkdir()
    (merged_dir / "results.json").write_text(json.dumps(old))
    argv = ["--smoke", "--out-dir", str(out), "--results-dir", str(merged_dir), "--reuse", "--arms", "moc_no_collab"]
    assert exp_run.main(argv) == 0
    log = capsys.readouterr().out
    assert "claim 1: training moc_no_collab seed" in log and "training moc_sparse" not in log
    merged = json.loads((merged_dir / "results.json").read_text())
    arms = merged["claim1"]["arms"]
    assert list(arms) == ARMS["smoke.yaml"] and merged["reused"]["arms_trained"] == ["moc_no_collab"]
    assert arms["moc_no_collab_v1"]["val_ppl"] == results["claim1"]["arms"]["moc_no_collab_v1"]["val_ppl"]
    assert arms["moc_no_collab_v1"]["reused_from_arm"] == "moc_no_collab"
    assert arms["moc_no_collab"]["val_ppl"] == results["claim1"]["arms"]["moc_no_collab"]["val_ppl"]
    assert merged["claim2"] == results["claim2"]
    assert "relabelled: `moc_no_collab` as `moc_no_collab_v1`" in (merged_dir / "RESULTS.md").read_text()
    assert exp_run.main(["--smoke", "--out-dir", str(out), "--results-dir", str(merged_dir), "--arms", "nope"]) == 2
    assert "--arms: unknown arm(s) nope" in capsys.readouterr().err


def test_report_without_matplotlib_writes_the_tables_and_says_so(smoke, tmp_path, monkeypatch, capsys):
    from experiments.report import write_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    paths = write_report(smoke[1], tmp_path)
    assert sorted(p.name for p in paths) == ["RESULTS.md", "results.json"]
    assert not (tmp_path / "results.png").exists()
    markdown = (tmp_path / "RESULTS.md").read_text()
    assert "results.png" not in markdown and "## Summary" in markdown
    assert "matplotlib is not installed" in capsys.readouterr().err


@pytest.mark.parametrize(
    "keys",
    [
        {"n_experts": 0},
        {"n_experts": 4, "top_k": 2},
        {"n_experts": 3, "top_k": 1, "n_kv_heads": 1},
        {"n_experts": 4, "top_k": 2, "ffn": "moe"},
        {"n_experts": 3, "top_k": 3, "ffn": "moe"},
        {"n_experts": 4, "top_k": 2, "router_context": False},
        {"n_experts": 4, "top_k": 2, "collaboration": False},
        {"n_experts": 4, "top_k": 2, "router_context": False, "collaboration": False},
        {"n_experts": 4, "top_k": 2, "collaboration": False, "ablation_keeps_norm": False},
        {"n_experts": 4, "top_k": 2, "ffn": "moc_sparse", "router_context": False},
        {"n_experts": 4, "top_k": 2, "ffn": "moc_sparse", "router_context": False, "collaboration": False},
        {"n_experts": 3, "top_k": 2, "ffn": "moc_sparse", "router_context": "preview", "preview_width": 8},
        {
            "n_experts": 4,
            "top_k": 3,
            "ffn": "moc_sparse",
            "router_context": "preview",
            "preview_hidden": 5,
            "preview_width": 12,
            "preview_heads": 3,
        },
    ],
    ids=[
        "dense",
        "moc",
        "moc-gqa-k1",
        "moe",
        "moe-k=E",
        "moc-no-context",
        "moc-no-collab",
        "moc-neither",
        "moc-no-collab-v1",
        "sparse",
        "sparse-no-collab",
        "preview",
        "preview-r5-p12-h3",
    ],
)
def test_flops_match_flop_counter(keys):
    """model.info's count equals torch's count of every matrix product in a real forward.

    FlopCounterMode does not see two terms: SDPA's CPU kernel (the causal attention core, 2 products
    over (T+1)/2 keys on average) and the expert layers' weighted sum of the k outputs (an elementwise
    product and a sum, 2*k*D); everything else must agree exactly. For MoE that includes the sparse
    expert pass (routed_swiglu's reference, one GEMM per expert over its rows): k of the E experts.
    """
    config = ModelConfig(
        d_model=32, n_layers=2, n_heads=2, vocab_size=96, multiple_of=16, max_seq_len=16, kernels="reference", **keys
    )
    lm = LunarisLM(config)
    tokens = torch.randint(0, config.vocab_size, (2, 16))
    with FlopCounterMode(display=False) as counter:
        lm(tokens)
    analytic = flops_per_token(config, seq_len=16)
    unseen = config.n_layers * 2 * 2 * config.d_model * (16 + 1) / 2
    if config.has_experts:
        unseen += config.n_layers * 2 * config.top_k * config.d_model
    assert counter.get_total_flops() / tokens.numel() == analytic["total"] - unseen
    assert train_flops_per_token(config, 16) == 3 * analytic["total"]


ISO_BASES = {
    "dense": {"n_experts": 0},
    "moe": {"ffn": "moe"},
    "sparse": {"ffn": "moc_sparse", "router_context": False},
    "preview": {"ffn": "moc_sparse", "router_context": "preview", "preview_width": 16},  # r = F/16 widens too
}


@pytest.mark.parametrize("kind", list(ISO_BASES))
def test_iso_flop_width_matches_moc_within_one_width_step(kind):
    moc = ModelConfig(d_model=128, n_layers=2, n_heads=4, vocab_size=2048, multiple_of=32, max_seq_len=128, n_experts=4)
    base = ModelConfig(**(moc.to_dict() | ISO_BASES[kind]))
    wide = iso_flop_width(moc, base)
    assert wide.ffn == base.ffn and wide.n_experts == base.n_experts and wide.ffn_hidden % wide.multiple_of == 0
    assert wide.ffn_hidden > base.ffn_hidden
    want = flops_per_token(moc)["total"]
    # FLOPs of one multiple_of of F (with the preview's r = F/16 that follows it)
    one_step = dataclasses.replace(wide, ffn_hidden_multiplier=(wide.ffn_hidden + 31.5) * 3 / 256)
    step = flops_per_token(one_step)["total"] - flops_per_token(wide)["total"]
    assert abs(flops_per_token(wide)["total"] - want) <= step / 2
    with pytest.raises(ValueError, match="dense or MoE base"):
        iso_flop_width(moc, moc)


def test_compare_arms_verdicts():
    def arm(ppls):
        return {"val_ppl_mean": sum(ppls) / len(ppls), "val_ppl_min": min(ppls), "val_ppl_max": max(ppls)}

    assert compare_arms({"m": arm([10, 11]), "d": arm([12, 13])}, "m", "d")["verdict"] == "beat"
    assert compare_arms({"m": arm([10, 12.5]), "d": arm([12, 13])}, "m", "d")["verdict"] == "lower mean"
    assert compare_arms({"m": arm([13, 14]), "d": arm([12, 13])}, "m", "d")["verdict"] == "did not beat"


def test_paired_difference_is_per_seed_and_says_whether_every_seed_agrees():
    def arm(ppls, seeds=(1, 2, 3)):
        return {"val_ppl": list(ppls), "seeds": list(seeds), "val_ppl_mean": sum(ppls) / len(ppls)}

    # Overlapping ranges, but every seed of the ablation is worse than the same seed of MoC.
    arms = {"moc": arm([10, 14, 12]), "abl": arm([11, 15, 12.5])}
    d = paired_difference(arms, "abl", "moc")
    assert d["per_seed"] == {1: 1, 2: 1, 3: 0.5} and d["agree"] == "worse"
    assert d["mean_diff"] == pytest.approx(2.5 / 3) and d["std_diff"] == pytest.approx(math.sqrt(1 / 12))
    assert paired_difference({"moc": arm([10, 14]), "abl": arm([9, 13])}, "abl", "moc")["agree"] == "better"
    mixed = paired_difference({"moc": arm([10, 14, 12]), "abl": arm([11, 13, 12.5])}, "abl", "moc")
    assert mixed["agree"] == "mixed"
    # Seeds are matched by value, not by position.
    shuffled = {"moc": arm([10, 14], seeds=(1, 2)), "abl": arm([15, 9], seeds=(2, 1))}
    assert paired_difference(shuffled, "abl", "moc")["per_seed"] == {2: 1, 1: -1}


def test_arm_roles_finds_moc_its_baselines_and_ablations():
    cfg = load_experiment(SMOKE_CONFIG)
    keys = arm_model_keys(cfg)
    arms = {}
    for name, k in keys.items():
        mc = ModelConfig.from_dict(k)
        kind = "moc" if mc.is_moc else "moe" if mc.is_moe else "moc_sparse" if mc.is_moc_sparse else "dense"
        arms[name] = {"ffn_kind": kind, "is_moc": mc.is_moc, "router_context": mc.router_context}
        arms[name] |= {"collaboration": mc.collaboration, "matches_flops_of": cfg["arms"][name].get("match_flops_of")}
    roles = arm_roles(arms)
    assert roles["moc"] == "moc"
    assert [n for n, _ in roles["same_tokens"]] == ["dense", "moe"]
    assert [n for n, _ in roles["iso_flops"]] == ["dense_iso_flops", "moe_iso_flops"]
    assert roles["ablations"] == ["moc_no_context", "moc_no_collab", "moc_no_collab_v1"]
    assert roles["sparse"] == SPARSE_ARMS


def test_split_held_out_is_deterministic_and_two_sided():
    modules = [(f"pkg/mod{i}.py", "pkg", ["doc"]) for i in range(12)]
    train, test = split_held_out(modules, 0.25)
    assert train and test and len(train) + len(test) == 12
    again = split_held_out(list(reversed(modules)), 0.25)[1]
    assert {m[0] for m in again} == {m[0] for m in test}  # by path hash, not by order
    with pytest.raises(ExperimentError, match="at least 2 modules"):
        split_held_out(modules[:1], 0.25)


@pytest.mark.parametrize(
    "edit, message",
    [
        (("seeds", []), "seeds must be a non-empty list"),
        (("sedes", [1]), "did you mean 'seeds'"),
        (("arms", {"dense": {"n_experts": 0}, "wide": {"match_flops_of": "nope"}}), "match_flops_of must name"),
        (("train", {"model": {"d_modle": 32}, "max_steps": 2}), "did you mean 'd_model'"),
        (("train", {"model": {"d_model": 32, "n_heads": 2}, "max_stpes": 2}), "did you mean 'max_steps'"),
        (("arms", {"dense": {"n_experts": 0}, "moe": {"n_experts": 4, "ffn": "moee"}}), "did you mean 'moe'"),
        (("arms", {"dense": {"n_experts": 0}, "abl": {"n_experts": 0, "collaboration": False}}), "MoC ablation"),
        (
            (
                "arms",
                {"dense": {"n_experts": 0}, "moc": {"n_experts": 4}, "w": {"n_experts": 4, "match_flops_of": "dense"}},
            ),
            "needs a dense or MoE base",
        ),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, edit, message):
    import yaml

    raw = yaml.safe_load(SMOKE_CONFIG.read_text())
    key, value = edit
    raw[key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert exp_run.main(["--config", str(path), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["cpu.yaml", "gpu.yaml", "smoke.yaml"])
def test_shipped_configs_are_valid(name):
    """Every shipped config loads and every run's TrainConfig builds (no training)."""
    cfg = load_experiment(CONFIG_DIR / name)
    check_runs(cfg)
    keys = arm_model_keys(cfg)
    assert list(keys) == ARMS[name]
    assert cfg["seeds"] == ([1, 2] if name == "smoke.yaml" else [1, 2, 3])
    if name != "smoke.yaml":  # the real runs never write their results into out/
        assert not str(cfg["results_dir"]).startswith("out")
