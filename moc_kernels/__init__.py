"""moc_kernels: the hot paths of LunarisCodex-MoC and Kotara, as Triton kernels with PyTorch references.

Public API: the ops below and the backend switch (``use_backend``, ``set_backend``, env
``MOC_KERNELS=auto|triton|reference``).
"""

from moc_kernels.backend import BACKENDS, get_backend, set_backend, use_backend
from moc_kernels.ops import (
    expert_swiglu,
    fused_log_probs,
    fused_logit_nll,
    fused_logit_nll_multi,
    routed_swiglu,
    small_attention,
    target_and_set_log_probs,
    topk_gather,
)
from moc_kernels.reference.fused_logit_nll import IGNORE_INDEX, STRATEGIES, FusedNLL

__all__ = [
    "BACKENDS",
    "IGNORE_INDEX",
    "STRATEGIES",
    "FusedNLL",
    "expert_swiglu",
    "fused_log_probs",
    "fused_logit_nll",
    "fused_logit_nll_multi",
    "get_backend",
    "routed_swiglu",
    "set_backend",
    "small_attention",
    "target_and_set_log_probs",
    "topk_gather",
    "use_backend",
]
