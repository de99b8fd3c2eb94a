"""Reference ``target_and_set_log_probs``: per row, log p(target) and the log mass of a token set.

For logits z = logits / T of one model and a token set W (a mask over the vocabulary):

    log_p_target[n] = log_softmax(z[n])[target[n]]
    log_p_set[n]    = log sum_{t in W} softmax(z[n])[t]

Kotara's fusion across tokenizers needs both for every scored position (W = the tokens that start
a word, DESIGN §5c); the Triton kernel gets them from one pass over V. Computed with
``log_softmax`` in fp32 (fp64 for fp64 logits), in row chunks so memory stays bounded for V up to
256k: at T = 1 ``log_p_target`` is bit for bit Kotara's per-token NLL (``kotara.similarity``).
An empty set gives -inf.
"""

from __future__ import annotations

import torch

from moc_kernels.reference.fused_logit_nll import chunk_rows


def target_and_set_log_probs(
    logits: torch.Tensor, targets: torch.Tensor, in_set: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] fp32|bf16|fp16|fp64, targets [N] int64 in [0, V), in_set [V] bool, temperature > 0
    -> (log_p_target [N], log_p_set [N]), fp32 (fp64 for fp64 logits)."""
    compute = torch.promote_types(logits.dtype, torch.float32)
    num_rows, vocab_size = logits.shape
    log_p_target = torch.empty(num_rows, dtype=compute, device=logits.device)
    log_p_set = torch.empty(num_rows, dtype=compute, device=logits.device)
    outside = ~in_set.to(device=logits.device, dtype=torch.bool)
    step = chunk_rows(vocab_size, logits.device)
    for start in range(0, num_rows, step):
        rows = slice(start, min(start + step, num_rows))
        z = logits[rows].to(compute)
        if temperature != 1.0:  # skipped at T = 1 so the values are Kotara's per-token NLL exactly
            z = z / temperature
        log_p = torch.log_softmax(z, dim=-1)
        log_p_target[rows] = log_p.gather(1, targets[rows, None]).squeeze(1)
        log_p_set[rows] = torch.logsumexp(log_p.masked_fill_(outside, float("-inf")), dim=-1)
    return log_p_target, log_p_set
