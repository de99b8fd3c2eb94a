"""Gather the top-k expert outputs of each token (DESIGN §2 step 4)."""

import torch


def topk_gather(y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``S[n, j] = y[n, idx[n, j]]``.

    y: [N, E, D] any float dtype; idx: [N, k] int64 in [0, E). Returns S: [N, k, D] in y's dtype.
    Backward scatter-adds dS into dy: zeros for unselected experts, the sum of the slots' gradients
    where a row repeats an index (the model's top-k never does).
    """
    return torch.gather(y, 1, idx.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
