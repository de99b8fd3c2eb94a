"""LunarisCodex-MoC: a Llama-style decoder whose FFNs are MoC layers (or top-k MoE or dense SwiGLU baselines)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import moc_kernels as mk
from model.config import ModelConfig
from model.layers import Attention, KVCache, RMSNorm, SwiGLU, math_dtype, padded_causal_mask, rope_tables
from model.moc import CollaborativeExpertsModule, SparseCollaborativeExpertsModule
from model.moe import TopKMoEModule

IGNORE_INDEX = -100


class LMOutput(NamedTuple):
    logits: torch.Tensor  # [B, T, V]
    loss: torch.Tensor | None  # main cross-entropy (ignore_index -100), excludes aux; None without targets
    aux_loss: torch.Tensor  # scalar: sum over layers of aux_loss_weight*(balance_coef*L_bal + diversity_coef*L_div)
    # detached device tensors, keys f"layer{i}/..." (empty for the dense model; no collab_entropy for MoE or
    # collaboration: false)
    stats: dict[str, torch.Tensor]


def ffn_module(config: ModelConfig) -> nn.Module:
    """The FFN of every block: MoC (``ffn: moc``), top-k MoE (``ffn: moe``) or dense SwiGLU (no experts)."""
    if config.is_moc:
        return CollaborativeExpertsModule(config)
    if config.is_moc_sparse:
        return SparseCollaborativeExpertsModule(config)
    if config.is_moe:
        return TopKMoEModule(config)
    return SwiGLU(config)


class Block(nn.Module):
    """Pre-norm decoder block: x + Attn(norm(x)), then + FFN(norm(x)) with FFN = MoC, MoE or SwiGLU."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attention = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn: nn.Module = ffn_module(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
        mask: torch.Tensor | None = None,
    ):
        """x: [B, T, D] -> (x [B, T, D], MoCOutput or None for the dense FFN).

        Only the attention mixes tokens (``mask``, see :class:`Attention`): the FFNs (MoC, MoE,
        SwiGLU) act on each token alone, so a padded token never reaches a real one through them.
        """
        x = x + self.dropout(self.attention(self.attention_norm(x), cos, sin, kv_cache, mask))
        ffn_out = self.ffn(self.ffn_norm(x))
        if isinstance(ffn_out, tuple):  # MoCOutput (MoC or MoE)
            return x + self.dropout(ffn_out.out), ffn_out
        return x + self.dropout(ffn_out), None


