"""Kotara: exact perplexity of two or more causal LMs, each alone and fused per token (DESIGN §5),
and text generated from the fused model (DESIGN §5a).

Layout: ``windows`` (the rolling-window protocol), ``loading`` (text, tokenizer, models), ``steps``
(what both scoring paths share: the fusion spec, a forward, device sync), ``evaluate`` (per token:
forwards, baselines, fusion via ``moc_kernels.fused_logit_nll_multi``, similarity), ``words`` /
``word_score`` / ``word_generate`` (per word, across tokenizers), ``generate`` (decoding from the
fused model via ``moc_kernels.fused_log_probs``), ``harness`` (the lm-eval model), ``report``
(console tables, JSON). ``cli`` (``kotara`` / ``kotara.py``) is the command line on top; nothing
here imports it.
"""

# moc_kernels first: see model/__init__.py (Triton's interpreter must be chosen before triton.language loads).
import moc_kernels  # noqa: F401

# isort: split
from kotara.generate import Generation, generate
from kotara.windows import Window, rolling_windows

__all__ = ["Generation", "Window", "generate", "rolling_windows"]
