"""Hugging Face integration: config and causal-LM classes around LunarisLM, and the exporter.

Two ways to load an exported directory:
  * ``import model`` (registers ``lunaris_moc`` with AutoConfig/AutoModelForCausalLM), then
    ``AutoModelForCausalLM.from_pretrained(dir)``;
  * ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` anywhere: the directory
    carries ``modeling_lunaris_moc.py``, generated from this package's source by :func:`export_hf`
    (one copy of the model code, not a hand-maintained twin), with the moc_kernels reference ops
    inlined as the fallback where the ``moc_kernels`` package is not installed.

Generation uses the model's own KV cache path: ``generate()`` hands a transformers ``DynamicCache``,
whose ``update(key, value, layer_idx)`` is the interface :class:`model.layers.Attention` calls.
Padded batches (lm-eval, pipelines, ``generate(**tokenizer(prompts, padding=True))``) work through the
attention mask and per-row positions (:meth:`LunarisForCausalLM.forward`).
"""

from __future__ import annotations

import ast
import copy
import inspect
import math
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from model.config import ModelConfig
from model.layers import RMSNorm, rope_tables
from model.lm import IGNORE_INDEX, LunarisLM
from model.moc import CollaborativeExpertsModule
from model.moe import TopKMoEModule

try:  # transformers >= 5: init functions that skip tensors already loaded from a checkpoint
    from transformers import initialization as hf_init
except ImportError:  # older transformers: plain torch init (only called on fresh tensors there)
    hf_init = torch.nn.init

MODEL_TYPE = "lunaris_moc"
MODELING_FILE = "modeling_lunaris_moc.py"
# ModelConfig fields stored under another name in config.json: transformers refuses to save a model
# config holding a generation parameter name (top_k), and num_experts_per_tok is HF's MoE name for it.
_HF_NAMES = {"top_k": "num_experts_per_tok"}


class LunarisConfig(PretrainedConfig):
    """Hugging Face config holding every :class:`ModelConfig` field under its own name."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    # Standard names that generic HF code (caches, tools) reads, mapped onto ours.
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "max_seq_len",
    }

    def __init__(self, **kwargs: Any) -> None:
        kwargs = ModelConfig.saved_keys(kwargs)  # an export saved before a key existed keeps its meaning
        for name, default in ModelConfig().to_dict().items():
            hf_name = _HF_NAMES.get(name, name)
            setattr(self, hf_name, kwargs.pop(hf_name, kwargs.pop(name, default)))
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs: Any) -> LunarisConfig:
        return cls(**config.to_dict(), **kwargs)

    def to_model_config(self) -> ModelConfig:
        """The validated :class:`ModelConfig` this HF config describes."""
        names = ModelConfig().to_dict()
        config = ModelConfig(**{name: getattr(self, _HF_NAMES.get(name, name)) for name in names})
        config.validate()
        return config


class LunarisPreTrainedModel(PreTrainedModel):
    config_class = LunarisConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def _init_weights(self, module: torch.nn.Module) -> None:
        # HF builds models on the meta device and then calls this for whatever the checkpoint did not
        # provide, including non-persistent buffers (the RoPE tables): hf_init skips loaded tensors.
        if not isinstance(module, LunarisLM):
            return
        cfg = module.config
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        hf_init.copy_(module.rope_cos, cos)
        hf_init.copy_(module.rope_sin, sin)
        std, residual_std = 0.02, 0.02 / math.sqrt(2 * cfg.n_layers)
        for sub in module.modules():
            if isinstance(sub, (torch.nn.Linear, torch.nn.Embedding)):
                hf_init.normal_(sub.weight, 0.0, std)
                if getattr(sub, "bias", None) is not None:
                    hf_init.zeros_(sub.bias)
            elif isinstance(sub, RMSNorm):
                hf_init.ones_(sub.weight)
        for block in module.layers:
            hf_init.normal_(block.attention.wo.weight, 0.0, residual_std)
            if isinstance(block.ffn, (CollaborativeExpertsModule, TopKMoEModule)):
                hf_init.normal_(block.ffn.w13, 0.0, std)
                hf_init.normal_(block.ffn.w2, 0.0, residual_std)
                if isinstance(block.ffn, CollaborativeExpertsModule):
                    hf_init.normal_(block.ffn.out_proj.weight, 0.0, residual_std)
            else:
                hf_init.normal_(block.ffn.w2.weight, 0.0, residual_std)


# transformers 5.24 renamed the output's ``past_key_values`` field to ``cache``.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class LunarisForCausalLM(LunarisPreTrainedModel, GenerationMixin):
    """LunarisLM as a transformers causal LM (``generate``, ``save_pretrained``, Auto classes)."""

    _tied_weights_keys = {"model.lm_head.weight": "model.tok_embeddings.weight"}

    def __init__(self, config: LunarisConfig) -> None:
        super().__init__(config)
        self.model = LunarisLM(config.to_model_config())
        self.post_init()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.tok_embeddings

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.tok_embeddings = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.model.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """input_ids [B, T] int64; labels [B, T] unshifted (HF convention), -100 ignored.

        Padded batches, as every batching client builds them (left-padded prompts for ``generate``,
        right-padded for scoring): ``attention_mask`` [B, cached + T] with 0 at the padding masks
        those keys in every attention layer, and the positions count only the real tokens
        (``position_ids`` [B, T] when given, as ``generate`` passes them). Without a mask, positions
        continue from the cache length. The KV cache comes as ``cache`` (transformers >= 5.24) or
        ``past_key_values`` (earlier releases).
        """
        cache = kwargs.pop("past_key_values", cache)
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("LunarisForCausalLM needs input_ids (inputs_embeds is not supported)")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                "LunarisForCausalLM takes a 2D attention_mask [B, cached + T] (1 = token, 0 = padding), "
                f"got shape {list(attention_mask.shape)}"
            )
        if cache is None and use_cache:
            cache = DynamicCache(config=self.config)
        start_pos = cache.get_seq_length() if cache is not None else 0
        targets = None
        if labels is not None:
            # LunarisLM takes targets already shifted: targets[:, t] = labels[:, t + 1].
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        out = self.model(
            input_ids,
            targets,
            kv_cache=cache,
            start_pos=start_pos,
            attention_mask=attention_mask,
            position_ids=position_ids,
        )
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits, **{_CACHE_FIELD: cache})


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------

# Modules whose code makes up the exported modeling file, in dependency order.
_EXPORTED_MODULES = ("model.config", "model.layers", "model.moc", "model.moe", "model.lm", "model.hf")
# Top-level names of those modules that stay out of the exported file (export-time only).
_NOT_EXPORTED = {
    "export_hf",
    "_HEADER",
    "modeling_source",
    "_module_body",
    "_save_tokenizer",
    "_EXPORTED_MODULES",
    "_NOT_EXPORTED",
}

_HEADER = '''"""LunarisCodex-MoC modeling code for transformers' trust_remote_code.

