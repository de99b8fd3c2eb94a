"""LunarisCodex-MoC: a Llama-style LM with Mixture of Collaborative Experts FFNs (DESIGN §2).

Importing the package registers the ``lunaris_moc`` model type with transformers' AutoConfig and
AutoModelForCausalLM, so exported directories load with ``AutoModelForCausalLM.from_pretrained``.

Build, train a step, export, load and generate: see the README's "The model" section.

Nothing here imports transformers (several seconds) until it is used: the package's names load on
first access (``from model import LunarisLM`` imports ``model.lm`` only), and the registration runs
as soon as transformers' auto classes are imported, before any of them can read a config: at once if
they already are, else right after ``transformers.models.auto.configuration_auto`` loads. Training,
``model.info`` and the benchmarks never pay for transformers; whoever loads an export still finds
``lunaris_moc`` registered.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from typing import Any

# moc_kernels first: without CUDA it switches Triton to its interpreter, which must happen before anything
# (transformers, for one) imports triton.language; then `import model` in any order keeps kernels="triton" usable.
import moc_kernels  # noqa: F401

# Public name -> the module that defines it (loaded on first access, PEP 562).
_LAZY = {
    "ModelConfig": "model.config",
    "LMOutput": "model.lm",
    "LunarisLM": "model.lm",
    "LunarisConfig": "model.hf",
    "LunarisForCausalLM": "model.hf",
    "export_hf": "model.hf",
    "MODEL_TYPE": "model.hf",
}
__all__ = ["LMOutput", "LunarisConfig", "LunarisForCausalLM", "LunarisLM", "ModelConfig", "export_hf"]

# Once this module is loaded, transformers' auto classes can read configs (AutoConfig, AutoModelForCausalLM
# and AutoTokenizer all import it).
_AUTO_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
_registered = False
_registering = False
_executing: list[str] = []  # the watched modules being executed now (nested imports), innermost last


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'model' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def register_auto_classes() -> None:
    """Register ``lunaris_moc`` with AutoConfig and AutoModelForCausalLM (idempotent)."""
    global _registered, _registering
    # _registering: the imports below come back here. No lock: registering twice (two threads) is harmless
    # (exist_ok), while a lock held across imports could deadlock with another thread's import of model.hf.
    if _registered or _registering:
        return
    _registering = True
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        from model.hf import MODEL_TYPE, LunarisConfig, LunarisForCausalLM

        AutoConfig.register(MODEL_TYPE, LunarisConfig, exist_ok=True)
        AutoModelForCausalLM.register(LunarisConfig, LunarisForCausalLM, exist_ok=True)
        _registered = True
        _FINDER.remove()
    finally:
        _registering = False


def _watched(name: str) -> bool:
    return name == "model.hf" or name == "transformers" or name.startswith("transformers.")


def _after_import() -> None:
    # Register as soon as the auto classes are loaded, but never in the middle of an import of
    # transformers or of model.hf (their modules would be half done): the outermost one's end does it.
    if not _registered and not _executing and _AUTO_CONFIG_MODULE in sys.modules:
        register_auto_classes()


class _RegisterWhenAutoLoads(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of every transformers module and of ``model.hf`` so that
    :func:`register_auto_classes` runs right after the outermost of them has executed; leaves
    ``sys.meta_path`` once the registration is done."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if _registered:
            self.remove()
            return None
        if not _watched(fullname):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            _executing.append(fullname)
            try:
                exec_module(module)
            finally:
                _executing.remove(fullname)
            _after_import()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec

    def remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


_FINDER = _RegisterWhenAutoLoads()
if _AUTO_CONFIG_MODULE in sys.modules:
    register_auto_classes()
else:
    sys.meta_path.insert(0, _FINDER)
