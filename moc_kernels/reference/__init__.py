"""Plain-PyTorch references: the specification every Triton kernel is tested against.

Each op computes in float32 whatever its input dtype and returns outputs in the input dtype
(statistics such as entropies and NLLs are float32). Autograd gives the backward for free.
"""

from moc_kernels.reference.expert_swiglu import expert_swiglu
from moc_kernels.reference.fused_logit_nll import FusedNLL, fused_log_probs, fused_logit_nll, fused_logit_nll_multi
from moc_kernels.reference.routed_swiglu import routed_swiglu
from moc_kernels.reference.small_attention import small_attention
from moc_kernels.reference.target_and_set_log_probs import target_and_set_log_probs
from moc_kernels.reference.topk_gather import topk_gather

__all__ = [
    "FusedNLL",
    "expert_swiglu",
    "fused_log_probs",
    "fused_logit_nll",
    "fused_logit_nll_multi",
    "routed_swiglu",
    "small_attention",
    "target_and_set_log_probs",
    "topk_gather",
]
