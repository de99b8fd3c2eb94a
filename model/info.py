"""``python -m model.info CONFIG.yaml``: parameters, FLOPs and activation memory per token of a config.

Prints the model next to the dense baseline of the same width (same config, ``n_experts: 0``):
the MoC layer runs every expert on every token, so its FFN costs about E dense FFNs in FLOPs and
far more in activations; the top-k MoE layer (``ffn: moe``) runs k of them, so it holds E experts'
parameters but uses (is "active" on) k per token. Users should see that before they train.

* parameters: counted exactly on a model built on the meta device (no memory, no init cost);
  active parameters per token: all of them, less the (E - k) experts an MoE token does not run;
* FLOPs/token: matrix-multiply FLOPs (2 per multiply-add) of the forward pass, analytically;
  attention over a causal context averages (seq_len + 1) / 2 keys per query; training = 3x forward;
* activation bytes/token: measured, not modelled: the bytes of every tensor autograd saves for
  backward (deduplicated by storage, parameters excluded) in one forward of the reference path on
  the meta device, as the difference between batch 2 and batch 1 divided by seq_len, so anything
  that does not grow with tokens drops out. The Triton path saves less (see the kernel docs).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from model.config import ModelConfig
from model.lm import LunarisLM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def flops_per_token(config: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """Forward matmul FLOPs per token, by part: attention, ffn (all layers), lm_head, total."""
    seq_len = seq_len or config.max_seq_len
    dim, layers, hidden = config.d_model, config.n_layers, config.ffn_hidden
    kv_dim = config.kv_heads * config.head_dim
    context = (seq_len + 1) / 2  # mean number of keys a causal query sees
    attention = 2 * dim * (2 * dim + 2 * kv_dim) + 2 * 2 * context * dim  # q,o + k,v projections; QK^T and AV
    experts, k = config.n_experts, config.top_k
    if config.is_moc:
        ffn = 2 * 3 * dim * hidden * experts  # every expert's SwiGLU on every token
        if config.router_context:
            ffn += 2 * 4 * dim * dim * experts  # router attention q/k/v/o over the E expert outputs
            ffn += 2 * 2 * experts * experts * dim  # router attention scores and values (L = E)
        ffn += 2 * dim * experts  # gate
        if config.collaboration:
            ffn += 2 * 4 * dim * dim * k  # collab attention q/k/v/o over the k selected
            ffn += 2 * 2 * k * k * dim  # collab attention scores and values (L = k)
            ffn += 2 * 4 * dim * dim * k  # refinement FFN D -> 2D -> D on each of the k
        ffn += 2 * k * dim + 2 * dim * dim  # weighted combination, output projection
    elif config.is_moc_sparse:
        ffn = 2 * 3 * dim * hidden * k  # only the k routed experts' SwiGLU
        if config.router_context == "preview":
            rank, width = config.preview_rank, config.preview_width
            ffn += 2 * 3 * dim * rank * experts  # every expert's preview: its first r hidden units
            ffn += 2 * 3 * dim * width * experts  # preview attention q/k/v, D -> p, over the E previews
            ffn += 2 * 2 * experts * experts * width  # its scores and values (L = E, width p)
            ffn += 2 * width * experts  # gate on the p-wide summary
        else:
            ffn += 2 * dim * experts  # gate on the token
        if config.collaboration:
            ffn += 2 * 4 * dim * dim * k + 2 * 2 * k * k * dim  # collab attention over the k (projections, L = k)
            ffn += 2 * 4 * dim * dim * k  # refinement FFN D -> 2D -> D on each of the k
        ffn += 2 * k * dim + 2 * dim * dim  # weighted combination, output projection
    elif config.is_moe:
        ffn = 2 * 3 * dim * hidden * k + 2 * dim * experts + 2 * k * dim  # k experts' SwiGLU, gate, combination
    else:
        ffn = 2 * 3 * dim * hidden
    lm_head = 2 * dim * config.vocab_size
    total = layers * (attention + ffn) + lm_head
    return {"attention": layers * attention, "ffn": layers * ffn, "lm_head": lm_head, "total": total}


def _meta_model(config: ModelConfig, dtype: torch.dtype) -> LunarisLM:
    with torch.device("meta"):
        return LunarisLM(replace(config, kernels="reference", dropout=0.0)).to(dtype)


def count_parameters(config: ModelConfig) -> int:
    """Exact number of distinct parameters (tied embedding once), without allocating them."""
    return _meta_model(config, torch.float32).num_parameters()


def active_parameters(config: ModelConfig) -> int:
    """Parameters a token's forward uses: all of them, less the (E - k) experts per MoE or sparse MoC layer
    it skips (a preview router reads each skipped expert's first r hidden units, which stay active)."""
    total = count_parameters(config)
    if config.is_moc_sparse:
        hidden = config.ffn_hidden - (config.preview_rank if config.router_context == "preview" else 0)
        return total - config.n_layers * (config.n_experts - config.top_k) * 3 * config.d_model * hidden
    if not config.is_moe:
        return total
    skipped_per_layer = (config.n_experts - config.top_k) * 3 * config.d_model * config.ffn_hidden
    return total - config.n_layers * skipped_per_layer


def activation_bytes_per_token(config: ModelConfig, seq_len: int | None = None, dtype: str = "bf16") -> float:
    """Bytes autograd saves for backward per training token (reference path, weights in ``dtype``)."""
    seq_len = seq_len or config.max_seq_len
    lm = _meta_model(config, DTYPES[dtype])
    weight_storages = {p.untyped_storage()._cdata for p in lm.parameters()}

    def saved_bytes(batch: int) -> int:
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage._cdata not in weight_storages:
                saved[storage._cdata] = storage.nbytes()
            return t

        ids = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = lm(ids, ids)
            del out
        return sum(saved.values())

    return (saved_bytes(2) - saved_bytes(1)) / seq_len


def summarize(config: ModelConfig, seq_len: int | None = None, dtype: str = "bf16") -> dict[str, Any]:
    """Figures for ``config`` and its dense baseline (same config with n_experts = 0)."""
    seq_len = seq_len or config.max_seq_len
    rows: dict[str, Any] = {"seq_len": seq_len, "dtype": dtype}
    for name, cfg in (("model", config), ("dense", config.dense_baseline())):
        flops = flops_per_token(cfg, seq_len)
        rows[name] = {
            "parameters": count_parameters(cfg),
            "active_parameters": active_parameters(cfg),
            "ffn_flops_per_token": flops["ffn"],
            "flops_per_token_forward": flops["total"],
            "flops_per_token_training": 3 * flops["total"],
            "activation_bytes_per_token": activation_bytes_per_token(cfg, seq_len, dtype),
        }
    return rows


def _human(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def format_summary(config: ModelConfig, rows: dict[str, Any]) -> str:
    kind = f"{config.ffn_label} E={config.n_experts} k={config.top_k}" if config.has_experts else "dense SwiGLU"
    lines = [
        f"LunarisCodex-MoC  d_model={config.d_model} n_layers={config.n_layers} n_heads={config.n_heads} "
        f"n_kv_heads={config.kv_heads} F={config.ffn_hidden} V={config.vocab_size}  ffn: {kind}",
        f"per token at seq_len={rows['seq_len']}; activations measured on the reference path in {rows['dtype']}",
        f"{'':32}{'this model':>14}{'dense baseline':>16}{'ratio':>9}",
    ]
    fields = (
        ("parameters", "parameters", ""),
        ("active parameters/token", "active_parameters", ""),
        ("FFN FLOPs/token (fwd)", "ffn_flops_per_token", "FLOP"),
        ("FLOPs/token forward", "flops_per_token_forward", "FLOP"),
        ("FLOPs/token training (3x)", "flops_per_token_training", "FLOP"),
        ("activation bytes/token", "activation_bytes_per_token", "B"),
    )
    for label, key, unit in fields:
        ours, dense = rows["model"][key], rows["dense"][key]
        ratio = f"{ours / dense:.2f}x" if dense else "-"
        lines.append(f"{label:32}{_human(ours, unit):>14}{_human(dense, unit):>16}{ratio:>9}")
    if config.is_moc:
        lines.append(
            f"note: MoC runs all {config.n_experts} experts on every token, so its FFN costs about "
            f"{config.n_experts}x a dense FFN (plus router/collab attention), whatever top_k is."
        )
    if config.is_moc_sparse:
        lines.append(
            f"note: sparse MoC runs {config.top_k} of its {config.n_experts} experts on each token (plus "
            "collaboration among them and, with the preview router, each expert's first "
            f"{config.preview_rank if config.router_context == 'preview' else 0} hidden units)."
        )
    if config.is_moe:
        lines.append(
            f"note: MoE runs {config.top_k} of its {config.n_experts} experts on each token, so its FFN costs "
            f"about {config.top_k}x a dense FFN while holding {config.n_experts} experts' parameters."
        )
    return "\n".join(lines)


def load_model_config(path: str | Path) -> ModelConfig:
    """The ``model:`` section of a YAML config (or a YAML that holds only model keys)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"config file {str(path)!r} is empty or not a mapping")
    section = data.get("model", data) if "model" in data else data
    if section is None:
        section = {}
    return ModelConfig.from_dict(section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model.info",
        description="Parameters, FLOPs/token and activation bytes/token of a LunarisCodex-MoC config, "
        "next to the dense baseline of the same width.",
    )
    parser.add_argument("config", help="YAML file with a model: section (the training config)")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length (default: model max_seq_len)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of weights/activations (default bf16)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    try:
        config = load_model_config(args.config)
        if args.seq_len is not None and not 1 <= args.seq_len <= config.max_seq_len:
            raise ValueError(f"--seq-len must be in [1, max_seq_len={config.max_seq_len}], got {args.seq_len}")
        rows = summarize(config, args.seq_len, args.dtype)
    except ValueError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(config, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