Generated by model.hf.export_hf from the LunarisCodex-MoC source: do not edit by hand.
Uses the moc_kernels package when it is installed, otherwise its reference math (inlined below).
"""

from __future__ import annotations

import contextlib
import math
import types

import torch
import torch.nn.functional as F

try:
    import moc_kernels as mk
except ImportError:
    mk = None
'''


def _module_body(module_name: str) -> str:
    """Source of a project module without its project imports and export-only definitions."""
    import importlib

    source = inspect.getsource(importlib.import_module(module_name))
    tree = ast.parse(source)
    lines = source.splitlines()
    drop: set[int] = set()
    for node in tree.body:
        remove = False
        if isinstance(node, ast.ImportFrom):
            remove = (node.module or "").split(".")[0] in ("model", "moc_kernels", "__future__")
        elif isinstance(node, ast.Import):
            remove = any(alias.name.split(".")[0] in ("model", "moc_kernels") for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            remove = node.name in _NOT_EXPORTED
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            remove = any(isinstance(t, ast.Name) and t.id in _NOT_EXPORTED for t in targets)
        if remove:
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            drop.update(range(start - 1, node.end_lineno))
    kept = "\n".join(line for i, line in enumerate(lines) if i not in drop)
    return f"# ---- from {module_name} ----\n{kept}\n"


def modeling_source() -> str:
    """The self-contained modeling file written next to an exported model."""
    from moc_kernels.reference import expert_swiglu, routed_swiglu, small_attention, topk_gather

    fallback = [
        "# ---- fallback: moc_kernels.reference, used when the package is absent ----",
        *(inspect.getsource(fn) for fn in (expert_swiglu, routed_swiglu, small_attention, topk_gather)),
        "if mk is None:",
        "    mk = types.SimpleNamespace(",
        "        expert_swiglu=expert_swiglu,",
        "        routed_swiglu=routed_swiglu,",
        "        small_attention=small_attention,",
        "        topk_gather=topk_gather,        use_backend=lambda name: contextlib.nullcontext(),",
        "    )",
        "",
    ]
    return _HEADER + "\n" + "\n".join(fallback) + "\n" + "\n".join(_module_body(m) for m in _EXPORTED_MODULES)


def _save_tokenizer(tokenizer: Any, out_dir: Path) -> Any:
    """Save ``tokenizer`` (object, tokenizer directory or tokenizer.json) into out_dir; return the object."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not hasattr(tokenizer, "save_pretrained"):
        path = Path(tokenizer)
        file = path / "tokenizer.json" if path.is_dir() else path
        if path.is_dir() and (path / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        elif file.is_file():
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(file))
        else:
            raise ValueError(
                f"tokenizer {str(path)!r} is neither a tokenizer object, a tokenizer directory nor a tokenizer.json"
            )
    # Batching clients (pipelines, generate on a padded batch) need a pad token: without one, use EOS
    # (the attention mask, not the id, marks the padding). Left padding is what generation wants.
    tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"  # init_kwargs: what is saved
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def export_hf(lm: LunarisLM, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write a Hugging Face model directory for ``lm``; returns its path.

    Files: config.json (with ``auto_map``), model.safetensors (tied embedding stored once),
    generation_config.json, modeling_lunaris_moc.py, and the tokenizer files if ``tokenizer`` is a
    transformers tokenizer or a path to a tokenizer directory / tokenizer.json (saved with left padding,
    and EOS as the pad token if it has none, so that batching clients work as they are). The exported config
    sets ``kernels: auto`` so the loader's machine picks Triton on CUDA and the reference elsewhere.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = LunarisConfig.from_model_config(lm.config)
    config.kernels = "auto"
    config.auto_map = {
        "AutoConfig": f"{MODELING_FILE[:-3]}.LunarisConfig",
        "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.LunarisForCausalLM",
    }
    if tokenizer is not None:
        tokenizer = _save_tokenizer(tokenizer, out)
        # generate() stops at the config's EOS (copied into generation_config.json at construction).
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, key, None) is not None:
                setattr(config, key, getattr(tokenizer, key))
    hf_model = LunarisForCausalLM(config).to(next(lm.parameters()).dtype)
    hf_model.model.load_state_dict(lm.state_dict())
    hf_model.save_pretrained(out, safe_serialization=True)
    (out / MODELING_FILE).write_text(modeling_source())
    shutil.rmtree(out / "__pycache__", ignore_errors=True)
    return out
