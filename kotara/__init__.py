"""Kotara: exact perplexity of two or more causal LMs, each alone and fused per token (DESIGN §5),
and text generated from the fused model (DESIGN §5a).

Layout: ``windows`` (the rolling-window protocol), ``loading`` (text, tokenizer, models),
``evaluate`` (one pass: forwards, baselines, fusion via ``moc_kernels.fused_logit_nll_multi``,
similarity), ``generate`` (decoding from the fused model via ``moc_kernels.fused_log_probs``),
``similarity``, ``report`` (console table, JSON), ``cli`` (``kotara`` / ``kotara.py``).
"""

# moc_kernels first: see model/__init__.py (Triton's interpreter must be chosen before triton.language loads).
import moc_kernels  # noqa: F401

# isort: split
from kotara.generate import Generation, generate
from kotara.windows import Window, rolling_windows

__all__ = ["Generation", "Window", "generate", "rolling_windows"]
