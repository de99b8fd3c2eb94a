"""Checkpoints: the file format, and what a training run saves into it and restores from it.

A checkpoint is one ``torch.save`` file ``out_dir/checkpoints/step_{step:08d}.pt`` holding the
model, optimizer and scheduler state dicts, the RNG states (python, numpy, torch CPU, every CUDA
device), the step (which is the data position: sampling is a function of (seed, step, rank)) and
the run's config. It is written to a temporary file in the same directory, flushed to disk, then
``os.replace``-d: a crash leaves either the previous checkpoint or the new one, never half of one.

The low-level half (``save_checkpoint``, ``load_checkpoint``, ``latest_checkpoint``, RNG capture)
knows nothing of training; :class:`RunCheckpointer` is the half that does: which state a run saves
(plain or FSDP2 full state dicts, each rank's RNG) and how a later call resumes from it.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from model.config import ModelConfig
from model.distributed import DistInfo, is_fsdp
from model.outputs import describe_unreadable
from model.train_config import ConfigError, TrainConfig

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{8})\.pt$")
_TEMPORARY = re.compile(r"^\.step_\d{8}\.pt\..*\.tmp$")  # atomic_save's temporaries of checkpoints
# Run keys that change the trajectory of a run: a resume with any of them changed is not the run that
# was checkpointed (refused, or accepted with --allow-config-change and a warning, as torchtitan does).
TRAJECTORY_KEYS = (
    "seed",
    "learning_rate",
    "min_lr",
    "warmup_steps",
    "batch_size",
    "gradient_accumulation_steps",
    "weight_decay",
    "beta1",
    "beta2",
    "grad_clip",
    "dtype",
)


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be used (empty, truncated, not a checkpoint, wrong structure): one line."""


class NonFiniteError(RuntimeError):
    """NaN/inf where a run must not have it (loss, gradients, weights about to be saved); exit code 1."""


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Raise NonFiniteError naming the first tensor of ``state`` holding a NaN or an inf."""
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(
                f"{what}: weight {name!r} holds NaN/inf values; nothing was written (the last good checkpoint is kept)"
            )


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``out_dir``, oldest first (temporary files are never listed)."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file next to ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def prune(out_dir: str | Path, keep: int, among: list[Path] | None = None) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints; returns the deleted paths.

    ``among``: only these files may be deleted (a run prunes the checkpoints it wrote, never another
    run's); None considers every checkpoint in ``out_dir``.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    allowed = None if among is None else {Path(p).resolve() for p in among}
    candidates = [p for p in list_checkpoints(out_dir) if allowed is None or p.resolve() in allowed]
    old = candidates[:-keep]
    for path in old:
        path.unlink(missing_ok=True)
    return old


def remove_temporaries(out_dir: str | Path) -> list[Path]:
    """Delete the temporary files of checkpoint saves that were killed (``.step_*.pt.*.tmp``); returns them."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = sorted(p for p in folder.iterdir() if _TEMPORARY.match(p.name) and p.is_file())
    for path in found:
        path.unlink(missing_ok=True)
    return found


