"""Kotara: exact perplexity of two or more causal LMs, each alone and fused per token (DESIGN §5).

Layout: ``windows`` (the rolling-window protocol), ``loading`` (text, tokenizer, models),
``evaluate`` (one pass: forwards, baselines, fusion via ``moc_kernels.fused_logit_nll_multi``,
similarity), ``similarity``, ``report`` (console table, JSON), ``cli`` (``kotara`` / ``kotara.py``).
"""

from kotara.windows import Window, rolling_windows

__all__ = ["Window", "rolling_windows"]
