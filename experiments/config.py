"""The experiment config (``experiments/configs/*.yaml``): its keys, their checks, and each run's TrainConfig."""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

from experiments.common import ExperimentError

REQUIRED = object()  # marks a config key without a default

# Top-level keys of an experiment config and their defaults.
CONFIG_KEYS: dict[str, Any] = {
    "out_dir": REQUIRED,
    "results_dir": None,  # null: out_dir
    "seeds": REQUIRED,
    "vocab_size": REQUIRED,
    "val_fraction": 0.1,
    "full_corpus": True,
    "document_unit": "module",
    "max_eval_batches": None,
    "data_dir": None,
    "train": REQUIRED,
    "arms": REQUIRED,
    "fusion": REQUIRED,
}
FUSION_KEYS: dict[str, Any] = {
    "arm": "dense",
    "seed": 1,
    "test_fraction": 0.15,
    "primary_strategy": "entropy",
    "max_text_chars": None,
    "train": {},
    "domains": REQUIRED,
    "kotara": {},
    "own_tokenizers": False,  # also train each domain model on its own BPE and fuse them per word (DESIGN §5c)
}
KOTARA_KEYS = {"max_length", "stride", "batch_size", "device", "dtype", "kernels"}
DOCUMENT_UNITS = ("module", "docstring")


# --------------------------------------------------------------------------------------------------
# Config


