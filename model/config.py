"""The model's configuration: one dataclass, the keys of the YAML ``model:`` section (DESIGN §2, §6)."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any

# The moc_kernels backends, spelled out here so that this module (which is also copied into the
# exported Hugging Face modeling file) imports nothing from the project. tests/test_model_config.py
# checks it equals moc_kernels.BACKENDS.
KERNEL_BACKENDS = ("auto", "triton", "reference")
FFN_HIDDEN_RULES = ("design", "original")
# the expert layer when n_experts > 0: MoC (DESIGN §2), top-k MoE (§2b) or sparse MoC (§2c: k routed experts)
FFN_KINDS = ("moc", "moe", "moc_sparse")
# MoC-only switches (DESIGN §2b): setting one to false on a dense or MoE model is an error, not a no-op.
MOC_ABLATIONS = ("router_context", "collaboration")
# router_context values: true (attention over all E expert outputs: ffn: moc only), false (the token
# itself), "preview" (attention over E cheap expert previews: ffn: moc_sparse only, DESIGN §2c).
ROUTER_CONTEXTS = (True, False, "preview")
# Values a config saved before a key existed meant (checkpoints, HF exports): see ModelConfig.saved_keys.
# collaboration: false used to feed the raw S_j to Wo; since DESIGN §2b's fix it keeps RMSNorm(S).
LEGACY_WHEN_ABSENT = {"ablation_keeps_norm": False}


@dataclass
class ModelConfig:
    """LunarisCodex-MoC hyper-parameters.

    ``n_experts`` 0 or None gives the dense SwiGLU baseline; otherwise every FFN is an expert layer
    with ``n_experts`` experts, ``top_k`` of them combined per token: a Mixture of Collaborative
    Experts (``ffn: moc``, the default) or the standard top-k MoE baseline (``ffn: moe``).
    """

    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # None -> n_heads (plain multi-head attention)
    vocab_size: int = 50257
    multiple_of: int = 256
    ffn_hidden_multiplier: float = 4.0
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    dropout: float = 0.0
    n_experts: int | None = 8  # 0 or None -> dense SwiGLU FFN baseline
    top_k: int = 2
    aux_loss_weight: float = 0.01
    router_temperature: float = 1.0
    moc_heads: int | None = None  # heads of the router and collab attentions; None -> n_heads
    balance_coef: float = 1.0
    diversity_coef: float = 1.0
    kernels: str = "auto"  # moc_kernels backend for this model's forward: auto | triton | reference
    # Keys that let a checkpoint of the original LunarisCodex-MoC code be held exactly
    # (python -m model.convert_original sets them; the defaults are this project's own choices).
    norm_eps: float = 1e-6  # epsilon of every RMSNorm (the original code: 1e-5)
    moc_attn_bias: bool = False  # biases on q/k/v/o of the router and collab attentions (the original: True)
    ffn_hidden_rule: str = "design"  # expert/dense FFN width F: "design" (DESIGN §2) | "original" (see ffn_hidden)
    # The baselines MoC is judged against (DESIGN §2b). The defaults are MoC as it always was.
    ffn: str = "moc"  # expert layer when n_experts > 0: "moc" | "moe" (standard top-k MoE, sparse compute)
    # MoC only: false routes on the token itself (s = x), not the E-output attention; preview: DESIGN §2c
    router_context: bool | str = True
    # MoC only: false skips the collab attention/FFN: out = (sum_j w_j RMSNorm(S)_j) Wo (see ablation_keeps_norm)
    collaboration: bool = True
    # collaboration: false only: keep step 5's RMSNorm before Wo (DESIGN §2b). false is the ablation as it
    # was before that fix, out = (sum_j w_j S_j) Wo, which checkpoints and exports saved without this key mean.
    ablation_keeps_norm: bool = True
    # Preview router (router_context: preview, ffn: moc_sparse; DESIGN §2c): each expert's first
    # preview_hidden hidden units (None -> F // 16) give a preview P_e; the router's self-attention over
    # the E previews runs in width preview_width with preview_heads heads; s = mean of its outputs.
    preview_hidden: int | None = None
    preview_width: int = 64
    preview_heads: int = 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build and validate a config from a mapping (a YAML ``model:`` section).

        Raises ValueError for an unknown key (with a did-you-mean) or an impossible value.
        """
        if not isinstance(d, dict):
            raise ValueError(f"model config must be a mapping of keys to values, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f"; valid keys: {', '.join(known)}"
                raise ValueError(f"unknown model key {key!r}{hint}")
        config = cls(**d)
        config.validate()
        return config

    @staticmethod
    def saved_keys(d: dict[str, Any]) -> dict[str, Any]:
        """A saved config's keys (checkpoint, HF export) with the meaning they had when saved.

        A key added after the config was written takes the value that reproduces the old behaviour
        where it differs from the new default: an ablation saved with ``collaboration: false`` and no
        ``ablation_keeps_norm`` is the pre-fix ablation (no RMSNorm before Wo). Other configs are unchanged.
        """
        d = dict(d)
        if d.get("collaboration") is False:
            for key, value in LEGACY_WHEN_ABSENT.items():
                d.setdefault(key, value)
        return d

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (round-trips through ``from_dict``)."""
        return dataclasses.asdict(self)

    @property
    def has_experts(self) -> bool:
        """True when the FFNs are expert layers (MoC or MoE), False for the dense SwiGLU baseline."""
        return bool(self.n_experts)

    @property
    def is_moc(self) -> bool:
        """True when the FFNs are MoC layers (``ffn: moc`` with experts)."""
        return self.has_experts and self.ffn == "moc"

    @property
    def is_moc_sparse(self) -> bool:
        """True when the FFNs are sparse MoC layers (``ffn: moc_sparse``: k routed experts, DESIGN §2c)."""
        return self.has_experts and self.ffn == "moc_sparse"

    @property
    def has_collab(self) -> bool:
        """True for the MoC kinds (``ffn: moc`` or ``moc_sparse``), which carry the MoC switches."""
        return self.is_moc or self.is_moc_sparse

    @property
    def preview_rank(self) -> int:
        """r: the hidden units of each expert its preview runs (``preview_hidden`` or F // 16, at least 1)."""
        return self.preview_hidden if self.preview_hidden is not None else max(1, self.ffn_hidden // 16)

    @property
    def is_moe(self) -> bool:
        """True when the FFNs are standard top-k MoE layers (``ffn: moe`` with experts)."""
        return self.has_experts and self.ffn == "moe"

    @property
    def ffn_label(self) -> str:
        """Short human name of the FFN kind: "dense", "MoE", "MoC" or "MoC (no router context, ...)"."""
        if not self.has_experts:
            return "dense"
        if self.is_moe:
            return "MoE"
        if self.is_moc_sparse:
            router = "preview router" if self.router_context == "preview" else "token router"
            return f"sparse MoC ({router}{'' if self.collaboration else ', no collaboration'})"
        off = [name.replace("_", " ") for name in MOC_ABLATIONS if not getattr(self, name)]
        if not self.collaboration and not self.ablation_keeps_norm:
            off[-1] += " nor its RMSNorm"
        return f"MoC (no {', no '.join(off)})" if off else "MoC"

    def dense_baseline(self) -> ModelConfig:
        """This config with the dense SwiGLU FFN of the same width F (``n_experts: 0``, switches at their defaults)."""
        return dataclasses.replace(
            self, n_experts=0, ffn="moc", router_context=True, collaboration=True, ablation_keeps_norm=True
        )

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (``n_kv_heads`` or ``n_heads``)."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def collab_heads(self) -> int:
        """Heads of the MoC router and collab attentions (``moc_heads`` or ``n_heads``)."""
        return self.moc_heads if self.moc_heads is not None else self.n_heads

    @property
    def ffn_hidden(self) -> int:
        """F = multiple_of * ceil((2/3 * ffn_hidden_multiplier * d_model) / multiple_of) (DESIGN §2).

        ``ffn_hidden_rule: original`` truncates twice before rounding up, as the original code does:
        ``multiple_of * ceil(int(2 * int(ffn_hidden_multiplier * d_model) / 3) / multiple_of)``. The two
        differ when a truncation lands on a multiple: d_model 4, multiplier 4, multiple_of 2 gives 12
        by DESIGN §2 and 10 by the original's rule.
        """
        if self.ffn_hidden_rule == "original":
            hidden = int(2 * int(self.ffn_hidden_multiplier * self.d_model) / 3)
            return self.multiple_of * -(-hidden // self.multiple_of)
        return self.multiple_of * math.ceil((2 / 3 * self.ffn_hidden_multiplier * self.d_model) / self.multiple_of)

    def validate(self) -> None:
        """Raise ValueError naming the first impossible value and what would be valid."""

        def need_int(name: str, minimum: int, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"model key {name!r} must be an integer, got {value!r}")
            if value < minimum:
                raise ValueError(f"model key {name!r} must be >= {minimum}, got {value}")

        def need_float(name: str, positive: bool) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"model key {name!r} must be a finite number, got {value!r}")
            if positive and value <= 0:
                raise ValueError(f"model key {name!r} must be > 0, got {value}")
            if not positive and value < 0:
                raise ValueError(f"model key {name!r} must be >= 0, got {value}")

        for name in ("d_model", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            need_int(name, 1)
        need_int("n_kv_heads", 1, allow_none=True)
        need_int("moc_heads", 1, allow_none=True)
        need_int("n_experts", 0, allow_none=True)
        need_int("top_k", 1)
        need_int("preview_hidden", 1, allow_none=True)
        need_int("preview_width", 1)
        need_int("preview_heads", 1)
        for name in ("ffn_hidden_multiplier", "rope_theta", "router_temperature", "norm_eps"):
            need_float(name, positive=True)
        for name in ("dropout", "aux_loss_weight", "balance_coef", "diversity_coef"):
            need_float(name, positive=False)

        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(
                f"head dim d_model/n_heads = {self.head_dim} must be even for rotary embeddings "
                f"(d_model={self.d_model}, n_heads={self.n_heads})"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.kv_heads}")
        if not self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.moc_attn_bias, bool):
            raise ValueError(f"model key 'moc_attn_bias' must be true or false, got {self.moc_attn_bias!r}")
        if self.ffn_hidden_rule not in FFN_HIDDEN_RULES:
            raise ValueError(
                f"model key 'ffn_hidden_rule' must be one of {', '.join(FFN_HIDDEN_RULES)}, "
                f"got {self.ffn_hidden_rule!r}"
            )
        if self.kernels not in KERNEL_BACKENDS:
            raise ValueError(f"model key 'kernels' must be one of {', '.join(KERNEL_BACKENDS)}, got {self.kernels!r}")
        self._validate_ffn_kind()
        if self.has_experts and self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be <= n_experts={self.n_experts}")
        if self.has_collab and self.d_model % self.collab_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by moc_heads={self.collab_heads}")
        self._validate_sparse_router()

    def _validate_ffn_kind(self) -> None:
        """``ffn`` is a known kind, needs experts for moe, and the MoC switches are off only on MoC."""
        if self.ffn not in FFN_KINDS:
            close = difflib.get_close_matches(str(self.ffn), FFN_KINDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"model key 'ffn' must be one of {', '.join(FFN_KINDS)}, got {self.ffn!r}{hint}")
        if self.ffn == "moe" and not self.has_experts:
            raise ValueError(
                f"ffn: moe needs n_experts >= 1, got n_experts={self.n_experts!r} (n_experts 0 is the dense model)"
            )
        for name in (*MOC_ABLATIONS, "ablation_keeps_norm"):
            value = getattr(self, name)
            allowed = ROUTER_CONTEXTS if name == "router_context" else (True, False)
            if not any(value is a or (isinstance(a, str) and value == a) for a in allowed):
                spelled = "true, false or preview" if name == "router_context" else "true or false"
                raise ValueError(f"model key {name!r} must be {spelled}, got {value!r}")
            if value is not True and not self.has_collab:
                kind = "an MoE" if self.is_moe else "a dense"
                raise ValueError(
                    f"model key {name!r} is a MoC ablation; it cannot be false on {kind} model "
                    f"(n_experts={self.n_experts!r}, ffn={self.ffn!r})"
                )

    def _validate_sparse_router(self) -> None:
        """The router each MoC kind can have, and a preview that fits its expert and its heads (DESIGN §2c)."""
        if self.is_moc_sparse and self.router_context is True:
            raise ValueError(
                "ffn: moc_sparse runs only the k routed experts, so its router cannot read all E expert outputs "
                "(router_context: true); use router_context: false (token router) or preview"
            )
        if self.router_context == "preview" and not self.is_moc_sparse:
            raise ValueError(
                f"router_context: preview is the router of ffn: moc_sparse, got ffn={self.ffn!r} "
                f"(n_experts={self.n_experts!r}); ffn: moc's router reads the full expert outputs"
            )
        if self.router_context == "preview":
            if self.preview_rank > self.ffn_hidden:
                raise ValueError(
                    f"preview_hidden={self.preview_rank} must be <= the expert hidden size F={self.ffn_hidden}"
                )
            if self.preview_width % self.preview_heads:
                raise ValueError(
                    f"preview_width={self.preview_width} must be divisible by preview_heads={self.preview_heads}"
                )
        if not self.ablation_keeps_norm and self.collaboration:
            raise ValueError(
                "model key 'ablation_keeps_norm' applies to collaboration: false only; it cannot be false "
                "on a model that collaborates"
            )
