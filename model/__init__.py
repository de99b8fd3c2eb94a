"""LunarisCodex-MoC: a Llama-style LM with Mixture of Collaborative Experts FFNs (DESIGN §2)."""

from model.config import ModelConfig
from model.lm import LMOutput, LunarisLM

__all__ = ["LMOutput", "LunarisLM", "ModelConfig"]
