"""The training loop of LunarisCodex-MoC: read top to bottom, like nanoGPT's ``train.py``.

``train(cfg)`` does, in order: process group (torchrun) -> device and precision -> data (prepared on
first use for the embedded corpus) -> model (DDP or FSDP2, optional torch.compile) -> AdamW with
weight decay on matrices only -> warmup + cosine schedule -> resume -> the loop (gradient
accumulation, clipping, periodic validation, logging, checkpoints) -> loss-curve PNG -> Hugging Face
export. Only rank 0 prints, logs and writes files.

Reproducibility: the model is initialised from ``seed``; batches are a pure function of
``(seed, step, micro_step, rank)`` (``model.data.TokenData``); checkpoints hold every RNG state.
So a run resumed from step s produces bit-for-bit the losses of an uninterrupted run (fp32, CPU).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from model.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from model.data import TokenData, ensure_prepared
from model.train_config import ConfigError, TrainConfig, build_model_config

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"


class NonFiniteLossError(RuntimeError):
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
# Setup helpers


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


@contextlib.contextmanager
def process_group(device_type: str) -> Iterator[DistInfo]:
    """The process group torchrun describes (RANK, WORLD_SIZE, ...) for the block: nccl on CUDA, gloo on CPU.

    A group this joins, it also leaves, on every rank: after a barrier when the block ends normally
    (no rank tears down while another still needs it), at once when it raises. A process that exits
    with its gloo group alive can abort (SIGABRT, "terminate called without an active exception")
    when the interpreter finalises while gloo's threads still hold work: measured with a 2-rank
    gloo script on the loaded 2-core VM, 18 aborts in 60 runs without the destroy, 0 in 60 with it.
    A group someone else made is theirs to destroy.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield DistInfo()
        return
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
    if dist.is_initialized():
        yield info
        return
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    try:
        yield info
        dist.barrier()
    finally:
        dist.destroy_process_group()


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


def wrap_distributed(model: nn.Module, cfg: TrainConfig, dist_info: DistInfo, device: torch.device) -> nn.Module:
    """DDP (default) or FSDP2 (``distributed: fsdp``: each transformer block, then the root, sharded)."""
    if not dist_info.enabled:
        return model
    if cfg.distributed == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as e:
            raise ConfigError("distributed: fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard)") from e
        for block in getattr(model, "layers", []):
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _optional(package: str) -> Any:
    """The module ``package``, or None when it is not installed (W&B is optional everywhere)."""
    try:
        return importlib.import_module(package)
    except ImportError:
        return None


def _wandb_mode() -> tuple[str, str | None]:
    """(mode, note): online with an API key, otherwise offline, unless WANDB_MODE says otherwise."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], None
    if os.environ.get("WANDB_API_KEY"):
        return "online", None
    with contextlib.suppress(Exception):
        import netrc

        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online", None
    return (
        "offline",
        "no W&B API key (WANDB_API_KEY unset, not logged in): W&B runs offline; sync later with `wandb sync`",
    )


def _host_metrics(stats: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per-layer routing stats -> plain numbers (one device->host copy per tensor, only at log steps)."""
    out: dict[str, Any] = {}
    for key, value in stats.items():
        value = value.detach().float().cpu()
        out[key] = value.tolist() if value.dim() else float(value)
    return out


def _wandb_flat(record: dict[str, Any]) -> dict[str, Any]:
    """Vectors (expert load) become one scalar per expert so W&B plots them as lines."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, list):
            for i, v in enumerate(value):
                flat[f"{key}/{i}"] = v
        elif key != "step":
            flat[key] = value
    return flat


def plot_losses(records: list[dict[str, Any]], path: Path) -> Path | None:
    """PNG of train main loss, aux loss and validation loss against step.

    None when there is nothing to plot; raises ImportError without matplotlib. Drawn on a bare
    ``Figure`` (no pyplot): the process's backend (a notebook's inline one) is left as it was.
    """
    train = [(r["step"], r["loss/main"]) for r in records if "loss/main" in r]
    val = [(r["step"], r["val/loss"]) for r in records if "val/loss" in r]
    aux = [(r["step"], r["loss/aux"]) for r in records if "loss/aux" in r]
    if not train and not val:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax, ax_aux = fig.subplots(1, 2)
    if train:
        ax.plot(*zip(*train), label="train loss/main")
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    unigram = next((r["val/unigram_loss"] for r in records if "val/unigram_loss" in r), None)
    if unigram is not None:
        ax.axhline(unigram, color="gray", linestyle="--", label=f"unigram baseline ({unigram:.2f})")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="main loss")
    ax.legend()
    if aux:
        ax_aux.plot(*zip(*aux), color="tab:green")
    ax_aux.set(xlabel="step", ylabel="aux loss", title="auxiliary loss (balance + diversity)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _read_metrics(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    """Records of an earlier run segment with ``step <= up_to_step`` (later ones were never checkpointed)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if record.get("step", math.inf) <= up_to_step:
                records.append(record)
    return records


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


