"""The training loop of LunarisCodex-MoC: ``train(cfg)`` reads top to bottom, like nanoGPT's ``train.py``.

``train`` joins the process group (torchrun), then ``_run`` does, in order:

1. :func:`build_run` — device and precision, data (prepared on first use for the embedded corpus),
   model (DDP or FSDP2, optional torch.compile), AdamW with weight decay on matrices only, warmup +
   cosine schedule: one :class:`Run` that every later unit reads.
2. :func:`_resume_or_seed` — the latest checkpoint (:class:`model.checkpoint.RunCheckpointer` owns
   the kinds it accepts and the refusal rules), or the seed's RNG.
3. :class:`model.metrics.MetricsSink` — metrics.jsonl, W&B and the progress bar, for the whole loop.
4. :func:`_loop` — per step: the micro-batches' forward and backward, clipping, the non-finite
   check, the optimizer step; then log / evaluate / save when due.
5. :func:`_finish` — the loss-curve PNG and the Hugging Face export.

Only rank 0 prints, logs and writes files.

Reproducibility: the model is initialised from ``seed``; batches are a pure function of
``(seed, step, micro_step, rank)`` (``model.data.TokenData``); checkpoints hold every RNG state.
So a run resumed from step s produces bit-for-bit the losses of an uninterrupted run (fp32, CPU).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from model.checkpoint import (
    CHECKPOINT_DIR,
    NonFiniteError,
    RunCheckpointer,
    check_finite,
    list_checkpoints,
    remove_temporaries,
)
from model.config import ModelConfig
from model.data import META, DataError, TokenData, ensure_prepared
from model.distributed import DistInfo, is_fsdp, process_group, wrap_distributed
from model.metrics import METRICS_FILE, PLOT_FILE, MetricsSink, TokenRate, plot_losses
from model.outputs import ensure_writable_dir
from model.train_config import ConfigError, TrainConfig, build_model_config

HF_DIR = "hf"


class NonFiniteLossError(NonFiniteError):
    """Raised when the loss or gradient norm is NaN/inf; the run stops, the last good checkpoint stays."""


@dataclass
class TrainResult:
    """What a finished run returns (rank 0 has the complete history)."""

    out_dir: Path
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics.jsonl records of this call
    val_loss_start: float | None = None
    val_loss_end: float | None = None
    unigram_loss: float | None = None
    checkpoint: Path | None = None
    hf_dir: Path | None = None
    wall_seconds: float = 0.0


# --------------------------------------------------------------------------------------------------
# Before any work: the places the run reads and writes


def check_run_paths(cfg: TrainConfig, resume: bool, overwrite: bool, dist_info: DistInfo) -> None:
    """Refuse, before any data is prepared or any model built, a run that would fail late or destroy files.

    - ``data_dir`` that is a file; a missing ``data_dir`` with no ``corpus`` to prepare into it;
    - ``out_dir`` / ``out_dir/checkpoints`` that are files, cannot be created or are not writable (a
      read-only ``out_dir`` used to fail at the first or the final save, losing the run), and
      ``out_dir/hf`` or ``metrics.jsonl`` of the wrong kind;
    - a fresh run (no ``--resume``) into an ``out_dir`` holding another run's checkpoints or export:
      refused unless ``overwrite``, which then deletes that run's files (checkpoints, metrics, export).

    Temporaries of killed checkpoint saves are removed (rank 0). Raises ConfigError / DataError.
    """
    data_dir, out = Path(cfg.data_dir), Path(cfg.out_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"data_dir {str(data_dir)!r} is a file, not a prepared data directory")
    if not (data_dir / META).is_file():
        if cfg.corpus is None:
            state = "is not prepared (no meta.json)" if data_dir.is_dir() else "not found"
            raise DataError(
                f"data_dir {str(data_dir)!r} {state}: prepare it with python -m model.data prepare "
                "--input FILES --out DIR, or set corpus: stdlib to prepare the embedded corpus there"
            )
        ensure_writable_dir(data_dir.parent, "the folder of data_dir", ConfigError)
    for path, what in ((out / CHECKPOINT_DIR, "out_dir/checkpoints"), (out / HF_DIR, "out_dir/hf")):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{what} {str(path)!r} is a file, not a directory")
    for name in (METRICS_FILE, "config.json", PLOT_FILE):
        if (out / name).is_dir():
            raise ConfigError(f"{str(out / name)!r} is a directory; the run writes a file there")
    ensure_writable_dir(out, "out_dir", ConfigError)
    ensure_writable_dir(out / CHECKPOINT_DIR, "out_dir/checkpoints", ConfigError)
    if cfg.export_hf and (out / HF_DIR).is_dir():
        ensure_writable_dir(out / HF_DIR, "out_dir/hf", ConfigError)

    earlier = list_checkpoints(out)
    export_there = (out / HF_DIR).is_dir() and any((out / HF_DIR).iterdir())
    if not resume and (earlier or export_there):
        if not overwrite:
            held = f"checkpoints (up to {earlier[-1].name})" if earlier else "Hugging Face export (hf/)"
            raise ConfigError(
                f"out_dir {str(out)!r} holds another run's {held}: continue that run with --resume, "
                "start afresh there with --overwrite (deletes its checkpoints, metrics and hf/), "
                "or pick another out_dir"
            )
        if dist_info.is_main:
            _clear_run(out, earlier, dist_info)
    if dist_info.is_main:
        removed = remove_temporaries(out)
        if removed:
            dist_info.say(
                f"[train] removed {len(removed)} temporary file(s) of an interrupted checkpoint save: "
                + ", ".join(p.name for p in removed)
            )


def _clear_run(out: Path, checkpoints: list[Path], dist_info: DistInfo) -> None:
    """--overwrite: delete the files an earlier run wrote in ``out`` (only those: a user's other files stay)."""
    import shutil

    for path in checkpoints:
        path.unlink(missing_ok=True)
    for name in (METRICS_FILE, "config.json", PLOT_FILE):
        (out / name).unlink(missing_ok=True)
    if (out / HF_DIR).is_dir():
        shutil.rmtree(out / HF_DIR)
    dist_info.say(
        f"[train] --overwrite: deleted the earlier run in {out} ({len(checkpoints)} checkpoint(s), metrics, hf/)"
    )


# --------------------------------------------------------------------------------------------------
# Building the run


def resolve_device(cfg: TrainConfig, dist_info: DistInfo) -> torch.device:
    """``auto`` -> CUDA when available, else CPU. ``cuda`` without a GPU is a ConfigError."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but CUDA is not available (use --set device=cpu or auto)")
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", dist_info.local_rank)
    return torch.device("cpu")


def resolve_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The autocast dtype: ``auto`` is bf16 on CUDA and fp32 (no autocast) on CPU."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if cfg.dtype == "float16" and device.type != "cuda":
        raise ConfigError("dtype: float16 needs CUDA (use float32 or bfloat16 on CPU)")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.lr_floor + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.lr_floor)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (ndim >= 2: linears, embeddings, expert weights) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused AdamW is one kernel per step on CUDA; it does not exist for CPU tensors in every torch.
    return torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda" or None
    )


@dataclass
class Run:
    """Everything a training run is made of, built once by :func:`build_run` and read by every later unit.

    ``raw_model`` is the ``LunarisLM`` itself (state dicts, parameters, export); ``model`` is what the
    step calls: ``raw_model`` wrapped in DDP (or sharded in place by FSDP2) and/or compiled.
    ``autocast`` is a ``torch.autocast`` of ``amp_dtype``, or a null context for fp32.
    """

    cfg: TrainConfig
    model_cfg: ModelConfig
    dist: DistInfo
    device: torch.device
    amp_dtype: torch.dtype
    autocast: AbstractContextManager
    data: TokenData
    raw_model: nn.Module
    model: nn.Module
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def fsdp(self) -> bool:
        return is_fsdp(self.cfg, self.dist)

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step, all ranks together."""
        cfg = self.cfg
        return cfg.batch_size * cfg.gradient_accumulation_steps * self.model_cfg.max_seq_len * self.dist.world_size


def build_run(cfg: TrainConfig, dist_info: DistInfo) -> Run:
    """Device, precision, data, model (wrapped, compiled), AdamW, schedule and scaler of ``cfg``, on this rank.

    Every rank builds the same initial weights from ``cfg.seed``. Rank 0 prepares the embedded
    corpus on first use; the others wait for it at a barrier.
    Raises ConfigError for a device or dtype this machine lacks, or a bad model key.
    """
    device = resolve_device(cfg, dist_info)
    if device.type == "cpu" and cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)
    amp_dtype = resolve_dtype(cfg, device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype != torch.float32 else contextlib.nullcontext()
    model_cfg = build_model_config(cfg.model, cfg.kernels)

    if dist_info.is_main:
        ensure_prepared(cfg.data_dir, cfg.corpus, model_cfg.vocab_size, cfg.val_fraction)
    if dist_info.enabled:
        dist.barrier()
    data = TokenData(cfg.data_dir, model_cfg.max_seq_len, model_cfg.vocab_size)

    from model.lm import LunarisLM

    seed_everything(cfg.seed)
    raw_model = LunarisLM(model_cfg).to(device)
    model = wrap_distributed(raw_model, cfg, dist_info, device)
    if cfg.compile:
        model = torch.compile(model)
    optimizer = make_optimizer(raw_model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg) / cfg.learning_rate)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return Run(
        cfg, model_cfg, dist_info, device, amp_dtype, autocast, data, raw_model, model, optimizer, scheduler, scaler
    )


