"""Where a training run's numbers go: ``metrics.jsonl``, W&B, the progress bar, the loss-curve PNG.

A record is one flat dict per logged step, ``{"step": s, "loss/main": ..., "layer0/expert_load":
[...], ...}``: plain floats and lists of floats, already on the host. ``metrics.jsonl`` holds every
record of the run, one JSON object a line; W&B and matplotlib are optional extras (a run without
them says so once and loses nothing, since the jsonl has every number).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import time
from pathlib import Path
from typing import Any

from model.distributed import DistInfo
from model.train_config import TrainConfig

METRICS_FILE = "metrics.jsonl"
REJECTED_FILE = "metrics.rejected.jsonl"  # malformed lines of metrics.jsonl, set aside on resume
PLOT_FILE = "loss_curve.png"


class MetricsSink:
    """The run's records, on rank 0 written to ``metrics.jsonl``, W&B and a tqdm bar; a context manager.

    Opening it (rank 0): ``out_dir`` is made, ``metrics.jsonl`` is rewritten with the records of the
    earlier segments up to the checkpoint this call resumed from (later ones were never checkpointed,
    and this call logs them again), ``config.json`` is written, and W&B starts (online with an API key,
    offline without; ``resume="allow"`` when a checkpoint was loaded). Closing it closes the bar and the
    file and finishes the W&B run, also when the run raises. Other ranks keep the records in memory only.

    Attributes:
        history: every record of the run (earlier segments, then this call's): the loss curve's data.
        added: the records this call emitted (``TrainResult.history``).
    """

    def __init__(
        self, cfg: TrainConfig, dist_info: DistInfo, resumed_step: int | None, checkpoint_loaded: bool
    ) -> None:
        """``resumed_step``: the step of the full checkpoint this call resumed from, None for a start at step 0."""
        self.dist_info = dist_info
        self.out_dir = Path(cfg.out_dir)
        path = self.out_dir / METRICS_FILE
        keep_earlier = dist_info.is_main and resumed_step is not None
        self.history: list[dict[str, Any]] = []
        if keep_earlier:
            self.history, rejected = read_metrics_checked(path, resumed_step)
            if rejected:
                aside = set_aside(self.out_dir / REJECTED_FILE, rejected)
                numbers = ", ".join(str(n) for n, _ in rejected)
                dist_info.say(
                    f"[train] {path}: {len(rejected)} malformed line(s) (line {numbers}) "
                    f"set aside in {aside}; the {len(self.history)} good record(s) are kept"
                )
        self.added: list[dict[str, Any]] = []
        self._wandb_run = None
        self._file = None
        self._bar = None
        if dist_info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if not keep_earlier and path.is_file() and path.stat().st_size:
                # Lines of a run that never checkpointed (killed before its first save): not this run's
                # history, but not to be lost either.
                aside = path.with_name(f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.earlier.jsonl")
                os.replace(path, aside)
                dist_info.say(f"[train] {path} held lines of an earlier start; moved to {aside}")
            _atomic_write(path, "".join(json.dumps(r) + "\n" for r in self.history))
            (self.out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            self._wandb_run = _start_wandb(cfg, dist_info, resume=checkpoint_loaded)
            self._file = open(path, "a")  # noqa: SIM115 (closed by close())

    def __enter__(self) -> MetricsSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_progress(self, start_step: int, max_steps: int, enabled: bool) -> None:
        """The tqdm bar over the steps (rank 0, when ``enabled``), starting at ``start_step``."""
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=max_steps,
            initial=start_step,
            desc="train",
            unit="step",
            disable=not (enabled and self.dist_info.is_main),
            dynamic_ncols=True,
        )

    def emit(self, record: dict[str, Any]) -> None:
        """Keep ``record`` and, on rank 0, append it to metrics.jsonl (flushed: a crash loses no line) and W&B."""
        self.history.append(record)
        self.added.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(_wandb_flat(record), step=record["step"])

    def show_loss(self, main_loss: float, tokens_per_sec: float) -> None:
        """The latest train loss and throughput beside the bar."""
        self._bar.set_postfix(loss=f"{main_loss:.3f}", tok_s=f"{tokens_per_sec:.0f}")

    def write(self, message: str) -> None:
        """A line above the bar (rank 0)."""
        if self.dist_info.is_main:
            self._bar.write(message)

    def step_done(self) -> None:
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
        self._bar = self._file = self._wandb_run = None


class TokenRate:
    """Tokens per second since the last log step (wall clock: the only logged number runs do not share)."""

    def __init__(self) -> None:
        self._since, self._tokens = time.time(), 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def take(self) -> float:
        """The rate since the last ``take`` (or since construction), then start counting afresh."""
        rate = self._tokens / max(time.time() - self._since, 1e-9)
        self._since, self._tokens = time.time(), 0
        return rate


def read_metrics(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    """Records of an earlier run segment with ``step <= up_to_step`` (later ones were never checkpointed)."""
    return read_metrics_checked(path, up_to_step)[0]


def read_metrics_checked(path: Path, up_to_step: int) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """``(records with step <= up_to_step, malformed lines as (line number, text))`` of ``metrics.jsonl``.

    A good line is a JSON object with an integer ``step`` >= 0 (as :class:`MetricsSink` writes them).
    Lines of later steps are neither: they were logged after the checkpoint and will be logged again.
    Blank lines are ignored; a line that is not UTF-8 is malformed (its text is kept with escapes).
    """
    if not path.is_file():
        return [], []
    records: list[dict[str, Any]] = []
    rejected: list[tuple[int, str]] = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        text = raw.decode("utf-8", errors="backslashreplace")
        if not text.strip():
            continue
        try:
            raw.decode("utf-8")
            record = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError):
            rejected.append((number, text))
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            rejected.append((number, text))
        elif step <= up_to_step:
            records.append(record)
    return records, rejected


def set_aside(path: Path, lines: list[tuple[int, str]]) -> Path:
    """Append malformed ``(line number, text)`` lines to ``path``, each as a JSON object; returns ``path``."""
    with open(path, "a", encoding="utf-8") as f:
        for number, text in lines:
            f.write(json.dumps({"metrics_line": number, "text": text, "set_aside": time.strftime("%FT%T")}) + "\n")
    return path


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path`` (never half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def _start_wandb(cfg: TrainConfig, dist_info: DistInfo, resume: bool) -> Any:
    """The W&B run (rank 0), or None when ``wandb_project`` is null or wandb is not installed (said once)."""
    if cfg.wandb_project is None:
        return None
    wandb = _optional("wandb")
    if wandb is None:
        dist_info.say("[train] wandb is not installed: W&B logging is off (metrics.jsonl has every number)")
        return None
    mode, note = _wandb_mode()
    if note:
        dist_info.say(f"[train] {note}")
    return wandb.init(
        project=cfg.wandb_project,
        name=cfg.wandb_run_name,
        config=cfg.to_dict(),
        dir=str(Path(cfg.out_dir)),
        mode=mode,
        resume="allow" if resume else None,
    )


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
    # Fixed margins that fit the labels at this size: tight_layout drew the whole figure once more to
    # measure them (0.29 s -> 0.23 s a plot, paid by every run).
    fig.subplots_adjust(left=0.06, right=0.985, bottom=0.12, top=0.92, wspace=0.26)
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
    fig.savefig(path, dpi=100)
    return path
