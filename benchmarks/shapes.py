"""The shapes every benchmark, the cost model and the activation-memory probe use: one place.

``GPT2_SMALL`` is the MoC layer of a GPT-2-small-sized model (D=768, H=12) with 8 experts, top-2,
and a batch of 16384 tokens (e.g. 16 x 1024), bf16, the vocabulary of GPT-2 for Kotara's fusion.
``CPU_SCALED`` keeps E and k but shrinks N, D, F, H and V so the whole CPU run (on 2 shared cores)
stays within a few minutes: CPU figures compare implementations with each other, not with a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch


def expert_hidden(dim: int, ffn_hidden_multiplier: float = 4.0, multiple_of: int = 64) -> int:
    """F = multiple_of * ceil((2/3 * ffn_hidden_multiplier * D) / multiple_of) (DESIGN §2)."""
    return multiple_of * math.ceil((2.0 / 3.0 * ffn_hidden_multiplier * dim) / multiple_of)


@dataclass(frozen=True)
class BenchShape:
    """Sizes of one benchmark configuration (names as in DESIGN §2)."""

    name: str
    tokens: int  # N = batch * seq
    dim: int  # D
    experts: int  # E
    hidden: int  # F
    heads: int  # H (router and collab attention)
    top_k: int  # k
    vocab: int  # V (Kotara fusion)
    models: int  # M (Kotara fusion)
    dtype: torch.dtype

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def with_tokens(self, tokens: int) -> BenchShape:
        return replace(self, tokens=tokens)

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"N={self.tokens} D={self.dim} E={self.experts} F={self.hidden} H={self.heads} k={self.top_k} "
            f"V={self.vocab} M={self.models} {dtype}"
        )

    @classmethod
    def parse(cls, text: str) -> BenchShape | None:
        """The shape ``describe()`` wrote (as a benchmark's ``extra_info["shape"]``), else None."""
        fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
        dtype = getattr(torch, text.split()[-1], None) if text.split() else None
        keys = ("N", "D", "E", "F", "H", "k", "V", "M")
        if not all(k in fields and fields[k].isdigit() for k in keys) or not isinstance(dtype, torch.dtype):
            return None
        return cls("parsed", *(int(fields[k]) for k in keys), dtype)


GPT2_SMALL = BenchShape("gpt2-small-moc", 16384, 768, 8, expert_hidden(768), 12, 2, 50257, 2, torch.bfloat16)
CPU_SCALED = BenchShape("cpu-scaled", 128, 64, 8, expert_hidden(64), 2, 2, 2048, 2, torch.float32)


def shape_for(device: torch.device) -> BenchShape:
    """GPT-2-small on CUDA, the scaled shape elsewhere."""
    return GPT2_SMALL if device.type == "cuda" else CPU_SCALED