def _resume_or_seed(run: Run, checkpointer: RunCheckpointer, resume: bool) -> tuple[Path | None, int | None]:
    """Where this call starts: ``(checkpoint loaded or None, the step it continues from or None)``.

    With ``resume``, the newest intact checkpoint in ``out_dir`` (``RunCheckpointer.resume_latest``
    skips damaged ones and says so; see ``RunCheckpointer`` for the kinds and the refusals); a step of
    None (no checkpoint, or weights only) starts at step 0 with each rank's RNG seeded from
    ``seed + rank``, so that dropout differs between ranks (the initial weights were already drawn
    identically).
    """
    ckpt_path, resumed_step, skipped = checkpointer.resume_latest() if resume else (None, None, [])
    for reason in skipped:
        run.dist.say(f"[train] --resume: skipped a damaged checkpoint: {reason}")
    if resume and ckpt_path is None:
        run.dist.say(f"[train] --resume: no checkpoint in {run.out_dir / 'checkpoints'}, starting from step 0")
    if resumed_step is None:
        seed_everything(run.cfg.seed + run.dist.rank)
    if ckpt_path is not None and resumed_step is None:
        run.dist.say(
            f"[train] starting at step 0 from the weights of {ckpt_path} (no optimizer state: fresh AdamW, schedule)"
        )
    elif ckpt_path is not None:
        run.dist.say(f"[train] resumed from {ckpt_path} at step {resumed_step}")
    return ckpt_path, resumed_step


