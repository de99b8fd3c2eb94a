"""train_moe.py / model.cli: shipped configs, --set overrides, one-line user errors (exit 2), export."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from model.cli import main
from model.data import prepare
from model.train_config import ConfigError, apply_overrides, load_config, parse_override

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is fastest, and never spins against the other test processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = ["expert", "router", "token", "layer", "value", "list", "file", "string"]
    docs = [" ".join(f"The {rng.choice(words)} takes a {rng.choice(words)}." for _ in range(8)) for _ in range(80)]
    out = tmp_path_factory.mktemp("data")
    prepare(docs, out, vocab_size=280, val_fraction=0.2, progress=False)
    return out


@pytest.fixture
def config_file(data_dir: Path, tmp_path: Path) -> Path:
    raw = {
        "model": {
            "d_model": 32,
            "n_layers": 1,
            "n_heads": 2,
            "vocab_size": 280,
            "multiple_of": 16,
            "ffn_hidden_multiplier": 2.0,
            "max_seq_len": 16,
            "n_experts": 4,
            "top_k": 2,
        },
        "data_dir": str(data_dir),
        "out_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "warmup_steps": 1,
        "batch_size": 2,
        "eval_interval": 2,
        "eval_batches": 1,
        "log_interval": 1,
        "save_interval": 1,
        "export_hf": False,
        "wandb_project": None,
        "device": "cpu",
        "dtype": "float32",
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_shipped_configs_load():
    moc = load_config(REPO / "config_moc.yaml")
    m = moc.model
    assert (m["d_model"], m["n_layers"], m["n_heads"], m["vocab_size"], m["max_seq_len"]) == (768, 12, 12, 50257, 1024)
    assert (m["n_experts"], m["top_k"], m["aux_loss_weight"]) == (8, 2, 0.01)
    assert (moc.learning_rate, moc.max_steps, moc.batch_size, moc.gradient_accumulation_steps) == (3e-4, 600000, 16, 4)
    assert moc.wandb_project and moc.wandb_run_name and moc.device == "cuda"
    tiny = load_config(REPO / "configs/tiny.yaml", ["model.n_experts=2", "max_steps=100", "wandb_project=null"])
    assert tiny.model["n_experts"] == 2 and tiny.max_steps == 100 and tiny.wandb_project is None
    assert tiny.corpus == "stdlib" and tiny.device == "cpu"


def test_set_values_are_yaml_scalars():
    # YAML 1.1 reads "3e-4" as a string; the config still takes it as the number users mean.
    cfg = load_config(REPO / "configs/tiny.yaml", ["learning_rate=3e-4", "max_steps=2e3"])
    assert cfg.learning_rate == 3e-4 and cfg.max_steps == 2000 and isinstance(cfg.max_steps, int)
    assert parse_override("model.n_kv_heads=null") == (["model", "n_kv_heads"], None)
    assert parse_override("compile=true") == (["compile"], True)
    assert apply_overrides({"model": {"d_model": 8}}, ["model.top_k=1", "seed=3"]) == {
        "model": {"d_model": 8, "top_k": 1},
        "seed": 3,
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("max_steps")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["max_step=5"], "unknown config key 'max_step' (did you mean 'max_steps'?)"),
        (["model.n_layer=2"], "unknown model key 'model.n_layer' (did you mean 'n_layers'?)"),
        (["batch_size=abc"], "batch_size must be integer, got 'abc'"),
        (["learning_rate=true"], "learning_rate must be number, got True"),
        (["learning_rate=-1"], "learning_rate must be > 0, got -1.0"),
        (["model.top_k=9"], "top_k=9 must be <= n_experts=4"),
        (["dtype=fp8"], "dtype must be one of auto, float32, bfloat16, float16, got 'fp8'"),
        (["model.vocab_size=512"], "tokenized with vocab size 280 but model.vocab_size is 512"),
        (["data_dir=/nonexistent/data"], "data_dir '/nonexistent/data' not found"),
        (["seed"], "--set expects key=value"),
    ],
)
def test_user_errors_are_one_line_exit_2(config_file: Path, capsys, overrides, message):
    argv = [str(config_file)] + [a for o in overrides for a in ("--set", o)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


def test_config_file_errors(tmp_path: Path, capsys):
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: [1, 2\nmax_steps: 3\n")
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "malformed YAML at line" in err and err.count("\n") == 1
    bad.write_text("- a\n- b\n")
    assert main([str(bad)]) == 2
    assert "must be a mapping" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a machine without CUDA")
def test_cuda_asked_for_but_absent(config_file: Path, capsys):
    assert main([str(config_file), "--set", "device=cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_debug_shows_the_exception(config_file: Path):
    with pytest.raises(ConfigError, match="did you mean"):
        main([str(config_file), "--set", "max_step=5", "--debug"])


def test_script_error_has_no_traceback(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "train_moe.py", str(tmp_path / "nope.yaml")], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "nope.yaml" in proc.stderr


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--set", "--kernels", "--resume", "--export-only", "--no-progress", "--debug"):
        assert flag in help_text
    with pytest.raises(SystemExit) as exit_info:
        main(["x.yaml", "--kernels", "cuda"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'cuda'" in capsys.readouterr().err


def test_train_resume_and_export_load_with_transformers(config_file: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import model  # registers the lunaris_moc model type with AutoModelForCausalLM

    assert main([str(config_file), "--no-progress", "--kernels", "reference"]) == 0
    out = tmp_path / "out"
    # --resume of a finished run: nothing left to do, same checkpoint; then export on demand
    assert main([str(config_file), "--no-progress", "--resume"]) == 0
    assert main([str(config_file), "--export-only"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out / "hf")
    tok = AutoTokenizer.from_pretrained(out / "hf")
    assert len(tok) == 280
    ckpt = torch.load(out / "checkpoints" / "step_00000002.pt", weights_only=False)
    lm = model.LunarisLM(model.ModelConfig.from_dict(ckpt["config"]["model_config"]))
    lm.load_state_dict(ckpt["model"])
    lm.eval()
    ids = torch.tensor([tok.encode("The expert takes a token.")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, lm(ids).logits)
