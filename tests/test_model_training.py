"""model.training / model.checkpoint: the loop learns, resume is exact, NaN stops, 2 gloo ranks = 1 process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from model.checkpoint import atomic_save, latest_checkpoint, list_checkpoints, prune
from model.data import prepare
from model.train_config import TrainConfig, config_from_dict
from model.training import NonFiniteLossError, lr_at, make_optimizer, train

REPO = Path(__file__).resolve().parents[1]
WORDS = [
    "the",
    "a",
    "expert",
    "router",
    "token",
    "layer",
    "model",
    "loss",
    "gradient",
    "attention",
    "returns",
    "value",
    "list",
    "string",
    "file",
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is fastest, and never spins against the other test processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _documents(n: int = 120) -> list[str]:
    import random

    rng = random.Random(0)
    return [
        " ".join(f"The {rng.choice(WORDS)} takes a {rng.choice(WORDS)}." for _ in range(rng.randint(4, 10)))
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare(_documents(), out, vocab_size=300, val_fraction=0.2, progress=False)
    return out


def tiny_raw(data_dir: Path, out_dir: Path, **overrides) -> dict:
    """A raw config mapping for a ~30k-parameter MoC model (fast on a loaded 2-core CPU)."""
    raw = {
        "model": {
            "d_model": 32,
            "n_layers": 1,
            "n_heads": 2,
            "vocab_size": 300,
            "multiple_of": 16,
            "ffn_hidden_multiplier": 2.0,
            "max_seq_len": 16,
            "n_experts": 4,
            "top_k": 2,
            "moc_heads": 2,
        },
        "data_dir": str(data_dir),
        "out_dir": str(out_dir),
        "learning_rate": 3e-3,
        "warmup_steps": 2,
        "max_steps": 6,
        "batch_size": 4,
        "gradient_accumulation_steps": 2,
        "eval_interval": 3,
        "eval_batches": 2,
        "log_interval": 1,
        "save_interval": 3,
        "keep_checkpoints": 5,
        "export_hf": False,
        "wandb_project": None,
        "device": "cpu",
        "dtype": "float32",
    }
    for key, value in overrides.items():
        if key == "model":
            raw["model"] = raw["model"] | value
        else:
            raw[key] = value
    return raw


def losses(result) -> list[float]:
    return [r["loss/main"] for r in result.history if "loss/main" in r]


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 120))


def test_weight_decay_on_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"]) and len(decay["params"]) == 1
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # bias, norm weight and bias


def test_wandb_goes_offline_without_an_api_key(tmp_path: Path, monkeypatch):
    from model.metrics import _wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with an api.wandb.ai entry
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    mode, note = _wandb_mode()
    assert mode == "offline" and "offline" in note
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert _wandb_mode() == ("online", None)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert _wandb_mode() == ("disabled", None)


def test_runs_without_wandb_and_matplotlib(data_dir: Path, tmp_path: Path, monkeypatch, capsys):
    """Both are optional: hidden (a None entry in sys.modules makes ``import`` fail), the run still
    trains, checkpoints and logs metrics.jsonl, and says once what it skipped."""
    for name in ("wandb", "matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = config_from_dict(tiny_raw(data_dir, tmp_path, max_steps=2, eval_interval=2, wandb_project="p"))
    result = train(cfg, progress=False)
    out = capsys.readouterr().out
    assert result.steps == 2 and latest_checkpoint(tmp_path) is not None
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    assert out.count("wandb is not installed: W&B logging is off") == 1
    assert out.count("matplotlib is not installed: no loss-curve PNG") == 1
    assert not (tmp_path / "loss_curve.png").exists() and not (tmp_path / "wandb").exists()


def test_checkpoint_atomic_and_pruned(tmp_path: Path):
    for step in (1, 2, 3, 4):
        atomic_save({"step": step}, tmp_path / "checkpoints" / f"step_{step:08d}.pt")
    (tmp_path / "checkpoints" / ".step_00000005.pt.123.tmp").write_bytes(b"half")  # a crashed write
    assert latest_checkpoint(tmp_path).name == "step_00000004.pt"
    prune(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003.pt", "step_00000004.pt"]


def test_tiny_run_learns_logs_and_checkpoints(data_dir: Path, tmp_path: Path):
    cfg = config_from_dict(
        tiny_raw(data_dir, tmp_path, max_steps=30, eval_interval=15, save_interval=10, keep_checkpoints=2)
    )
    result = train(cfg, progress=False)
    assert result.steps == 30
    assert result.val_loss_end < result.val_loss_start - 1.0  # clearly learning on this repetitive text
    records = read_metrics(tmp_path)
    assert records == result.history and [r["step"] for r in records] == list(range(31))
    train_rec = records[5]
    for key in ("loss/main", "loss/aux", "perplexity", "lr", "grad_norm", "tokens_per_sec"):
        assert math.isfinite(train_rec[key]), key
    assert train_rec["perplexity"] == pytest.approx(math.exp(train_rec["loss/main"]))
    assert len(train_rec["layer0/expert_load"]) == 4 and sum(train_rec["layer0/expert_load"]) == pytest.approx(1.0)
    assert 0 <= train_rec["layer0/collab_entropy"] <= math.log(2) + 1e-6
    assert "val/loss" in records[15] and "val/perplexity" in records[30]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000020.pt", "step_00000030.pt"]
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000


def test_resume_gives_exactly_the_same_losses(data_dir: Path, tmp_path: Path):
    raw = tiny_raw(data_dir, tmp_path / "full", model={"dropout": 0.1})  # dropout: the RNG state must be restored
    full = train(config_from_dict(raw), progress=False)

    class Interrupt(Exception):
        pass

    def stop_at_4(step: int) -> None:
        if step == 4:
            raise Interrupt

    raw_cut = raw | {"out_dir": str(tmp_path / "cut")}
    with pytest.raises(Interrupt):  # steps 1-4 run, the checkpoint of step 3 is the latest
        train(config_from_dict(raw_cut), progress=False, on_step=stop_at_4)
    assert latest_checkpoint(tmp_path / "cut").name == "step_00000003.pt"
    train(config_from_dict(raw_cut), resume=True, progress=False)
    resumed = [r["loss/main"] for r in read_metrics(tmp_path / "cut") if "loss/main" in r]
    assert len(resumed) == len(losses(full)) == 6
    assert torch.equal(torch.tensor(resumed, dtype=torch.float64), torch.tensor(losses(full), dtype=torch.float64))
    assert read_metrics(tmp_path / "cut")[-1]["val/loss"] == full.history[-1]["val/loss"]


def test_resume_refuses_a_checkpoint_of_the_other_state_format(data_dir: Path, tmp_path: Path):
    """FSDP2 and plain optimizer states are keyed differently: a plain run does not resume an fsdp checkpoint."""
    from model.train_config import ConfigError

    cfg = config_from_dict(tiny_raw(data_dir, tmp_path, max_steps=1, save_interval=1))
    train(cfg, progress=False)
    path = latest_checkpoint(tmp_path)
    ckpt = torch.load(path, weights_only=False)
    ckpt["extra"]["state_format"] = "fsdp"
    atomic_save(ckpt, path)
    with pytest.raises(ConfigError, match="written by a fsdp run and this run is plain/ddp"):
        train(config_from_dict(tiny_raw(data_dir, tmp_path, max_steps=2)), resume=True, progress=False)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir: Path, tmp_path: Path, monkeypatch):
    from model.lm import LunarisLM

    original = LunarisLM.forward
    calls = {"n": 0}

    def poisoned(self, input_ids, targets=None, **kwargs):
        out = original(self, input_ids, targets, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 8:  # 2 micro-batches per step: the 5th step's loss is NaN
                out = out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(LunarisLM, "forward", poisoned)
    cfg = config_from_dict(tiny_raw(data_dir, tmp_path, save_interval=2))
    with pytest.raises(NonFiniteLossError, match="at step 5"):
        train(cfg, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002.pt", "step_00000004.pt"]
    state = torch.load(latest_checkpoint(tmp_path), weights_only=False)["model"]
    assert all(torch.isfinite(t).all() for t in state.values())


def test_two_gloo_ranks_match_one_process(data_dir: Path, tmp_path: Path):
    """``torchrun train_moe.py``, 2 CPU processes (gloo, DDP) with batch 2 each == 1 process with batch 4
    (same global batch). The trainer makes the process group and leaves it. FSDP2 (``distributed: fsdp``)
    and every FFN variant: tests/test_model_moe.py, in one launch.

    aux_loss_weight 0: the balance loss is a nonlinear function of per-batch routing statistics, so with
    it on, per-rank aux losses differ (by design, as in every data-parallel MoE) from the global one.
    """
    model = {"aux_loss_weight": 0.0}
    single = train(config_from_dict(tiny_raw(data_dir, tmp_path / "one", model=model)), progress=False)
    raw = tiny_raw(data_dir, tmp_path / "two", model=model, batch_size=2, distributed="ddp")
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(raw))
    env = os.environ | {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(REPO / "train_moe.py"), str(tmp_path / "two.yaml"), "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = [r["loss/main"] for r in read_metrics(tmp_path / "two") if "loss/main" in r]
    assert len(two) == 6
    torch.testing.assert_close(torch.tensor(two), torch.tensor(losses(single)), rtol=1e-5, atol=1e-6)
    assert proc.stdout.count("[train] done") == 1  # only rank 0 speaks
    # The checkpoint is a full state dict: it loads into a plain, single-process model.
    state = torch.load(latest_checkpoint(tmp_path / "two"), weights_only=False)["model"]
    assert all(isinstance(t, torch.Tensor) and type(t) is torch.Tensor for t in state.values())
    assert state.keys() == torch.load(latest_checkpoint(tmp_path / "one"), weights_only=False)["model"].keys()


# --------------------------------------------------------------------------------------------------
# Nothing non-finite is written; pruning deletes only what the run owns (issue 30)


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path: Path):
    from model.checkpoint import NonFiniteError, save_checkpoint

    state = {"w": torch.ones(3), "b": torch.tensor([0.0, float("inf")])}
    with pytest.raises(NonFiniteError, match="weight 'b' holds NaN/inf"):
        save_checkpoint(tmp_path, 1, state, {}, {}, {})
    assert list_checkpoints(tmp_path) == [] and not list((tmp_path / "checkpoints").glob("*"))


def test_an_export_with_non_finite_weights_is_never_written(tmp_path: Path):
    from model.checkpoint import NonFiniteError
    from model.lm import LunarisLM
    from model.train_config import build_model_config
    from model.training import export

    lm = LunarisLM(build_model_config(tiny_raw(tmp_path, tmp_path)["model"]))
    with torch.no_grad():
        lm.norm.weight[0] = float("nan")
    with pytest.raises(NonFiniteError, match="weight 'norm.weight'"):
        export(lm, tmp_path)
    assert not (tmp_path / "hf").exists()


def test_prune_deletes_only_the_checkpoints_it_is_given(tmp_path: Path):
    for step in (1, 2, 3, 4):
        atomic_save({"step": step}, tmp_path / "checkpoints" / f"step_{step:08d}.pt")
    mine = [tmp_path / "checkpoints" / f"step_{s:08d}.pt" for s in (1, 3, 4)]
    assert prune(tmp_path, keep=1, among=mine) == mine[:2]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002.pt", "step_00000004.pt"]


# --------------------------------------------------------------------------------------------------
# The training step waits for nothing (issue 27 §5)


def test_a_step_that_does_not_log_never_reads_a_device_value(data_dir: Path, tmp_path: Path):
    """No ``aten._local_scalar_dense`` (``.item()``, ``float()``, ``if tensor``) in a step that neither logs,
    evaluates nor saves: on a GPU each one drains the queue. The optimizer's own step counter is exempt: it
    is a host tensor in the CPU AdamW this test runs (CUDA's fused AdamW keeps it on the device)."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    reads: dict[int, list[str]] = {}
    phase = {"step": 0}

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                frames = traceback.extract_stack()
                if not any("torch/optim/" in f.filename.replace("\\", "/") for f in frames):
                    where = next(
                        (f for f in reversed(frames) if "/model/" in f.filename.replace("\\", "/")), frames[-2]
                    )
                    reads.setdefault(phase["step"] + 1, []).append(f"{where.name}:{where.lineno}")
            return func(*args, **(kwargs or {}))

    def next_step(done: int) -> None:
        phase["step"] = done

    raw = tiny_raw(data_dir, tmp_path, max_steps=4, log_interval=4, eval_interval=4, save_interval=4)
    with Reads():
        train(config_from_dict(raw), progress=False, on_step=next_step)
    assert reads.get(2) is None and reads.get(3) is None, reads  # steps 2 and 3 neither log, evaluate nor save
    assert reads.get(4), "the logging step reads the loss (the test sees reads where there are some)"


def test_batches_are_pinned_for_cuda_only(data_dir: Path, tmp_path: Path, monkeypatch):
    """Pinned host memory (asynchronous copies) on CUDA; a CPU run never asks for it (there is no pinned allocator)."""
    from model.data import TokenData

    asked: list[bool] = []
    original = TokenData.train_batch

    def spy(self, *args, pin_memory=False, **kwargs):
        asked.append(pin_memory)
        return original(self, *args, pin_memory=pin_memory, **kwargs)

    monkeypatch.setattr(TokenData, "train_batch", spy)
    train(config_from_dict(tiny_raw(data_dir, tmp_path, max_steps=1)), progress=False)
    assert asked == [False, False]  # two micro-batches
    if torch.cuda.is_available():
        inputs, targets = TokenData(data_dir, 16, 300).train_batch(0, 0, 0, 2, pin_memory=True)
        assert inputs.is_pinned() and targets.is_pinned()
        assert torch.equal(inputs, TokenData(data_dir, 16, 300).train_batch(0, 0, 0, 2)[0])