def _describe(run: Run) -> float | None:
    """Print what is about to train (rank 0); the unigram baseline's val loss (rank 0, None elsewhere)."""
    data, say = run.data, run.dist.say
    unigram = data.unigram_loss() if run.dist.is_main else None
    say(
        f"[train] {run.raw_model.num_parameters():,} parameters ({run.model_cfg.ffn_label}), "
        f"device {run.device}, {str(run.amp_dtype).replace('torch.', '')}, world {run.dist.world_size}, "
        f"{run.tokens_per_step:,} tokens/step, {run.cfg.max_steps} steps; data {data.tokens('train'):,} train / "
        f"{data.tokens('val'):,} val tokens"
    )
    if unigram is not None:
        say(f"[train] unigram baseline val loss {unigram:.4f} (ppl {math.exp(unigram):.1f})")
    return unigram


# --------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module, data: TokenData, cfg: TrainConfig, device, autocast, dist_info: DistInfo
) -> tuple[float, float]:
    """Mean main loss over the fixed validation windows (all ranks) and its perplexity."""
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)  # [sum of token losses, tokens]
    for inputs, targets in data.val_batches(cfg.eval_batches, cfg.batch_size, dist_info.rank, dist_info.world_size):
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast:
            out = model(inputs, targets)
        n = targets.numel()
        total += torch.stack([out.loss.double() * n, torch.tensor(float(n), device=device, dtype=torch.float64)])
    if dist_info.enabled:
        dist.all_reduce(total)
    model.train()
    loss = float(total[0] / total[1])
    return loss, math.exp(min(loss, 700.0))


def _validate(run: Run) -> tuple[float, float]:
    return evaluate(run.model, run.data, run.cfg, run.device, run.autocast, run.dist)


# --------------------------------------------------------------------------------------------------
# The run