class LunarisLM(nn.Module):
    """The language model. ``forward`` runs its ops on ``config.kernels`` (moc_kernels backend)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_embeddings.weight  # tied embeddings
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        # Not persistent: derived from the config, so checkpoints stay small and never go stale.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2/Llama init: N(0, 0.02) everywhere, N(0, 0.02/sqrt(2L)) for projections into the residual."""
        std = 0.02
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.layers:
            nn.init.normal_(block.attention.wo.weight, 0.0, residual_std)
            if isinstance(block.ffn, (CollaborativeExpertsModule, TopKMoEModule)):
                nn.init.normal_(block.ffn.w13, 0.0, std)
                nn.init.normal_(block.ffn.w2, 0.0, residual_std)
                if isinstance(block.ffn, CollaborativeExpertsModule):
                    nn.init.normal_(block.ffn.out_proj.weight, 0.0, residual_std)
            else:
                nn.init.normal_(block.ffn.w2.weight, 0.0, residual_std)

    def _positions(
        self,
        shape: torch.Size,
        start_pos: int,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """RoPE cos/sin ([T, dh/2], or [B, T, dh/2] for per-row positions) and the attention mask
        ([B, 1, T, S] bool, None without padding) of a [B, T] input after ``start_pos`` cached tokens."""
        batch, seq = shape
        key_mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, start_pos + seq):
                raise ValueError(
                    f"attention_mask must be [B, cached + T] = {[batch, start_pos + seq]} "
                    f"(1 = token, 0 = padding), got shape {list(attention_mask.shape)}"
                )
            key_mask = attention_mask.bool()
            if bool(key_mask.all()):  # no padding: the plain causal path (one host sync)
                key_mask = None
        if position_ids is None and key_mask is not None:
            position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start_pos:]
        mask = None if key_mask is None else padded_causal_mask(key_mask, seq)
        if position_ids is None:
            if start_pos < 0 or start_pos + seq > self.config.max_seq_len:
                raise ValueError(
                    f"positions {start_pos}..{start_pos + seq - 1} exceed max_seq_len={self.config.max_seq_len}"
                )
            return self.rope_cos[start_pos : start_pos + seq], self.rope_sin[start_pos : start_pos + seq], mask
        if position_ids.dim() != 2 or position_ids.shape[1] != seq or position_ids.shape[0] not in (1, batch):
            raise ValueError(f"position_ids must be [B, T] = {[batch, seq]}, got shape {list(position_ids.shape)}")
        low, high = int(position_ids.min()), int(position_ids.max())
        if low < 0 or high >= self.config.max_seq_len:
            raise ValueError(f"positions {low}..{high} exceed max_seq_len={self.config.max_seq_len}")
        return self.rope_cos[position_ids], self.rope_sin[position_ids], mask

    def num_parameters(self) -> int:
        """Number of distinct parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> LMOutput:
        """Logits, main loss, aux loss and per-layer routing stats.

        input_ids: [B, T] int64; targets: [B, T] int64 already shifted (``targets[:, t]`` is the token
        after ``input_ids[:, t]``), -100 = ignored. With ``kv_cache`` (a :class:`KVCache` or a
        transformers ``DynamicCache``) the keys/values of these T tokens are appended to it and
        attention covers the cached prefix; ``start_pos`` is the position of ``input_ids[:, 0]``
        (the number of cached tokens).

        Padded batches (left, right or both): ``attention_mask`` [B, start_pos + T], 1 for real
        tokens and 0 for padding, over the cached tokens and these T (the Hugging Face convention).
        No real token attends to a padded one in any layer, and positions count the real tokens
        before each one (``cumsum(mask) - 1``), so each row's real tokens get the logits they have
        unpadded. ``position_ids`` [B, T] (or [1, T]) overrides the positions. The aux loss and
        stats still average over every token, padded ones included.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        cos, sin, mask = self._positions(input_ids.shape, start_pos, attention_mask, position_ids)
        stats: dict[str, torch.Tensor] = {}
        aux_loss = torch.zeros((), device=input_ids.device, dtype=torch.float32)
        cfg = self.config
        with mk.use_backend(cfg.kernels):
            x = self.tok_embeddings(input_ids)
            for i, block in enumerate(self.layers):
                x, moc = block(x, cos, sin, kv_cache, mask)
                if moc is not None:
                    aux_loss = aux_loss + cfg.aux_loss_weight * (
                        cfg.balance_coef * moc.balance_loss + cfg.diversity_coef * moc.diversity_loss
                    )
                    stats[f"layer{i}/expert_load"] = moc.expert_load
                    stats[f"layer{i}/router_entropy"] = moc.router_entropy
                    stats[f"layer{i}/balance_loss"] = moc.balance_loss.detach()
                    if moc.collab_entropy is not None:  # only layers that collaborate have these two
                        stats[f"layer{i}/collab_entropy"] = moc.collab_entropy
                        stats[f"layer{i}/diversity_loss"] = moc.diversity_loss.detach()
            logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            if targets.shape != input_ids.shape:
                raise ValueError(f"targets shape {tuple(targets.shape)} != input_ids shape {tuple(input_ids.shape)}")
            loss = F.cross_entropy(
                logits.to(math_dtype(logits.dtype)).view(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
        return LMOutput(logits, loss, aux_loss, stats)
