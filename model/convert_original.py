"""``python -m model.convert_original CKPT --out DIR``: a checkpoint of the original LunarisCodex-MoC code -> ours.

Writes, for the same function (the original's logits, to fp32 rounding):
  * ``DIR/checkpoints/step_00000000.pt``: a weights-only checkpoint of ours (no optimizer state).
    ``python train_moe.py DIR/config.yaml --resume`` (after setting ``data_dir``) starts from these
    weights at step 0 with a fresh AdamW and the config's warmup + schedule; the original's step is
    kept in the checkpoint's ``extra["original_step"]`` for the record;
  * ``DIR/config.yaml``: the model keys that hold these weights exactly, and ``out_dir: DIR``;
  * ``DIR/hf``: the Hugging Face export (``AutoModelForCausalLM``), reloaded once to check its logits.

The original's model is ours with four differences, each held by a ModelConfig key or by the
conversion: RMSNorm eps 1e-5 (``norm_eps``); biases in the router and collab attentions, which are
``torch.nn.MultiheadAttention`` there (``moc_attn_bias``); its FFN-width rounding
(``ffn_hidden_rule: original``); rotary embeddings on interleaved pairs (2j, 2j+1) where ours rotates
(j, j + dh/2) -- the rows of every q and k head are permuted here instead, which rotates the same
pairs by the same angles and leaves every q.k dot product unchanged, so the model needs no switch.
Its auxiliary loss is not converted: training goes on with ours (see the README).

The checkpoint is read with ``torch.load(weights_only=True)``: classes of the original code that it
pickled (its config dataclass) become inert placeholders holding their fields, so the original code
need not be importable and nothing in the file is executed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from model.checkpoint import atomic_save, checkpoint_path, list_checkpoints
from model.config import ModelConfig
from model.lm import LunarisLM
from model.outputs import describe_unreadable, ensure_writable_dir
from model.train_config import ConfigError, build_model_config, load_yaml

EXIT_USER_ERROR = 2
# The original's own defaults (its LunarisCodexConfig), used for keys its config leaves out.
ORIGINAL_DEFAULTS: dict[str, Any] = {
    "d_model": 768,
    "n_layers": 12,
    "n_heads": 12,
    "n_kv_heads": 12,
    "vocab_size": 50257,
    "multiple_of": 256,
    "ffn_hidden_multiplier": 4.0,
    "max_seq_len": 1024,
    "rope_theta": 10000.0,
    "dropout": 0.0,
    "n_experts": 8,
    "top_k": 2,
    "aux_loss_weight": 0.01,
    "router_temperature": 1.0,
}
# Prefixes torch.compile (_orig_mod.) and DDP (module.) put in front of the original's keys.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
STATE_DICT_KEYS = ("model", "model_state_dict", "state_dict")  # where a training checkpoint keeps the weights


class ConvertError(ValueError):
    """A checkpoint or config that cannot be converted (one line, names the key or file)."""


# --------------------------------------------------------------------------------------------------
# The mapping: one row per tensor of ours. "{i}" is the layer, "{e}" the expert: a source with "{e}"
# is every expert's tensor stacked on a new first axis. Rows apply to every model, or to MoC / dense
# FFNs only. Our keys are LunarisLM's; the original's are its LunarisCodex's without wrapper prefixes.


def _rope_rows(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows (h, 2j + p) -> (h, p * dh/2 + j): the original's interleaved rotary pairs become our halves.

    weight: [heads * dh, D] (a q or k projection) -> same shape and dtype.
    """
    rows, dim = weight.shape
    return weight.view(rows // head_dim, head_dim // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def _in_proj(part: int) -> Callable[[torch.Tensor, ModelConfig], torch.Tensor]:
    """Slice ``part`` (0 q, 1 k, 2 v) of a MultiheadAttention ``in_proj_weight`` [3D, D] / ``in_proj_bias`` [3D]."""
    return lambda stacked, cfg: stacked[part * cfg.d_model : (part + 1) * cfg.d_model]


def _experts_w13(w1: torch.Tensor, w3: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """w1, w3: [E, F, D] (nn.Linear weights) -> our packed w13 [E, D, 2F] (x @ w13[e] = [x w1^T, x w3^T])."""
    return torch.cat((w1.transpose(1, 2), w3.transpose(1, 2)), dim=2)


_COPY = lambda t, cfg: t  # noqa: E731
_ROPE = lambda t, cfg: _rope_rows(t, cfg.head_dim)  # noqa: E731
_TRANSPOSE_EXPERTS = lambda t, cfg: t.transpose(1, 2)  # noqa: E731  w2 [E, D, F] -> ours [E, F, D]

_H = "transformer.h.{i}."
_MOC = _H + "feed_forward."
# (applies to, our key, original key(s), how)
MAPPING: tuple[tuple[str, str, tuple[str, ...], Callable[..., torch.Tensor]], ...] = (
    ("all", "tok_embeddings.weight", ("transformer.wte.weight",), _COPY),
    ("all", "lm_head.weight", ("transformer.wte.weight",), _COPY),  # tied in both models
    ("all", "norm.weight", ("transformer.ln_f.weight",), _COPY),
    ("all", "layers.{i}.attention_norm.weight", (_H + "attention_norm.weight",), _COPY),
    ("all", "layers.{i}.attention.wq.weight", (_H + "attention.q_proj.weight",), _ROPE),
    ("all", "layers.{i}.attention.wk.weight", (_H + "attention.k_proj.weight",), _ROPE),
    ("all", "layers.{i}.attention.wv.weight", (_H + "attention.v_proj.weight",), _COPY),
    ("all", "layers.{i}.attention.wo.weight", (_H + "attention.o_proj.weight",), _COPY),
    ("all", "layers.{i}.ffn_norm.weight", (_H + "ffn_norm.weight",), _COPY),
    ("dense", "layers.{i}.ffn.w1.weight", (_H + "feed_forward.w1.weight",), _COPY),
    ("dense", "layers.{i}.ffn.w3.weight", (_H + "feed_forward.w3.weight",), _COPY),
    ("dense", "layers.{i}.ffn.w2.weight", (_H + "feed_forward.w2.weight",), _COPY),
    ("moc", "layers.{i}.ffn.w13", (_MOC + "experts.{e}.w1.weight", _MOC + "experts.{e}.w3.weight"), _experts_w13),
    ("moc", "layers.{i}.ffn.w2", (_MOC + "experts.{e}.w2.weight",), _TRANSPOSE_EXPERTS),
    ("moc", "layers.{i}.ffn.router_attn.q_proj.weight", (_MOC + "router_self_attn.in_proj_weight",), _in_proj(0)),
    ("moc", "layers.{i}.ffn.router_attn.k_proj.weight", (_MOC + "router_self_attn.in_proj_weight",), _in_proj(1)),
    ("moc", "layers.{i}.ffn.router_attn.v_proj.weight", (_MOC + "router_self_attn.in_proj_weight",), _in_proj(2)),
    ("moc", "layers.{i}.ffn.router_attn.q_proj.bias", (_MOC + "router_self_attn.in_proj_bias",), _in_proj(0)),
    ("moc", "layers.{i}.ffn.router_attn.k_proj.bias", (_MOC + "router_self_attn.in_proj_bias",), _in_proj(1)),
    ("moc", "layers.{i}.ffn.router_attn.v_proj.bias", (_MOC + "router_self_attn.in_proj_bias",), _in_proj(2)),
    ("moc", "layers.{i}.ffn.router_attn.o_proj.weight", (_MOC + "router_self_attn.out_proj.weight",), _COPY),
    ("moc", "layers.{i}.ffn.router_attn.o_proj.bias", (_MOC + "router_self_attn.out_proj.bias",), _COPY),
    ("moc", "layers.{i}.ffn.router_norm.weight", (_MOC + "router_norm.weight",), _COPY),
    ("moc", "layers.{i}.ffn.gate.weight", (_MOC + "router_gate.weight",), _COPY),
    ("moc", "layers.{i}.ffn.gate.bias", (_MOC + "router_gate.bias",), _COPY),
    ("moc", "layers.{i}.ffn.collab_attn.q_proj.weight", (_MOC + "collab_cross_attn.in_proj_weight",), _in_proj(0)),
    ("moc", "layers.{i}.ffn.collab_attn.k_proj.weight", (_MOC + "collab_cross_attn.in_proj_weight",), _in_proj(1)),
    ("moc", "layers.{i}.ffn.collab_attn.v_proj.weight", (_MOC + "collab_cross_attn.in_proj_weight",), _in_proj(2)),
    ("moc", "layers.{i}.ffn.collab_attn.q_proj.bias", (_MOC + "collab_cross_attn.in_proj_bias",), _in_proj(0)),
    ("moc", "layers.{i}.ffn.collab_attn.k_proj.bias", (_MOC + "collab_cross_attn.in_proj_bias",), _in_proj(1)),
    ("moc", "layers.{i}.ffn.collab_attn.v_proj.bias", (_MOC + "collab_cross_attn.in_proj_bias",), _in_proj(2)),
    ("moc", "layers.{i}.ffn.collab_attn.o_proj.weight", (_MOC + "collab_cross_attn.out_proj.weight",), _COPY),
    ("moc", "layers.{i}.ffn.collab_attn.o_proj.bias", (_MOC + "collab_cross_attn.out_proj.bias",), _COPY),
    ("moc", "layers.{i}.ffn.collab_norm.weight", (_MOC + "collab_norm.weight",), _COPY),
    # The original's collab_ffn is Linear, ReLU, Dropout, Linear; ours has no Dropout module.
    ("moc", "layers.{i}.ffn.collab_ffn.0.weight", (_MOC + "collab_ffn.0.weight",), _COPY),
    ("moc", "layers.{i}.ffn.collab_ffn.0.bias", (_MOC + "collab_ffn.0.bias",), _COPY),
    ("moc", "layers.{i}.ffn.collab_ffn.2.weight", (_MOC + "collab_ffn.3.weight",), _COPY),
    ("moc", "layers.{i}.ffn.collab_ffn.2.bias", (_MOC + "collab_ffn.3.bias",), _COPY),
    ("moc", "layers.{i}.ffn.out_proj.weight", (_MOC + "o_proj.weight",), _COPY),
)
# The original ties lm_head to wte; its state dict may list the tied tensor under both names.
_TIED_ALIAS = ("lm_head.weight", "transformer.wte.weight")


def _describe(config: ModelConfig) -> str:
    keys = ("d_model", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "n_experts", "top_k", "multiple_of")
    return ", ".join(f"{k}={getattr(config, k)}" for k in keys + ("ffn_hidden_multiplier",))


def convert_state_dict(original: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The original's state dict (prefixes removed) -> LunarisLM's, through :data:`MAPPING`.

    Every key of ``original`` must be used and every key of ours produced, with ours' shapes for
    ``config``; otherwise ConvertError names the first key that does not fit. Tensors keep their dtype.
    """
    ffn_kind = "moc" if config.is_moc else "dense"
    experts = range(config.n_experts or 0)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in LunarisLM(config).state_dict().items()}
    used: set[str] = set()
    converted: dict[str, torch.Tensor] = {}
    for applies, ours_template, sources, how in MAPPING:
        if applies not in ("all", ffn_kind):
            continue
        for layer in range(config.n_layers) if "{i}" in ours_template else [0]:
            ours = ours_template.format(i=layer)
            tensors, names = [], []
            for source in sources:
                keys = [source.format(i=layer, e=e) for e in (experts if "{e}" in source else [0])]
                for key in keys:
                    if key not in original:
                        raise ConvertError(f"missing key {key!r}: the original layout for {_describe(config)} has it")
                used.update(keys)
                names.append(source.format(i=layer, e="*") if "{e}" in source else keys[0])
                try:
                    tensors.append(torch.stack([original[k] for k in keys]) if "{e}" in source else original[keys[0]])
                except RuntimeError as e:  # experts of different shapes
                    raise ConvertError(f"keys {names[-1]!r} do not all have one shape: {e}") from None
            shapes = " and ".join(f"{n!r} {list(t.shape)}" for n, t in zip(names, tensors))
            try:
                tensor = how(*tensors, config)
            except RuntimeError:
                tensor = None
            if tensor is None or tensor.shape != expected[ours]:
                raise ConvertError(
                    f"{shapes} cannot make our {ours!r} {list(expected[ours])} for {_describe(config)}: "
                    "check the config"
                )
            converted[ours] = tensor.contiguous()
    alias, target = _TIED_ALIAS
    if alias in original:
        if not torch.equal(original[alias], original[target]):
            raise ConvertError(f"key {alias!r} differs from {target!r}; the original ties them")
        used.add(alias)
    extra = sorted(set(original) - used)
    if extra:
        raise ConvertError(f"unexpected key {extra[0]!r}: no place for it in our model with {_describe(config)}")
    assert set(converted) == set(expected), sorted(set(expected) ^ set(converted))  # MAPPING covers the model
    return converted


# --------------------------------------------------------------------------------------------------
# Reading the original checkpoint


class _Pickled:
    """Inert stand-in for a class of the original code that the checkpoint pickled (its config dataclass)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_args"] = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)


def load_original(path: str | Path) -> Any:
    """``torch.load`` of ``path`` with weights_only=True; foreign classes become :class:`_Pickled`."""
    path = Path(path)
    if path.is_dir():
        raise ConvertError(f"checkpoint {str(path)!r} is a directory, not a checkpoint file")
    if not path.is_file():
        raise ConvertError(f"checkpoint {str(path)!r} not found")
    try:
        foreign = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint (legacy format, or not a checkpoint): weights_only decides
        foreign = []
    stand_ins = [(type(name.rsplit(".", 1)[-1], (_Pickled,), {}), name) for name in foreign]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's own message for a damaged or foreign file says little ("invalid load key, 'e'", "101"):
        # say what the file is instead; keep torch's first line only for a file that does open as a zip.
        reason = describe_unreadable(path)
        if reason.startswith("its zip archive"):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            reason += f" ({first[:200]})"
        raise ConvertError(f"{str(path)!r} is not a readable torch checkpoint: {reason}") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _fields(obj: Any) -> dict[str, Any] | None:
    """A config as a plain dict: a mapping, or the fields of a pickled dataclass; None otherwise."""
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, _Pickled):
        return {k: v for k, v in vars(obj).items() if k != "_args"}
    return None


def split_checkpoint(
    obj: Any, path: str | Path
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, int | None, list[str]]:
    """(state dict without wrapper prefixes, the original's model config or None, its step or None,
    the checkpoint's other entries, which are not converted: optimizer state, epoch...)."""
    others: list[str] = []
    if _is_state_dict(obj):
        state, config, step = obj, None, None
    elif isinstance(obj, Mapping):
        found = [k for k in STATE_DICT_KEYS if _is_state_dict(obj.get(k))]
        if not found:
            raise ConvertError(
                f"{str(path)!r} holds no model state dict (neither a state dict nor one under "
                f"{', '.join(repr(k) for k in STATE_DICT_KEYS)}; its keys: {', '.join(map(str, obj))})"
            )
        state, step = obj[found[0]], obj.get("step")
        config = _fields(obj.get("config"))
        others = [str(k) for k in obj if k not in (found[0], "config", "step")]
        if config is not None and "d_model" not in config:  # a training config holding the model's under "model"
            config = _fields(config.get("model"))
    else:
        raise ConvertError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict or a checkpoint mapping")
    stripped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name in stripped:
            raise ConvertError(f"key {key!r} repeats {name!r} once its _orig_mod./module. prefixes are removed")
        stripped[name] = tensor
    return stripped, config, step if isinstance(step, int) else None, others


def original_model_config(keys: Mapping[str, Any], source: str) -> ModelConfig:
    """Our ModelConfig for the original's model config ``keys`` (its defaults for missing ones)."""
    unknown = sorted(set(keys) - set(ORIGINAL_DEFAULTS))
    if unknown:
        raise ConvertError(
            f"{source}: model key {unknown[0]!r} is not one of the original LunarisCodex-MoC code's "
            f"({', '.join(ORIGINAL_DEFAULTS)}); this converter knows that layout only"
        )
    values = ORIGINAL_DEFAULTS | dict(keys)
    values |= {"norm_eps": 1e-5, "moc_attn_bias": True, "ffn_hidden_rule": "original", "moc_heads": values["n_heads"]}
    try:
        return build_model_config(values)
    except ConfigError as e:
        raise ConvertError(f"{source}: {e}") from None


def _yaml_model_keys(path: str | Path) -> dict[str, Any]:
    try:
        raw = load_yaml(path)
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    keys = raw.get("model", raw if "d_model" in raw else None)
    if not isinstance(keys, dict):
        raise ConvertError(f"config file {str(path)!r} has no 'model:' mapping")
    return keys


def resolve_config(from_checkpoint: dict[str, Any] | None, config_file: str | Path | None, ckpt: str) -> ModelConfig:
    """The checkpoint's config, else ``--config``'s; both given must agree on every model key."""
    if from_checkpoint is None and config_file is None:
        raise ConvertError(f"{ckpt!r} holds no model config: pass the original run's YAML with --config")
    if from_checkpoint is None:
        return original_model_config(_yaml_model_keys(config_file), str(config_file))
    config = original_model_config(from_checkpoint, f"the config in {ckpt!r}")
    if config_file is not None:
        other = original_model_config(_yaml_model_keys(config_file), str(config_file))
        differ = [k for k, v in config.to_dict().items() if getattr(other, k) != v]
        if differ:
            raise ConvertError(
                f"--config {str(config_file)!r} and the config in {ckpt!r} disagree on {differ[0]!r} "
                f"({getattr(other, differ[0])!r} vs {getattr(config, differ[0])!r}); "
                "drop --config to use the checkpoint's"
            )
    return config


# --------------------------------------------------------------------------------------------------
# Writing ours


def check_out_dir(out: Path) -> None:
    """``--out`` can take the conversion: not a file, its folder writable, and so are the parts already there."""
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {str(out)!r} is a file, not a directory")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise ConvertError(f"--out {str(out)!r} cannot be created: {str(parent)!r} is a file")
    ensure_writable_dir(parent, "--out" if parent == out else f"the folder of --out {str(out)!r},", ConvertError)
    for name in ("checkpoints", "hf"):
        if (out / name).exists() and not (out / name).is_dir():
            raise ConvertError(f"--out {str(out)!r}: {name!r} there is a file, not a directory")
    if (out / "config.yaml").is_dir():
        raise ConvertError(f"--out {str(out)!r}: 'config.yaml' there is a directory")


def convert(
    ckpt: str | Path, out_dir: str | Path, config_file: str | Path | None = None, tokenizer: Any = None
) -> dict[str, Any]:
    """Convert ``ckpt`` into ``out_dir`` (see the module docstring); returns what was written.

    Raises ConvertError for a file, config or key that does not fit, before anything is written. The
    checkpoint is written last: a failed export leaves nothing that ``--resume`` would pick up.
    """
    out = Path(out_dir)
    check_out_dir(out)
    existing = list_checkpoints(out)
    if existing:
        raise ConvertError(
            f"{str(out)!r} already holds checkpoints ({existing[-1].name}): convert into a new directory"
        )
    if isinstance(tokenizer, (str, Path)) and not Path(tokenizer).exists():
        raise ConvertError(f"tokenizer {str(tokenizer)!r} not found")
    state, config_keys, step, others = split_checkpoint(load_original(ckpt), ckpt)
    config = resolve_config(config_keys, config_file, str(ckpt))
    converted = convert_state_dict(state, config)
    bad = next((k for k, t in converted.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise ConvertError(f"{str(ckpt)!r} holds NaN/inf weights (in our {bad!r}): nothing was written")
    lm = LunarisLM(config)
    lm.load_state_dict(converted, strict=True)
    lm.eval()

    from model.hf import LunarisForCausalLM, export_hf

    hf_dir = export_hf(lm, out / "hf", tokenizer=tokenizer)
    # The export must compute what we converted: reload it and compare logits on a few tokens.
    reloaded = LunarisForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.randint(
        0, config.vocab_size, (1, min(16, config.max_seq_len)), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        if not torch.equal(reloaded(ids).logits, lm(ids).logits):
            raise RuntimeError(f"the Hugging Face export in {hf_dir} does not reproduce the converted model's logits")

    config_yaml = out / "config.yaml"
    config_yaml.write_text(
        f"# Written by python -m model.convert_original from {ckpt}: the model keys that hold its weights.\n"
        f"# Continue training: set data_dir (and any run key), then python train_moe.py {config_yaml} --resume\n"
        + yaml.safe_dump({"model": config.to_dict(), "out_dir": str(out)}, sort_keys=False)
    )
    payload = {
        "step": 0,
        "model": lm.state_dict(),
        "config": {"model_config": config.to_dict()},
        "extra": {"converted_from": str(ckpt), "original_step": step},
    }
    written = atomic_save(payload, checkpoint_path(out, 0))
    return {
        "checkpoint": written,
        "config_yaml": config_yaml,
        "hf_dir": hf_dir,
        "config": config,
        "original_step": step,
        "not_converted": others,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model.convert_original",
        description="Convert a checkpoint of the original LunarisCodex-MoC code into this project's: a weights-only "
        "checkpoint (DIR/checkpoints), DIR/config.yaml and a Hugging Face export (DIR/hf).",
        epilog="Then: set data_dir in DIR/config.yaml and run python train_moe.py DIR/config.yaml --resume, "
        "or evaluate DIR/hf with kotara.py.",
    )
    p.add_argument(
        "checkpoint", help="the original's checkpoint (.pt): a state dict, or a dict holding it under 'model'"
    )
    p.add_argument("--out", required=True, help="output directory (must not hold checkpoints yet)")
    p.add_argument(
        "--config",
        help="the original run's YAML (model keys under 'model:'); needed when the checkpoint holds no config",
    )
    p.add_argument("--tokenizer", help="a tokenizer directory or tokenizer.json to ship in DIR/hf")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 for a user error, printed as one line)."""
    args = build_parser().parse_args(argv)
    try:
        result = convert(args.checkpoint, args.out, args.config, args.tokenizer)
    except (ValueError, OSError) as e:  # ConvertError, a tokenizer export_hf cannot read, an unwritable --out
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; nothing was written to --out's checkpoints", file=sys.stderr)
        return 130
    config = result["config"]
    kind = f"MoC, {config.n_experts} experts, top-{config.top_k}" if config.is_moc else "dense"
    step = result["original_step"]
    print(
        f"converted {args.checkpoint} ({kind}, {config.n_layers} layers, d_model {config.d_model}"
        + (f"; step {step} of the original run" if step is not None else "")
        + ")"
    )
    print(f"  checkpoint  {result['checkpoint']} (weights only: --resume starts at step 0, fresh optimizer)")
    print(f"  config      {result['config_yaml']}")
    print(f"  hf          {result['hf_dir']} (reloaded: same logits)")
    if result["not_converted"]:
        print(f"  not converted: {', '.join(result['not_converted'])} (training goes on with a fresh AdamW)")
    if config.dropout > 0:
        print(
            f"  note: dropout {config.dropout} is placed differently here when training (see the README's "
            "'Coming from the original code'); evaluation is unaffected"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