def train(
    cfg: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    overwrite: bool = False,
    allow_config_change: bool = False,
) -> TrainResult:
    """Train (or resume) the run described by ``cfg``; see the module docstring.

    Args:
        resume: continue from the newest intact checkpoint in ``cfg.out_dir`` (a fresh start when there is none).
        progress: show a tqdm bar (rank 0).
        on_step: called with the number of completed steps after each step's logging/saving (tests
            use it to interrupt a run).
        overwrite: a fresh run into an ``out_dir`` holding another run's files deletes them first
            (without it, such an ``out_dir`` is refused).
        allow_config_change: resume although seed, batch size, learning rate... differ from the
            checkpoint's (a warning names them; without it, refused).
    Raises:
        ConfigError / DataError for user errors (all of them before any step runs), NonFiniteError
        when the loss diverges or weights about to be saved are not finite.
    """
    t_start = time.time()
    device_type = "cuda" if (cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())) else "cpu"
    with process_group(device_type) as dist_info:
        check_run_paths(cfg, resume, overwrite, dist_info)
        result = _run(cfg, dist_info, resume, progress, on_step, allow_config_change)
    result.wall_seconds = time.time() - t_start
    dist_info.say(
        f"[train] done: {result.steps} steps in {result.wall_seconds:.1f}s; val loss "
        f"{result.val_loss_start if result.val_loss_start is None else f'{result.val_loss_start:.4f}'} -> "
        f"{result.val_loss_end if result.val_loss_end is None else f'{result.val_loss_end:.4f}'}"
        + (f" (unigram baseline {result.unigram_loss:.4f})" if result.unigram_loss is not None else "")
    )
    return result


def _run(
    cfg: TrainConfig,
    dist_info: DistInfo,
    resume: bool,
    progress: bool,
    on_step: Callable[[int], None] | None,
    allow_config_change: bool = False,
) -> TrainResult:
    """``train`` inside its process group: build, resume (or seed), the loop inside the metrics sink, the end."""
    run = build_run(cfg, dist_info)
    checkpointer = RunCheckpointer(
        cfg, run.model_cfg, dist_info, run.raw_model, run.optimizer, run.scheduler, run.scaler, allow_config_change
    )
    ckpt_path, resumed_step = _resume_or_seed(run, checkpointer, resume)
    start_step = 0 if resumed_step is None else resumed_step
    with MetricsSink(cfg, dist_info, resumed_step, checkpoint_loaded=ckpt_path is not None) as sink:
        unigram = _describe(run)
        result = TrainResult(out_dir=run.out_dir, steps=start_step, unigram_loss=unigram)
        if start_step == 0:
            val_loss, val_ppl = _validate(run)
            result.val_loss_start = val_loss
            dist_info.say(f"[train] step 0: val loss {val_loss:.4f} (ppl {val_ppl:.1f})")
            record = {"val/loss": val_loss, "val/perplexity": val_ppl, "val/unigram_loss": unigram}
            sink.emit({"step": 0} | record)
        sink.start_progress(start_step, cfg.max_steps, enabled=progress)
        _loop(run, checkpointer, sink, result, start_step, on_step)
    result.history = sink.added
    _finish(run, sink.history, result)
    return result


def _loop(
    run: Run,
    checkpointer: RunCheckpointer,
    sink: MetricsSink,
    result: TrainResult,
    start_step: int,
    on_step: Callable[[int], None] | None,
) -> None:
    """Optimizer steps ``start_step + 1 .. max_steps``: train, then log / evaluate / save when due (and at the end).

    Updates ``result`` (steps, val_loss_end, checkpoint) as it goes. The host reads device values only
    on steps that log, evaluate or save (elsewhere the GPU queue never drains); a NaN/inf loss or
    gradient raises NonFiniteLossError at the first such step, before its optimizer step, so nothing
    non-finite is ever logged as good, evaluated or saved.
    """
    cfg = run.cfg
    run.model.train()
    token_rate = TokenRate()
    watch = NonFiniteWatch(run.device)
    for step in range(start_step, cfg.max_steps):
        losses = _forward_backward(run, step)  # every micro-batch; gradients summed in .grad
        grad_norm = _clip_gradients(run)
        watch.observe(run, losses, grad_norm, step)
        done = step + 1
        last = done == cfg.max_steps
        log_due = done % cfg.log_interval == 0 or last
        eval_due = done % cfg.eval_interval == 0 or last
        save_due = done % cfg.save_interval == 0 or last
        if log_due or eval_due or save_due:
            watch.raise_if_seen()  # the one host sync of a step, and only of these steps
        lr = _optimizer_step(run)
        result.steps = done
        token_rate.add(run.tokens_per_step)

        record: dict[str, Any] = {}
        if log_due:
            record |= _train_metrics(run, losses, grad_norm, lr, token_rate.take())
            sink.show_loss(record["loss/main"], record["tokens_per_sec"])
        if eval_due:
            val_loss, val_ppl = _validate(run)
            record |= {"val/loss": val_loss, "val/perplexity": val_ppl}
            result.val_loss_end = val_loss
            sink.write(f"[train] step {done}: val loss {val_loss:.4f} (ppl {val_ppl:.1f})")
        if record:
            sink.emit({"step": done} | record)
        if save_due:
            result.checkpoint = checkpointer.save(done) or result.checkpoint
        sink.step_done()
        if on_step is not None:
            on_step(done)


