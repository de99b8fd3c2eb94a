"""LunarisCodex-MoC: a Llama-style LM with Mixture of Collaborative Experts FFNs (DESIGN §2).

Importing the package registers the ``lunaris_moc`` model type with transformers' AutoConfig and
AutoModelForCausalLM, so exported directories load with ``AutoModelForCausalLM.from_pretrained``.

Build, train a step, export, load and generate: see the README's "The model" section.
"""

# moc_kernels first: without CUDA it switches Triton to its interpreter, which must happen before anything
# (transformers, here) imports triton.language; then `import model` in any order keeps kernels="triton" usable.
import moc_kernels  # noqa: F401

# isort: split
from transformers import AutoConfig, AutoModelForCausalLM

from model.config import ModelConfig
from model.hf import MODEL_TYPE, LunarisConfig, LunarisForCausalLM, export_hf
from model.lm import LMOutput, LunarisLM

AutoConfig.register(MODEL_TYPE, LunarisConfig, exist_ok=True)
AutoModelForCausalLM.register(LunarisConfig, LunarisForCausalLM, exist_ok=True)

__all__ = ["LMOutput", "LunarisConfig", "LunarisForCausalLM", "LunarisLM", "ModelConfig", "export_hf"]
