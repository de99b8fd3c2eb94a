"""The training run's configuration: one dataclass, YAML loading and ``--set key=value`` overrides.

A YAML file holds the run's keys at the top level and the model's keys (``model.config.ModelConfig``)
under ``model:``. Everything a user can get wrong (unknown key, wrong type, impossible value,
malformed YAML) raises :class:`ConfigError`, a ``ValueError`` whose message is one line naming the
bad value and what would be valid; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user error in the configuration (one line, no traceback needed)."""


DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DISTRIBUTED = ("ddp", "fsdp")
KERNELS = ("auto", "triton", "reference")
CORPORA = ("stdlib",)


@dataclass
class TrainConfig:
    """Every key of a training run (top level of the YAML). ``model`` holds the ModelConfig keys."""

    model: dict[str, Any] = field(default_factory=dict)
    # data
    data_dir: str = "data_cache/stdlib_docs"
    corpus: str | None = None  # "stdlib": prepare the embedded corpus into data_dir when it is missing
    val_fraction: float = 0.05  # only used when the corpus is prepared automatically
    # output
    out_dir: str = "out/run"
    # optimisation
    learning_rate: float = 3e-4
    min_lr: float | None = None  # end of the cosine decay; None -> learning_rate / 10
    warmup_steps: int = 100
    max_steps: int = 1000
    batch_size: int = 16  # sequences per micro-batch per rank
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step per rank
    weight_decay: float = 0.1  # on matrices only (ndim >= 2); norms, biases never decay
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # evaluation, logging, checkpoints
    eval_interval: int = 200
    eval_batches: int = 20  # validation micro-batches (fixed windows, the same every evaluation)
    log_interval: int = 10
    save_interval: int = 1000
    keep_checkpoints: int = 3
    export_hf: bool = True  # export out_dir/hf at the end
    wandb_project: str | None = None  # None disables W&B
    wandb_run_name: str | None = None
    # execution
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    compile: bool = False
    cpu_threads: int | None = None  # torch intra-op threads on CPU; None keeps torch's default (all cores)
    distributed: str = "ddp"  # ddp | fsdp (only used under torchrun with more than one process)
    kernels: str | None = None  # overrides model.kernels when set (auto | triton | reference)

    def validate(self) -> None:
        """Raise ConfigError for impossible values (types are checked when the config is built)."""
        # NaN compares False with everything, so every range check below would let it through: refuse
        # non-finite floats first (weight_decay=.nan trained and exported a NaN model; grad_clip=.nan
        # meant no clipping).
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        positive = ("learning_rate", "max_steps", "batch_size", "gradient_accumulation_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("eval_interval", "eval_batches", "log_interval", "save_interval", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError(f"cpu_threads must be >= 1 or null, got {self.cpu_threads!r}")
        for name in ("warmup_steps", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.learning_rate:
            raise ConfigError(f"min_lr must be in [0, learning_rate={self.learning_rate}], got {self.min_lr!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        choices = {
            "device": DEVICES,
            "dtype": DTYPES,
            "distributed": DISTRIBUTED,
            "kernels": KERNELS + (None,),
            "corpus": CORPORA + (None,),
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                shown = ", ".join("null" if v is None else v for v in valid)
                raise ConfigError(f"{name} must be one of {shown}, got {getattr(self, name)!r}")

    @property
    def lr_floor(self) -> float:
        return self.learning_rate / 10 if self.min_lr is None else self.min_lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Type checking of values read from YAML or --set (YAML scalars: int, float, bool, str, null)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return {"int": "integer", "float": "number", "bool": "true/false", "str": "string"}.get(
            tp.__name__, tp.__name__
        )
    return str(tp)


# PyYAML follows YAML 1.1, where "3e-4" (no dot) is a string, not a float. Users write it anyway.
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; int is accepted for float. Raises ConfigError."""
    if isinstance(value, str) and tp in (int, float) and _NUMBER.match(value.strip()):
        value = float(value)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError:
                pass
        expected = " or ".join(_type_name(o) for o in options)
        raise ConfigError(f"{key} must be {expected}, got {value!r}")
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of keys, got {value!r}")
        return value
    if tp is float:
        # bool is an int in Python: "lr: true" must not become 1.0
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # "max_steps: 6e5" is a float in YAML; accept it when it is a whole number
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")


def _did_you_mean(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(sorted(valid))})"


def _check_keys(section: str, given: dict[str, Any], hints: dict[str, Any]) -> dict[str, Any]:
    """Type-check a mapping of keys against dataclass type hints. ``section`` prefixes error messages."""
    out = {}
    for key, value in given.items():
        full = f"{section}{key}"
        if not isinstance(key, str) or key not in hints:
            raise ConfigError(
                f"unknown {section.rstrip('.') or 'config'} key {full!r}" + _did_you_mean(str(key), list(hints))
            )
        out[key] = _coerce(full, value, hints[key])
    return out


def _model_hints() -> dict[str, Any]:
    from model.config import ModelConfig  # imported lazily: the model package may import torch-heavy modules

    return typing.get_type_hints(ModelConfig)


def build_model_config(model_keys: dict[str, Any], kernels: str | None = None):
    """ModelConfig from the ``model:`` mapping (type-checked here, validated by ModelConfig)."""
    from model.config import ModelConfig

    keys = _check_keys("model.", model_keys, _model_hints())
    if kernels is not None:
        keys["kernels"] = kernels
    try:
        cfg = ModelConfig.from_dict(keys)
        cfg.validate()
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from e
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.n_experts=4"`` -> (["model", "n_experts"], 4). The value is parsed as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set expects key=value with a non-empty dotted key, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r} as YAML") from e
    if isinstance(value, (dict, list)):
        raise ConfigError(f"--set {key}: expected a scalar value, got {raw!r}")
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to the raw YAML mapping (nested keys create mappings as needed)."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a mapping")
            node = child
        node[path[-1]] = value
    return raw


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)  # resolve "<<" merge keys first: a merged key may be overridden
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: construct_mapping says so in YAML's words
            break
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first at line {first.start_mark.line + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping. A missing file, not UTF-8, malformed YAML, a duplicate key, a non-mapping: ConfigError."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
        ) from e
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror}") from e
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {str(path)!r} is malformed YAML{where}: {problem}") from e
    if data is None:
        raise ConfigError(f"config file {str(path)!r} is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must be a mapping of keys, got {type(data).__name__}")
    return data


def config_from_dict(raw: dict[str, Any], check_model: bool = True) -> TrainConfig:
    """TrainConfig from a raw mapping: unknown keys (with a did-you-mean), types and values checked."""
    hints = typing.get_type_hints(TrainConfig)
    keys = _check_keys("", raw, hints)
    keys["model"] = dict(keys.get("model") or {})
    cfg = TrainConfig(**keys)
    cfg.validate()
    if check_model:
        build_model_config(cfg.model, cfg.kernels)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None, check_model: bool = True) -> TrainConfig:
    """Load a YAML config, apply ``--set`` overrides, check everything. Raises ConfigError."""
    raw = apply_overrides(load_yaml(path), overrides or [])
    return config_from_dict(raw, check_model=check_model)