class NonFiniteWatch:
    """The first optimizer step whose loss or gradient norm was NaN/inf, kept on the device.

    :meth:`observe` runs every step and never makes the host wait (no ``.item()``); :meth:`raise_if_seen`
    is the host's read, called only on steps that log, evaluate or save. Between two reads a NaN step
    can reach the weights, which is why every read comes before anything is logged, evaluated or
    saved, and why a checkpoint refuses non-finite weights anyway (``model.checkpoint.check_finite``).
    """

    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.zeros((), dtype=torch.int64, device=device)  # 0: none yet
        self.values = torch.zeros(2, device=device)  # [loss, grad norm] of that step

    def observe(self, run: Run, losses: StepLosses, grad_norm: torch.Tensor, step: int) -> None:
        main_sum = losses.main_sum
        check = torch.stack([main_sum + losses.aux_sum, grad_norm.detach().to(device=run.device, dtype=main_sum.dtype)])
        if run.dist.enabled:
            dist.all_reduce(check)  # every rank must stop together
        newly = ~torch.isfinite(check).all() & (self.first_bad == 0)
        self.first_bad.masked_fill_(newly, step + 1)
        self.values = torch.where(newly, check.to(self.values.dtype), self.values)

    def raise_if_seen(self) -> None:
        bad_step = int(self.first_bad)
        if bad_step:
            loss, norm = self.values.tolist()
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {bad_step} (loss {loss:.4g}, grad norm {norm:.4g}); "
                "stopped, the last good checkpoint is kept"
            )


# --------------------------------------------------------------------------------------------------
# One optimizer step, in the order the loop calls them


@dataclass
class StepLosses:
    """One optimizer step's losses on this rank: sums over its micro-batches (0-d fp32, device, detached)."""

    main_sum: torch.Tensor
    aux_sum: torch.Tensor
    stats: dict[str, torch.Tensor]  # the last micro-batch's routing stats (``LMOutput.stats``)


def _forward_backward(run: Run, step: int) -> StepLosses:
    """Forward and backward of every micro-batch of optimizer step ``step`` (this rank's slice of the batch).

    Each backward is of ``(main + aux) / gradient_accumulation_steps``, so the summed gradients are the
    step's mean. DDP all-reduces gradients only on the last micro-batch (``no_sync`` before it).
    """
    cfg, dist_info = run.cfg, run.dist
    micro_steps = cfg.gradient_accumulation_steps
    pin = run.device.type == "cuda"
    main_sum = torch.zeros((), device=run.device)
    aux_sum = torch.zeros((), device=run.device)
    last_stats: dict[str, torch.Tensor] = {}
    for micro in range(micro_steps):
        inputs, targets = run.data.train_batch(
            cfg.seed, step, micro, cfg.batch_size, dist_info.rank, dist_info.world_size, pin_memory=pin
        )
        # From pinned memory the copy is asynchronous: the host goes on queueing this step's kernels.
        inputs, targets = inputs.to(run.device, non_blocking=True), targets.to(run.device, non_blocking=True)
        last_micro = micro == micro_steps - 1
        no_sync = dist_info.enabled and not run.fsdp and not last_micro
        with run.model.no_sync() if no_sync else contextlib.nullcontext():
            with run.autocast:
                out = run.model(inputs, targets)
            loss = (out.loss + out.aux_loss) / micro_steps
            run.scaler.scale(loss).backward()
        main_sum += out.loss.detach()
        aux_sum += out.aux_loss.detach()
        last_stats = out.stats
    return StepLosses(main_sum, aux_sum, last_stats)