def rng_state() -> dict[str, Any]:
    """Every RNG that training may consume: python, numpy, torch CPU and each CUDA device."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
    keep: int = 3,
    prune_among: list[Path] | None = None,
) -> Path:
    """Write the checkpoint of ``step`` atomically and prune older ones beyond ``keep``.

    Refuses (NonFiniteError, nothing written) model weights holding NaN/inf. ``prune_among``: the only
    older checkpoints pruning may delete (see :func:`prune`).
    """
    check_finite(model_state, f"checkpoint of step {step}")
    payload = {
        "step": step,
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler_state,
        "rng": rng_state(),
        "config": config,
        "extra": extra or {},
    }
    path = atomic_save(payload, checkpoint_path(out_dir, step))
    prune(out_dir, keep, among=None if prune_among is None else [*prune_among, path])
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (it holds numpy/python RNG states, so not weights_only).

    Raises CheckpointError (one line naming the file and why) for a missing, empty, truncated or
    foreign file, and for one whose structure is not a checkpoint of this trainer's (a mapping with an
    integer ``step``, a ``model`` state dict of tensors, and for a full checkpoint ``optimizer``,
    ``scheduler``, ``rng`` and ``extra``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception:  # torch.load's errors for a damaged file are of many types and say little
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be loaded: {describe_unreadable(path)}") from None
    problem = _structure_problem(ckpt)
    if problem:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a checkpoint of this trainer: {problem}")
    return ckpt


def state_mismatch(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    """How a model state dict differs from a model's (``expected``): missing and unexpected keys, shapes; or None."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} key(s) missing (first {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) (first {unexpected[0]!r})")
    if shapes:
        k = shapes[0]
        parts.append(
            f"{len(shapes)} of another shape (first {k!r}: {list(state[k].shape)} here, "
            f"{list(expected[k].shape)} in the model)"
        )
    return "; ".join(parts) or None


