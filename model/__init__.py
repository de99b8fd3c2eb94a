"""LunarisCodex-MoC: a Llama-style LM with Mixture of Collaborative Experts FFNs (DESIGN §2).

Importing the package registers the ``lunaris_moc`` model type with transformers' AutoConfig and
AutoModelForCausalLM, so exported directories load with ``AutoModelForCausalLM.from_pretrained``.

Build, train a step, save, load and generate::

    import torch, model
    from transformers import AutoModelForCausalLM

    config = model.ModelConfig.from_dict({"d_model": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 2048,
                                          "multiple_of": 32, "n_experts": 4, "top_k": 2})
    lm = model.LunarisLM(config)
    ids = torch.randint(0, 2048, (2, 33))
    out = lm(ids[:, :-1], targets=ids[:, 1:])          # logits, loss (main CE), aux_loss, stats
    (out.loss + out.aux_loss).backward()
    path = model.export_hf(lm, "out/hf", tokenizer="data_cache/.../tokenizer")  # tokenizer optional
    hf = AutoModelForCausalLM.from_pretrained(path)     # or trust_remote_code=True without this package
    hf.generate(ids[:, :8], max_new_tokens=20, do_sample=False)
"""

from transformers import AutoConfig, AutoModelForCausalLM

from model.config import ModelConfig
from model.hf import MODEL_TYPE, LunarisConfig, LunarisForCausalLM, export_hf
from model.lm import LMOutput, LunarisLM

AutoConfig.register(MODEL_TYPE, LunarisConfig, exist_ok=True)
AutoModelForCausalLM.register(LunarisConfig, LunarisForCausalLM, exist_ok=True)

__all__ = ["LMOutput", "LunarisConfig", "LunarisForCausalLM", "LunarisLM", "ModelConfig", "export_hf"]