def _clip_gradients(run: Run) -> torch.Tensor:
    """Unscale (fp16), clip to ``grad_clip`` (0: measure only); the global gradient norm before clipping (0-d)."""
    run.scaler.unscale_(run.optimizer)
    # max_norm=inf measures the norm without changing the gradients (the clip factor is clamped to 1).
    max_norm = run.cfg.grad_clip if run.cfg.grad_clip > 0 else math.inf
    grad_norm = nn.utils.clip_grad_norm_(run.raw_model.parameters(), max_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, already the global norm
        grad_norm = grad_norm.full_tensor()
    return grad_norm


def _optimizer_step(run: Run) -> float:
    """AdamW step (through the GradScaler), gradients cleared, schedule advanced; the lr this step used."""
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    return lr


def _train_metrics(
    run: Run, losses: StepLosses, grad_norm: torch.Tensor, lr: float, tokens_per_sec: float
) -> dict[str, Any]:
    """The log record of a step: mean losses over micro-batches and ranks, lr, grad norm, throughput, routing."""
    mean_losses = torch.stack([losses.main_sum, losses.aux_sum]) / run.cfg.gradient_accumulation_steps
    if run.dist.enabled:
        dist.all_reduce(mean_losses)
        mean_losses /= run.dist.world_size
    main_loss, aux_loss = mean_losses.tolist()
    record = {
        "loss/main": main_loss,
        "loss/aux": aux_loss,
        "perplexity": math.exp(min(main_loss, 700.0)),
        "lr": lr,
        "grad_norm": float(grad_norm),
        "tokens_per_sec": tokens_per_sec,
    }
    routing = {k: v for k, v in losses.stats.items() if "expert_load" in k or "entropy" in k}
    return record | _host_metrics(routing)


def _host_metrics(stats: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per-layer routing stats -> plain numbers (one device->host copy per tensor, only at log steps)."""
    out: dict[str, Any] = {}
    for key, value in stats.items():
        value = value.detach().float().cpu()
        out[key] = value.tolist() if value.dim() else float(value)
    return out


# --------------------------------------------------------------------------------------------------
# The end


def _finish(run: Run, history: list[dict[str, Any]], result: TrainResult) -> None:
    """Loss-curve PNG and Hugging Face export (rank 0); ``val_loss_start`` of a resumed run from its history.

    Neither extra may lose a finished run: without matplotlib there is no PNG, and an export that
    fails for want of a package is skipped, each said in one line.
    """
    say = run.dist.say
    if run.dist.is_main:
        try:
            png = plot_losses(history, run.out_dir / PLOT_FILE)
        except ImportError:
            png = None
            say("[train] matplotlib is not installed: no loss-curve PNG (metrics.jsonl has the losses)")
        if png is not None:
            say(f"[train] loss curve: {png}")
        if run.cfg.export_hf:
            try:
                result.hf_dir = export(run.raw_model, run.out_dir, run.cfg.data_dir)
                say(f"[train] exported Hugging Face model to {result.hf_dir}")
            except (ImportError, AttributeError) as e:  # the exporter is another module's; never lose the run
                say(f"[train] Hugging Face export skipped: {e}")
    if result.val_loss_start is None:
        result.val_loss_start = next((r["val/loss"] for r in history if r.get("step") == 0), None)


def export(raw_model: nn.Module, out_dir: str | Path, data_dir: str | Path | None = None) -> Path:
    """Export ``out_dir/hf`` with ``model.export_hf`` and the data's tokenizer (if the data has one)."""
    import model as model_pkg  # contract: model.export_hf(lm, out_dir, tokenizer=None) -> Path

    check_finite(raw_model.state_dict(), f"export to {Path(out_dir) / HF_DIR}")
    tokenizer = None
    if data_dir is not None and (Path(data_dir) / "tokenizer").is_dir():
        tokenizer = Path(data_dir) / "tokenizer"
    return Path(model_pkg.export_hf(raw_model, Path(out_dir) / HF_DIR, tokenizer=tokenizer))