def _structure_problem(ckpt: Any) -> str | None:
    """What is missing or of the wrong type in a loaded checkpoint, or None when it has the expected shape."""
    if not isinstance(ckpt, dict):
        return f"it holds a {type(ckpt).__name__}, not a mapping"
    step = ckpt.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"'step' must be an integer >= 0, got {step!r}"
    model = ckpt.get("model")
    if not isinstance(model, dict) or not model:
        return "'model' is missing or not a state dict"
    bad = next((k for k, v in model.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        return f"'model' entry {bad!r} is a {type(model[bad]).__name__}, not a tensor"
    if not isinstance(ckpt.get("config", {}), dict) or not isinstance(ckpt.get("extra", {}), dict):
        return "'config' and 'extra' must be mappings"
    if "optimizer" in ckpt:
        for key in ("optimizer", "scheduler", "rng", "extra"):
            if not isinstance(ckpt.get(key), dict):
                return f"a full checkpoint needs a mapping {key!r}, got {type(ckpt.get(key)).__name__}"
    return None


# --------------------------------------------------------------------------------------------------
# What a training run saves and restores


class RunCheckpointer:
    """Saves a training run's state at a step and resumes a run from a checkpoint (every rank calls both).

    What is saved: the model and optimizer state dicts (with FSDP2 gathered into full, CPU-resident
    ones, so a checkpoint loads on any world size and into a plain model), the scheduler, the
    GradScaler, ``state_format`` (``fsdp`` or ``plain``), the run's config with its ``model_config``,
    and every rank's RNG state (``rng_per_rank``, so dropout resumes exactly on each rank). Rank 0
    writes the file; the gathers are collective, so every rank must call :meth:`save`.

    What :meth:`resume` accepts, three kinds of checkpoint:

    - none (``--resume`` with an empty ``out_dir``): not this class's business, the run starts fresh;
    - weights only (no ``optimizer`` key: ``python -m model.convert_original`` writes these): the
      weights are loaded and the run starts at step 0 with a fresh AdamW, the config's warmup and
      schedule, and the seed's RNG;
    - a full checkpoint of this trainer: model, optimizer, scheduler, scaler and RNG are restored and
      the run continues at its step.

    Refused (ConfigError): a checkpoint whose model keys differ from this run's (the kernels backend
    may change between segments, same math; model keys added after the checkpoint was written take
    their defaults, which was its behaviour), a full checkpoint of the other state format (FSDP
    and plain optimizer states are keyed differently), a full checkpoint whose run keys that shape the
    trajectory (``TRAJECTORY_KEYS``: seed, batch size, learning rate...) differ from this run's unless
    ``allow_config_change`` (then a warning names them), and one whose step is beyond ``max_steps``.

    :meth:`resume_latest` skips damaged checkpoints (empty, truncated, foreign, wrong structure) and
    resumes from the newest intact one, saying which it skipped and why.

    Pruning deletes only the checkpoints this run owns: those it wrote, and on resume the ones of the
    run it continues (steps up to the resumed one) -- never another run's files.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model_cfg: ModelConfig,
        dist_info: DistInfo,
        raw_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        allow_config_change: bool = False,
    ) -> None:
        """``raw_model``: the model itself, not its DDP wrapper (FSDP2 shards it in place)."""
        self.cfg, self.model_cfg, self.dist_info = cfg, model_cfg, dist_info
        self.raw_model, self.optimizer, self.scheduler, self.scaler = raw_model, optimizer, scheduler, scaler
        self.fsdp = is_fsdp(cfg, dist_info)
        self.allow_config_change = allow_config_change
        self.owned: list[Path] = []  # the checkpoints pruning may delete

    @property
    def state_format(self) -> str:
        return "fsdp" if self.fsdp else "plain"

    def save(self, step: int) -> Path | None:
        """Write the checkpoint of ``step`` (rank 0) and prune old ones; its path on rank 0, None elsewhere."""
        model_state, optim_state = self._model_and_optim_state()
        extra: dict[str, Any] = {"scaler": self.scaler.state_dict(), "state_format": self.state_format}
        if self.dist_info.enabled:  # each rank's RNG (dropout) so that resume is exact on every rank
            gathered = [None] * self.dist_info.world_size
            dist.all_gather_object(gathered, rng_state())
            extra["rng_per_rank"] = dict(enumerate(gathered))
        if not self.dist_info.is_main:
            return None
        config = self.cfg.to_dict() | {"model_config": self.model_cfg.to_dict()}
        path = save_checkpoint(
            self.cfg.out_dir,
            step,
            model_state,
            optim_state,
            self.scheduler.state_dict(),
            config,
            extra,
            keep=self.cfg.keep_checkpoints,
            prune_among=self.owned,
        )
        self.owned = [p for p in [*self.owned, path] if p.exists()]
        return path

    def resume_latest(self) -> tuple[Path | None, int | None, list[str]]:
        """Resume from the newest intact checkpoint in ``out_dir``: ``(path or None, step or None, skipped)``.

        ``skipped`` says, one line each, which newer checkpoints were damaged and why. No checkpoint
        at all gives ``(None, None, [])``; only damaged ones is a CheckpointError listing them.
        """
        found = list_checkpoints(self.cfg.out_dir)
        skipped: list[str] = []
        for path in reversed(found):
            try:
                step = self.resume(path)
            except CheckpointError as e:
                skipped.append(str(e))
                continue
            resumed_at = 0 if step is None else step
            self.owned = [p for p in found if int(_NAME.match(p.name).group(1)) <= resumed_at]
            return path, step, skipped
        if skipped:
            raise CheckpointError(
                f"no intact checkpoint in {str(Path(self.cfg.out_dir) / CHECKPOINT_DIR)!r}: " + "; ".join(skipped)
            )
        return None, None, []

    def resume(self, path: Path) -> int | None:
        """Restore the run from the checkpoint at ``path``: the step it continues from, None for weights only.

        None means the caller starts at step 0 and seeds the RNG itself (as for a fresh start).
        Raises CheckpointError for a damaged file, ConfigError for one this run must not continue.
        """
        ckpt = load_checkpoint(path, map_location="cpu")
        self._refuse_other_model(ckpt, path)
        mismatch = state_mismatch(ckpt["model"], self.raw_model.state_dict())
        if mismatch:
            raise CheckpointError(f"checkpoint {str(path)!r} does not fit this run's model: {mismatch}")
        if "optimizer" not in ckpt:
            self._fit(path, lambda: self._load_model_state(ckpt["model"]))
            return None
        saved_format = ckpt["extra"].get("state_format", "plain")
        if saved_format != self.state_format:
            raise ConfigError(
                f"cannot resume from {path}: it was written by a {saved_format} run and this run is "
                f"{'fsdp' if self.fsdp else 'plain/ddp'} (optimizer states are keyed differently); "
                "resume in the same mode"
            )
        step = int(ckpt["step"])
        if step > self.cfg.max_steps:
            raise ConfigError(
                f"cannot resume from {path}: it is at step {step}, beyond max_steps={self.cfg.max_steps}; "
                f"raise max_steps above {step} to train on, or use --export-only to export it"
            )
        self._refuse_other_run_keys(ckpt, path)
        self._fit(path, lambda: self._load_training_state(ckpt))
        rng = ckpt["extra"].get("rng_per_rank", {}).get(self.dist_info.rank, ckpt["rng"])
        self._fit(path, lambda: set_rng_state(rng))
        return step

    @staticmethod
    def _fit(path: Path, load: Any) -> None:
        """Run ``load`` (a load_state_dict); a state that does not fit this run is a CheckpointError."""
        try:
            load()
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            said = " ".join(str(e).split()) or type(e).__name__  # the whole message, on one line
            raise CheckpointError(f"checkpoint {str(path)!r} does not fit this run: {said}") from None

    def _refuse_other_run_keys(self, ckpt: dict[str, Any], path: Path) -> None:
        """ConfigError naming the trajectory keys that differ from the checkpoint's (a warning when allowed)."""
        saved = ckpt.get("config", {})
        this = self.cfg.to_dict()
        changed = [k for k in TRAJECTORY_KEYS if k in saved and saved[k] != this[k]]
        if not changed:
            return
        what = ", ".join(f"{k} {saved[k]!r} -> {this[k]!r}" for k in changed)
        if not self.allow_config_change:
            raise ConfigError(
                f"cannot resume from {path}: this run changes {what}; a resumed run must be the run that was "
                "checkpointed: restore those keys, or pass --allow-config-change to continue with the new values"
            )
        self.dist_info.say(f"[train] WARNING: --allow-config-change: resuming {path} with {what}")

    def _refuse_other_model(self, ckpt: dict[str, Any], path: Path) -> None:
        saved_keys = ckpt.get("config", {}).get("model_config", {})
        if not isinstance(saved_keys, dict):
            raise CheckpointError(f"checkpoint {str(path)!r}: its config's 'model_config' is not a mapping")
        if not saved_keys:  # a checkpoint that does not say its model (nothing to compare)
            return
        saved_model = {
            k: v for k, v in (ModelConfig().to_dict() | ModelConfig.saved_keys(saved_keys)).items() if k != "kernels"
        }
        this_model = {k: v for k, v in self.model_cfg.to_dict().items() if k != "kernels"}
        if saved_model != this_model:
            changed = sorted(k for k in this_model if saved_model.get(k) != this_model[k])
            raise ConfigError(
                f"cannot resume from {path}: model keys differ from the checkpoint's: {', '.join(changed)}"
            )

    def _model_and_optim_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        if self.fsdp:  # gather full, CPU-resident state dicts so a checkpoint loads on any world size
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_state_dict(self.raw_model, self.optimizer, options=options)
        return self.raw_model.state_dict(), self.optimizer.state_dict()

    def _load_model_state(self, model_state: dict[str, torch.Tensor]) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.raw_model, model_state, options=StateDictOptions(full_state_dict=True))
        else:
            self.raw_model.load_state_dict(model_state)

    def _load_training_state(self, ckpt: dict[str, Any]) -> None:
        """Model, optimizer, scheduler and scaler of a full checkpoint (every rank reads the whole file)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(
                self.raw_model,
                self.optimizer,
                model_state_dict=ckpt["model"],
                optim_state_dict=ckpt["optimizer"],
                options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False),
            )
        else:
            self.raw_model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt["extra"]:
            self.scaler.load_state_dict(ckpt["extra"]["scaler"])