# --------------------------------------------------------------------------------------------------
# The run


def train(
    cfg: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train (or resume) the run described by ``cfg``; see the module docstring.

    Args:
        resume: continue from the latest checkpoint in ``cfg.out_dir`` (a fresh start when there is none).
        progress: show a tqdm bar (rank 0).
        on_step: called with the number of completed steps after each step's logging/saving (tests
            use it to interrupt a run).
    Raises:
        ConfigError / DataError for user errors, NonFiniteLossError when the loss diverges.
    """
    t_start = time.time()
    device_type = "cuda" if (cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())) else "cpu"
    with process_group(device_type) as dist_info:
        result = _run(cfg, dist_info, resume, progress, on_step)
    result.wall_seconds = time.time() - t_start
    say = print if dist_info.is_main else (lambda *a, **k: None)
    say(
        f"[train] done: {result.steps} steps in {result.wall_seconds:.1f}s; val loss "
        f"{result.val_loss_start if result.val_loss_start is None else f'{result.val_loss_start:.4f}'} -> "
        f"{result.val_loss_end if result.val_loss_end is None else f'{result.val_loss_end:.4f}'}"
        + (f" (unigram baseline {result.unigram_loss:.4f})" if result.unigram_loss is not None else "")
    )
    return result


def _run(
    cfg: TrainConfig, dist_info: DistInfo, resume: bool, progress: bool, on_step: Callable[[int], None] | None
) -> TrainResult:
    """``train`` inside its process group: every phase from the device to the Hugging Face export."""
    device = resolve_device(cfg, dist_info)
    if device.type == "cpu" and cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)
    amp_dtype = resolve_dtype(cfg, device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype != torch.float32 else contextlib.nullcontext()
    model_cfg = build_model_config(cfg.model, cfg.kernels)
    out_dir = Path(cfg.out_dir)
    say = print if dist_info.is_main else (lambda *a, **k: None)

    # ---- data: rank 0 prepares the embedded corpus on first use, the others wait for it
    if dist_info.is_main:
        ensure_prepared(cfg.data_dir, cfg.corpus, model_cfg.vocab_size, cfg.val_fraction)
    if dist_info.enabled:
        dist.barrier()
    data = TokenData(cfg.data_dir, model_cfg.max_seq_len, model_cfg.vocab_size)

    # ---- model: every rank builds the same initial weights from the seed
    from model.lm import LunarisLM

    seed_everything(cfg.seed)
    raw_model = LunarisLM(model_cfg).to(device)
    model = wrap_distributed(raw_model, cfg, dist_info, device)
    if cfg.compile:
        model = torch.compile(model)
    optimizer = make_optimizer(raw_model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg) / cfg.learning_rate)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    fsdp = dist_info.enabled and cfg.distributed == "fsdp"

    def model_and_optim_state() -> tuple[dict, dict]:
        if fsdp:  # gather full, CPU-resident state dicts so a checkpoint loads on any world size
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            return get_state_dict(
                raw_model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        return raw_model.state_dict(), optimizer.state_dict()

    # ---- resume
    start_step = 0
    history: list[dict[str, Any]] = []
    metrics_path = out_dir / METRICS_FILE
    ckpt_path = latest_checkpoint(out_dir) if resume else None
    if resume and ckpt_path is None:
        say(f"[train] --resume: no checkpoint in {out_dir / 'checkpoints'}, starting from step 0")
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path, map_location="cpu")
        # The kernels backend may change between segments (same math); any other model key may not.
        # Model keys added after the checkpoint was written take their defaults (its behaviour then).
        from model.config import ModelConfig

        saved_keys = ckpt["config"].get("model_config", {})
        saved_model = {k: v for k, v in (ModelConfig().to_dict() | saved_keys).items() if k != "kernels"}
        saved_model = saved_model if saved_keys else {}
        this_model = {k: v for k, v in model_cfg.to_dict().items() if k != "kernels"}
        if saved_model and saved_model != this_model:
            changed = sorted(k for k in this_model if saved_model.get(k) != this_model[k])
            raise ConfigError(
                f"cannot resume from {ckpt_path}: model keys differ from the checkpoint's: {', '.join(changed)}"
            )
    if ckpt_path is not None and "optimizer" not in ckpt:
        # Weights only (python -m model.convert_original writes these): the run starts at step 0 from
        # these weights with a fresh AdamW, the config's warmup and schedule, and the seed's RNG.
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(raw_model, ckpt["model"], options=StateDictOptions(full_state_dict=True))
        else:
            raw_model.load_state_dict(ckpt["model"])
        seed_everything(cfg.seed + dist_info.rank)
        say(f"[train] starting at step 0 from the weights of {ckpt_path} (no optimizer state: fresh AdamW, schedule)")
    elif ckpt_path is not None:
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(
                raw_model,
                optimizer,
                model_state_dict=ckpt["model"],
                optim_state_dict=ckpt["optimizer"],
                options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False),
            )
        else:
            raw_model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt["extra"]:
            scaler.load_state_dict(ckpt["extra"]["scaler"])
        saved_format = ckpt["extra"].get("state_format", "plain")
        if saved_format != ("fsdp" if fsdp else "plain"):
            raise ConfigError(
                f"cannot resume from {ckpt_path}: it was written by a {saved_format} run and this run is "
                f"{'fsdp' if fsdp else 'plain/ddp'} (optimizer states are keyed differently); resume in the same mode"
            )
        start_step = int(ckpt["step"])
        rng = ckpt["extra"].get("rng_per_rank", {}).get(dist_info.rank, ckpt["rng"])
        set_rng_state(rng)
        history = _read_metrics(metrics_path, start_step) if dist_info.is_main else []
        say(f"[train] resumed from {ckpt_path} at step {start_step}")
    else:
        # Dropout (if any) must differ between ranks; initial weights were already drawn identically.
        seed_everything(cfg.seed + dist_info.rank)

    # ---- logging (rank 0): metrics.jsonl (rewritten on resume up to the checkpoint), W&B, tqdm
    wandb_run = None
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        wandb = _optional("wandb") if cfg.wandb_project is not None else None
        if cfg.wandb_project is not None and wandb is None:
            say("[train] wandb is not installed: W&B logging is off (metrics.jsonl has every number)")
        if wandb is not None:
            mode, note = _wandb_mode()
            if note:
                say(f"[train] {note}")
            wandb_run = wandb.init(
                project=cfg.wandb_project,
                name=cfg.wandb_run_name,
                config=cfg.to_dict(),
                dir=str(out_dir),
                mode=mode,
                resume="allow" if ckpt_path is not None else None,
            )
    tokens_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * model_cfg.max_seq_len * dist_info.world_size
    unigram = data.unigram_loss() if dist_info.is_main else None
    say(
        f"[train] {raw_model.num_parameters():,} parameters ({model_cfg.ffn_label}), "
        f"device {device}, {str(amp_dtype).replace('torch.', '')}, world {dist_info.world_size}, "
        f"{tokens_per_step:,} tokens/step, {cfg.max_steps} steps; data {data.tokens('train'):,} train / "
        f"{data.tokens('val'):,} val tokens"
    )
    if unigram is not None:
        say(f"[train] unigram baseline val loss {unigram:.4f} (ppl {math.exp(unigram):.1f})")

    result = TrainResult(out_dir=out_dir, steps=start_step, unigram_loss=unigram)
    metrics_file = open(metrics_path, "a") if dist_info.is_main else None  # noqa: SIM115 (closed below)

    def emit(record: dict[str, Any]) -> None:
        history.append(record)
        result.history.append(record)
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        if wandb_run is not None:
            wandb_run.log(_wandb_flat(record), step=record["step"])

    def save(step: int) -> Path | None:
        model_state, optim_state = model_and_optim_state()
        extra: dict[str, Any] = {"scaler": scaler.state_dict(), "state_format": "fsdp" if fsdp else "plain"}
        if dist_info.enabled:  # each rank's RNG (dropout) so that resume is exact on every rank
            from model.checkpoint import rng_state

            gathered = [None] * dist_info.world_size
            dist.all_gather_object(gathered, rng_state())
            extra["rng_per_rank"] = dict(enumerate(gathered))
        if not dist_info.is_main:
            return None
        config = cfg.to_dict() | {"model_config": model_cfg.to_dict()}
        return save_checkpoint(
            out_dir, step, model_state, optim_state, scheduler.state_dict(), config, extra, keep=cfg.keep_checkpoints
        )

    if start_step == 0:
        val_loss, val_ppl = evaluate(model, data, cfg, device, autocast, dist_info)
        result.val_loss_start = val_loss
        say(f"[train] step 0: val loss {val_loss:.4f} (ppl {val_ppl:.1f})")
        emit({"step": 0, "val/loss": val_loss, "val/perplexity": val_ppl, "val/unigram_loss": unigram})

    # ---- the loop
    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.max_steps,
        initial=start_step,
        desc="train",
        unit="step",
        disable=not (progress and dist_info.is_main),
        dynamic_ncols=True,
    )
    model.train()
    t_log, tokens_since_log = time.time(), 0
    step = start_step
    try:
        for step in range(start_step, cfg.max_steps):
            main_sum = torch.zeros((), device=device)
            aux_sum = torch.zeros((), device=device)
            last_stats: dict[str, torch.Tensor] = {}
            for micro in range(cfg.gradient_accumulation_steps):
                inputs, targets = data.train_batch(
                    cfg.seed, step, micro, cfg.batch_size, dist_info.rank, dist_info.world_size
                )
                inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                last_micro = micro == cfg.gradient_accumulation_steps - 1
                # DDP all-reduces gradients only on the last micro-batch of the step.
                sync = (
                    model.no_sync() if (dist_info.enabled and not fsdp and not last_micro) else contextlib.nullcontext()
                )
                with sync:
                    with autocast:
                        out = model(inputs, targets)
                    loss = (out.loss + out.aux_loss) / cfg.gradient_accumulation_steps
                    scaler.scale(loss).backward()
                main_sum += out.loss.detach()
                aux_sum += out.aux_loss.detach()
                last_stats = out.stats
            scaler.unscale_(optimizer)
            # max_norm=inf measures the norm without changing the gradients (the clip factor is clamped to 1).
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            grad_norm = nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, already the global norm
                grad_norm = grad_norm.full_tensor()
            # One host sync per optimizer step: a NaN must stop the run before it reaches the weights.
            check = torch.stack([main_sum + aux_sum, grad_norm.detach().to(device=device, dtype=main_sum.dtype)])
            if dist_info.enabled:
                dist.all_reduce(check)  # every rank must stop together
            if not torch.isfinite(check).all().item():
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at step {step + 1} (loss {float(check[0]):.4g}, "
                    f"grad norm {float(check[1]):.4g}); stopped, the last good checkpoint is kept"
                )
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            done = step + 1
            tokens_since_log += tokens_per_step
            result.steps = done
            last = done == cfg.max_steps

            record: dict[str, Any] = {}
            if done % cfg.log_interval == 0 or last:
                losses = torch.stack([main_sum, aux_sum]) / cfg.gradient_accumulation_steps
                if dist_info.enabled:
                    dist.all_reduce(losses)
                    losses /= dist_info.world_size
                main_loss, aux_loss = losses.tolist()
                elapsed = time.time() - t_log
                record.update(
                    {
                        "loss/main": main_loss,
                        "loss/aux": aux_loss,
                        "perplexity": math.exp(min(main_loss, 700.0)),
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "tokens_per_sec": tokens_since_log / max(elapsed, 1e-9),
                    }
                )
                record.update(
                    _host_metrics({k: v for k, v in last_stats.items() if "expert_load" in k or "entropy" in k})
                )
                t_log, tokens_since_log = time.time(), 0
                bar.set_postfix(loss=f"{main_loss:.3f}", tok_s=f"{record['tokens_per_sec']:.0f}")
            if done % cfg.eval_interval == 0 or last:
                val_loss, val_ppl = evaluate(model, data, cfg, device, autocast, dist_info)
                record.update({"val/loss": val_loss, "val/perplexity": val_ppl})
                result.val_loss_end = val_loss
                if dist_info.is_main:
                    bar.write(f"[train] step {done}: val loss {val_loss:.4f} (ppl {val_ppl:.1f})")
            if record:
                emit({"step": done} | record)
            if done % cfg.save_interval == 0 or last:
                result.checkpoint = save(done) or result.checkpoint
            bar.update(1)
            if on_step is not None:
                on_step(done)
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
        if wandb_run is not None:
            wandb_run.finish()

    # ---- end: loss curve, Hugging Face export (rank 0)
    if dist_info.is_main:
        try:
            png = plot_losses(history, out_dir / PLOT_FILE)
        except ImportError:
            png = None
            say("[train] matplotlib is not installed: no loss-curve PNG (metrics.jsonl has the losses)")
        if png is not None:
            say(f"[train] loss curve: {png}")
        if cfg.export_hf:
            try:
                result.hf_dir = export(raw_model, out_dir, cfg.data_dir)
                say(f"[train] exported Hugging Face model to {result.hf_dir}")
            except (ImportError, AttributeError) as e:  # the exporter is another module's; never lose the run
                say(f"[train] Hugging Face export skipped: {e}")
    if result.val_loss_start is None:
        result.val_loss_start = next((r["val/loss"] for r in history if r.get("step") == 0), None)
    return result


def export(raw_model: nn.Module, out_dir: str | Path, data_dir: str | Path | None = None) -> Path:
    """Export ``out_dir/hf`` with ``model.export_hf`` and the data's tokenizer (if the data has one)."""
    import model as model_pkg  # contract: model.export_hf(lm, out_dir, tokenizer=None) -> Path

    tokenizer = None
    if data_dir is not None and (Path(data_dir) / "tokenizer").is_dir():
        tokenizer = Path(data_dir) / "tokenizer"
    return Path(model_pkg.export_hf(raw_model, Path(out_dir) / "hf", tokenizer=tokenizer))