def _check_keys(section: str, given: dict[str, Any], valid: dict[str, Any] | set[str]) -> None:
    for key in given:
        if key not in valid:
            close = difflib.get_close_matches(str(key), list(valid), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; valid keys: {', '.join(sorted(valid))}"
            raise ExperimentError(f"unknown {section} key {key!r}{hint}")


def load_experiment(path: str | Path) -> dict[str, Any]:
    """Read and check an experiment config (see experiments/configs/cpu.yaml for every key).

    Model and training keys are checked by building every run's ``TrainConfig`` up front
    (:func:`check_runs`), so a typo fails before the first minute of training, not after.
    """
    from model.train_config import ConfigError, load_yaml

    try:
        raw = load_yaml(path)
    except ConfigError as e:
        raise ExperimentError(str(e)) from e
    _check_keys("experiment", raw, CONFIG_KEYS)
    for key, default in CONFIG_KEYS.items():
        if default is REQUIRED and key not in raw:
            raise ExperimentError(f"experiment config {str(path)!r} lacks the required key {key!r}")
    cfg = {k: copy.deepcopy(raw.get(k, default)) for k, default in CONFIG_KEYS.items()}
    _check_top_level(cfg)
    _check_arms(cfg["arms"])
    cfg["fusion"] = _checked_fusion(cfg["fusion"], cfg["arms"])
    return cfg


def _check_top_level(cfg: dict[str, Any]) -> None:
    """Seeds, vocabulary, splits and the shared train: section."""
    seeds = cfg["seeds"]
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise ExperimentError(f"seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ExperimentError(f"seeds must be distinct, got {seeds!r}")
    if not isinstance(cfg["vocab_size"], int) or cfg["vocab_size"] < 257:
        raise ExperimentError(f"vocab_size must be an integer >= 257, got {cfg['vocab_size']!r}")
    if not isinstance(cfg["val_fraction"], (int, float)) or not 0 < cfg["val_fraction"] < 1:
        raise ExperimentError(f"val_fraction must be in (0, 1), got {cfg['val_fraction']!r}")
    if cfg["document_unit"] not in DOCUMENT_UNITS:
        raise ExperimentError(f"document_unit must be one of {', '.join(DOCUMENT_UNITS)}, got {cfg['document_unit']!r}")
    meb = cfg["max_eval_batches"]
    if meb is not None and (not isinstance(meb, int) or meb < 1):
        raise ExperimentError(f"max_eval_batches must be null or an integer >= 1, got {meb!r}")
    if not isinstance(cfg["train"], dict):
        raise ExperimentError(f"train must be a mapping of TrainConfig keys, got {cfg['train']!r}")
    for reserved in ("data_dir", "out_dir", "seed", "corpus"):
        if reserved in cfg["train"]:
            raise ExperimentError(f"train.{reserved} is set by the script per run; remove it from the config")


def _check_arms(arms: Any) -> None:
    """Each arm is a mapping of model keys; ``match_flops_of`` names another arm that matches nothing itself."""
    if not isinstance(arms, dict) or not arms:
        raise ExperimentError(f"arms must be a mapping of arm name -> model keys, got {arms!r}")
    for name, keys in arms.items():
        if not isinstance(keys, dict):
            raise ExperimentError(f"arm {name!r} must be a mapping of model keys, got {keys!r}")
        target = keys.get("match_flops_of")
        if target is not None:
            if target not in arms or target == name:
                raise ExperimentError(
                    f"arm {name!r}: match_flops_of must name another arm ({', '.join(arms)}), got {target!r}"
                )
            if arms[target].get("match_flops_of") is not None:
                raise ExperimentError(f"arm {name!r}: match_flops_of {target!r} must be an arm without match_flops_of")


def _checked_fusion(fusion: Any, arms: dict[str, Any]) -> dict[str, Any]:
    """The fusion: section with its defaults filled in, after checking every key and value."""
    if not isinstance(fusion, dict):
        raise ExperimentError(f"fusion must be a mapping, got {fusion!r}")
    _check_keys("fusion", fusion, FUSION_KEYS)
    if "domains" not in fusion:
        raise ExperimentError("fusion lacks the required key 'domains'")
    fusion = {k: copy.deepcopy(fusion.get(k, d)) for k, d in FUSION_KEYS.items()}
    if fusion["arm"] not in arms:
        raise ExperimentError(f"fusion.arm must be one of the arms ({', '.join(arms)}), got {fusion['arm']!r}")
    if arms[fusion["arm"]].get("match_flops_of") is not None:
        raise ExperimentError(f"fusion.arm {fusion['arm']!r} must be an arm without match_flops_of")
    mtc = fusion["max_text_chars"]
    if mtc is not None and (not isinstance(mtc, int) or mtc < 100):
        raise ExperimentError(f"fusion.max_text_chars must be null or an integer >= 100, got {mtc!r}")
    if not 0 < fusion["test_fraction"] < 1:
        raise ExperimentError(f"fusion.test_fraction must be in (0, 1), got {fusion['test_fraction']!r}")
    from moc_kernels import STRATEGIES

    if fusion["primary_strategy"] not in STRATEGIES:
        raise ExperimentError(
            f"fusion.primary_strategy must be one of {', '.join(STRATEGIES)}, got {fusion['primary_strategy']!r}"
        )
    domains = fusion["domains"]
    if not isinstance(domains, dict) or len(domains) != 2:
        raise ExperimentError(f"fusion.domains must map exactly 2 domain names to module lists, got {domains!r}")
    for name, modules in domains.items():
        if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
            raise ExperimentError(f"fusion.domains.{name} must be a non-empty list of module names, got {modules!r}")
    a, b = (set(m) for m in domains.values())
    if a & b:
        raise ExperimentError(f"fusion.domains overlap: {', '.join(sorted(a & b))} in both")
    if not isinstance(fusion["kotara"], dict):
        raise ExperimentError(f"fusion.kotara must be a mapping, got {fusion['kotara']!r}")
    _check_keys("fusion.kotara", fusion["kotara"], KOTARA_KEYS)
    return fusion


def model_config(model_keys: dict[str, Any]):
    """The validated ModelConfig of an arm's model keys; ExperimentError for a bad key."""
    from model.train_config import ConfigError, build_model_config

    try:
        return build_model_config(model_keys)
    except ConfigError as e:
        raise ExperimentError(str(e)) from e


def arm_model_keys(cfg: dict[str, Any], vocab_size: int | None = None) -> dict[str, dict[str, Any]]:
    """Model keys of every arm (``train.model`` merged with the arm's), iso-FLOP widths solved.

    An arm with ``match_flops_of`` (a dense or MoE arm) gets the ``ffn_hidden_multiplier`` whose
    training FLOPs per token best match the named arm's (:func:`experiments.flops.iso_flop_width`).

    ``vocab_size``: the prepared tokenizer's size (a BPE trained on little text can stop short of
    the ``vocab_size`` asked for); default the config's.
    """
    from experiments.flops import iso_flop_width

    base = dict(cfg["train"].get("model") or {}) | {"vocab_size": vocab_size or cfg["vocab_size"]}
    keys = {}
    for name, arm in cfg["arms"].items():
        keys[name] = base | {k: v for k, v in arm.items() if k != "match_flops_of"}
    for name, arm in cfg["arms"].items():
        target = arm.get("match_flops_of")
        if target is not None:
            try:
                wide = iso_flop_width(model_config(keys[target]), model_config(keys[name]))
            except ValueError as e:
                raise ExperimentError(f"arm {name!r}: {e}") from e
            keys[name]["ffn_hidden_multiplier"] = wide.ffn_hidden_multiplier
    return keys


def run_config(
    cfg: dict[str, Any],
    model_keys: dict[str, Any],
    data_dir: Path,
    out_dir: Path,
    seed: int,
    eval_batches: int,
    export: bool,
    overrides: dict[str, Any] | None = None,
):
    """The ``TrainConfig`` of one run; raises ExperimentError for a bad key or value."""
    from model.train_config import ConfigError, config_from_dict

    raw = {k: v for k, v in cfg["train"].items() if k != "model"} | (overrides or {})
    max_steps = raw.get("max_steps", 1000)
    raw |= {
        "model": model_keys,
        "data_dir": str(data_dir),
        "corpus": None,
        "out_dir": str(out_dir),
        "seed": seed,
        "eval_batches": eval_batches,
        "wandb_project": None,  # a results run must not depend on (or wait for) W&B
        "export_hf": export,
        "save_interval": max_steps,  # one checkpoint, at the end
        "keep_checkpoints": 1,
    }
    try:
        return config_from_dict(raw)
    except ConfigError as e:
        raise ExperimentError(f"train: {e}") from e


def check_runs(cfg: dict[str, Any]) -> None:
    """Build every run's TrainConfig once with placeholder paths: a bad key fails before any training."""
    keys = arm_model_keys(cfg)
    for name in keys:
        run_config(cfg, keys[name], Path("."), Path("."), cfg["seeds"][0], 1, False)
    fusion = cfg["fusion"]
    run_config(cfg, keys[fusion["arm"]], Path("."), Path("."), fusion["seed"], 1, True, fusion["train"])
