"""Llama-style building blocks: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of numerically sensitive math on ``dtype`` data: fp32, or fp64 for fp64 data (a model
    put in fp64 with ``.double()`` to check numerics computes in fp64 throughout)."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last axis; statistics in fp32 (fp64 for fp64 x), output in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = math_dtype(x.dtype)
        xf = x.to(dtype)
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(dtype)).to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_seq_len, head_dim/2] fp32 for rotary position embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (first half, second half) pairs of x: [B, H, T, dh] by cos/sin [T, dh/2] (one position per
    column) or [B, T, dh/2] (per-row positions, e.g. of a left-padded batch); math in fp32 (fp64 for
    fp64 x), output in x's dtype."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    half = x.shape[-1] // 2
    dtype = math_dtype(x.dtype)
    x1, x2 = x[..., :half].to(dtype), x[..., half:].to(dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class KVCache:
    """Keys and values of every layer seen so far, for incremental decoding.

    Same ``update``/``get_seq_length`` interface as transformers' ``DynamicCache``, so the HF wrapper
    can hand either to :class:`Attention`. Tensors are [B, n_kv_heads, T, head_dim].
    """

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's key/value [B, Hkv, T, dh] of layer ``layer_idx``; return the full ones."""
        if layer_idx == len(self.keys):
            self.keys.append(key)
            self.values.append(value)
        else:
            self.keys[layer_idx] = torch.cat((self.keys[layer_idx], key), dim=2)
            self.values[layer_idx] = torch.cat((self.values[layer_idx], value), dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of cached positions."""
        return self.keys[layer_idx].shape[2] if layer_idx < len(self.keys) else 0


def padded_causal_mask(key_mask: torch.Tensor, seq: int) -> torch.Tensor:
    """Which keys each of the last ``seq`` queries may attend to, for a batch with padding.

    key_mask: [B, S] bool, True for real tokens, over all S keys (cached ones first; the queries are
    the last ``seq`` of them) -> [B, 1, T=seq, S] bool: a query sees the real keys at or before it.
    A padded query also sees itself, so that no softmax row is empty: SDPA would return NaN there,
    and 0 * NaN in the next layer's attention would reach the real rows through the masked values.
    """
    total = key_mask.shape[1]
    key_pos = torch.arange(total, device=key_mask.device)
    query_pos = key_pos[total - seq :, None]  # [T, 1]
    causal = key_pos[None, :] <= query_pos  # [T, S], bottom-right aligned
    allowed = causal & (key_mask[:, None, :] | (key_pos[None, :] == query_pos))  # [B, T, S]
    return allowed[:, None]


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE through ``F.scaled_dot_product_attention``."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.wq = nn.Linear(config.d_model, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=False)
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [B, T, D]; cos/sin: [T, dh/2] or [B, T, dh/2] for the positions of these T tokens -> [B, T, D].

        ``mask``: [B, 1, T, S] bool (True = may attend) over the S = cached + T keys, from
        :func:`padded_causal_mask`; None means every key is a real token (plain causal attention).
        """
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v, self.layer_idx)
        past = k.shape[2] - seq
        causal = seq > 1 and mask is None
        if mask is not None and mask.shape[-1] != k.shape[2]:
            raise ValueError(f"the attention mask covers {mask.shape[-1]} keys; the cache and input hold {k.shape[2]}")
        if causal and past > 0:
            # SDPA's is_causal aligns the triangle top-left, which is wrong when the queries are the
            # last `seq` of `past + seq` keys: build the bottom-right-aligned mask explicitly.
            key_pos = torch.arange(past + seq, device=x.device)
            query_pos = torch.arange(past, past + seq, device=x.device)
            mask, causal = key_pos[None, :] <= query_pos[:, None], False
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.wo(out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    """Dense FFN ``(silu(x W1) * (x W3)) W2`` with hidden size ``config.ffn_hidden`` (the baseline)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.ffn_hidden
        self.w1 = nn.Linear(config.d_model, hidden, bias=False)
        self.w3 = nn.Linear(config.d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., D] -> [..., D]."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
