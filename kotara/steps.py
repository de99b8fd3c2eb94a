"""The steps both scoring paths share, below both: the fusion spec, one forward over a window batch,
the device sync that makes its timing honest, and this process's place under ``torch.distributed``.

``kotara.evaluate`` (per token) and ``kotara.word_score`` (per word) import these public names;
neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kotara.loading import LoadedModel

# A fused row is marked ``*`` (it beats every single-model row) only when its NLL is lower than the best
# model's by more than this many nats per scored token. The sums add fp32 per-token values (relative
# rounding 6e-8: ~5e-7 nats on a token of 8 nats), so a model fused with itself can come out ahead by
# rounding alone (PPL 4288.3418 against 4288.3419: 2e-8 nats/token); the margin is 20x one value's
# rounding and 10x below the last digit of the NLL/token column (1e-4).
BEATS_MARGIN_NATS_PER_TOKEN = 1e-5


@dataclass
class FusionSpec:
    """What to fuse and how. Lists have one entry per model, in model order."""

    strategies: list[str]
    temperatures: list[float]
    weights: list[float]  # fixed mixture weights (normalised to sum 1 by the kernel)
    poe_betas: list[float]  # PoE exponents β_i (not normalised: Σβ ≠ 1 sharpens or flattens q)
    # Per-token weights learnt from the past tokens (kotara.words.fuse_tokens): not one row at a time,
    # so computed from every token's tempered log-probabilities after the pass, not by the kernel.
    sequential: list[str] = field(default_factory=list)
    switch_rate: float = 0.01

    def groups(self) -> list[tuple[list[str], list[float]]]:
        """Strategies grouped by the ``weights`` argument they need, so each group is one kernel call."""
        others = [s for s in self.strategies if s != "poe"]
        if "poe" not in self.strategies:
            return [(others, self.weights)] if others else []
        if self.poe_betas == self.weights:
            return [(list(self.strategies), self.weights)]
        return [g for g in ((others, self.weights), (["poe"], self.poe_betas)) if g[0]]


def forward_logits(model: LoadedModel, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits [B, T, vocab_size] in the model's dtype; columns past the tokenizer are padding, dropped."""
    out = model.module(input_ids=input_ids.to(model.device))
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[..., :vocab_size]


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA), so that a timer read next measures it; no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size under ``torch.distributed``; (0, 1) without it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
