"""Kotara: exact perplexity of two or more causal LMs, each alone and fused per token (DESIGN §5),
and text generated from the fused model (DESIGN §5a).

Layout: ``windows`` (the rolling-window protocol), ``loading`` (text, tokenizer, models),
``evaluate`` (one pass: forwards, baselines, fusion via ``moc_kernels.fused_logit_nll_multi``,
similarity), ``generate`` (decoding from the fused model via ``moc_kernels.fused_log_probs``),
``similarity``, ``report`` (console table, JSON), ``cli`` (``kotara`` / ``kotara.py``).
"""

from kotara.generate import Generation, generate
from kotara.windows import Window, rolling_windows

__all__ = ["Generation", "Window", "generate", "rolling_windows"]
