"""The exact rolling-window protocol of DESIGN §5: every target scored exactly once.

Tokens ``x_0 … x_{n-1}``; ``x_0`` (the prefix token, or the first text token when there is none) is
context only. The targets ``x_1 … x_{n-1}`` are cut into consecutive blocks of ``stride`` tokens;
the block ``[t_b, t_e)`` is predicted from the input ``x[a : t_e - 1]`` with
``a = max(0, t_e - 1 - max_length)``. The input is at most ``max_length`` tokens and ends just
before the block's last target, so the block's first target sees at least one token of context
(``max_length - stride`` more when ``stride < max_length``).

Why not the usual recipes: the Hugging Face "perplexity of fixed-length models" loop loses the
first token of every window when ``stride == max_length``, and the original Kotara re-scored the
overlap of each window when ``stride < max_length``. Both bias PPL; this protocol is the one of
lm-evaluation-harness's rolling log-likelihood.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch


class Window(NamedTuple):
    """One forward pass: input ``x[input_start:input_end]``, scoring targets ``x[target_start:input_end + 1]``.

    The logit at input position j (absolute index ``input_start + j``) predicts ``x[input_start + j + 1]``;
    only the last ``num_targets`` positions of the input are scored.
    """

    input_start: int
    input_end: int
    target_start: int

    @property
    def input_length(self) -> int:
        return self.input_end - self.input_start

    @property
    def num_targets(self) -> int:
        return self.input_end + 1 - self.target_start


def check_window_args(max_length: int, stride: int) -> None:
    """Raise ValueError unless 1 <= stride <= max_length."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must satisfy 1 <= stride <= max_length={max_length}, got {stride}")


def rolling_windows(num_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The windows that score each of the targets ``x_1 … x_{num_tokens-1}`` exactly once.

    Returns ``ceil((num_tokens - 1) / stride)`` windows in text order (none when num_tokens < 2).
    """
    check_window_args(max_length, stride)
    windows = []
    for target_start in range(1, num_tokens, stride):
        target_end = min(target_start + stride, num_tokens)
        input_end = target_end - 1
        windows.append(Window(max(0, input_end - max_length), input_end, target_start))
    return windows


class Batch(NamedTuple):
    """Windows stacked for one forward.

    input_ids: [B, T] int64, right-padded with ``pad_id`` (T = longest input of the batch).
    targets: [B, T] int64, the next token of every position (``pad_id`` where there is none).
    scored: [B, T] bool, True exactly at the positions whose target is scored.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    scored: torch.Tensor


def make_batch(token_ids: torch.Tensor, windows: Sequence[Window], pad_id: int = 0) -> Batch:
    """Stack ``windows`` of ``token_ids`` ([n] int64) into one right-padded batch.

    Right padding needs no attention mask for a causal LM: a real position attends only to
    earlier positions, which are all real, so each row's logits equal those of the unpadded
    window (up to the fp rounding of a different matmul shape).
    """
    width = max(w.input_length for w in windows)
    input_ids = torch.full((len(windows), width), pad_id, dtype=torch.int64)
    targets = torch.full((len(windows), width), pad_id, dtype=torch.int64)
    scored = torch.zeros((len(windows), width), dtype=torch.bool)
    for row, w in enumerate(windows):
        input_ids[row, : w.input_length] = token_ids[w.input_start : w.input_end]
        targets[row, : w.input_length] = token_ids[w.input_start + 1 : w.input_end + 1]
        scored[row, w.input_length - w.num_targets : w.input_length] = True
    return Batch(input_ids, targets, scored)


def target_positions(windows: Sequence[Window]) -> torch.Tensor:
    """[targets] int64: the absolute index of every target the windows score, in the order of
    ``logits[batch.scored]`` for their batch (window by window, each in text order)."""
    return torch.cat([torch.arange(w.target_start, w.input_end + 1) for w in windows])


def batches(token_ids: torch.Tensor, windows: Sequence[Window], batch_size: int, pad_id: int = 0) -> Iterator[Batch]:
    """``make_batch`` over consecutive groups of ``batch_size`` windows."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(windows), batch_size):
        yield make_batch(token_ids, windows[start : start + batch_size], pad_id)
