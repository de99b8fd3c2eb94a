"""``train-moe`` / ``python train_moe.py CONFIG.yaml``: parse arguments, call ``model.training.train``.

User errors (config, data, paths, checkpoints, missing CUDA) print one line ``error: ...`` and exit
with code 2, with no traceback unless ``--debug``; all of them are found before the first step. A
diverging run (non-finite loss, or non-finite weights about to be saved) and an error of the machine
(disk full) exit with code 1, the last good checkpoint kept.
"""

from __future__ import annotations

import argparse
import sys

from model.train_config import KERNELS, ConfigError

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_moe.py",
        description="Train LunarisCodex-MoC from a YAML config (single process, or under torchrun for DDP/FSDP2).",
        epilog="Examples: python train_moe.py configs/tiny.yaml   |   "
        "python train_moe.py config_moc.yaml --set max_steps=1000 --set model.n_experts=4   |   "
        "torchrun --nproc_per_node 8 train_moe.py config_moc.yaml",
    )
    p.add_argument("config", help="YAML config: run keys at the top level, model keys under 'model:'")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable; dotted for nested keys, e.g. model.n_experts=4; "
        "values are parsed as YAML scalars: 3e-4, true, null)",
    )
    p.add_argument("--kernels", choices=KERNELS, help="moc_kernels backend for the model (overrides the config)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest intact checkpoint in out_dir (damaged newer ones are skipped, and named)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an out_dir that holds another run: delete its checkpoints, metrics.jsonl and hf/ "
        "first (without it such an out_dir is refused)",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: continue although seed, batch_size, learning_rate or another key that shapes the "
        "run differs from the checkpoint's (a warning names them; without it, refused)",
    )
    p.add_argument(
        "--export-only",
        action="store_true",
        help="do not train: export the newest intact checkpoint in out_dir to out_dir/hf and exit",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    return p


def _export_only(cfg) -> int:
    """Export the newest intact checkpoint (damaged newer ones are skipped and named); exit code."""
    from pathlib import Path

    from model.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, state_mismatch
    from model.lm import LunarisLM
    from model.outputs import ensure_writable_dir
    from model.train_config import build_model_config
    from model.training import HF_DIR, export

    found = list_checkpoints(cfg.out_dir)
    if not found:
        raise ConfigError(f"--export-only: no checkpoint in {Path(cfg.out_dir) / 'checkpoints'}")
    hf = Path(cfg.out_dir) / HF_DIR
    if hf.exists() and not hf.is_dir():
        raise ConfigError(f"out_dir/hf {str(hf)!r} is a file, not a directory")
    ensure_writable_dir(hf, "out_dir/hf", ConfigError)
    lm = LunarisLM(build_model_config(cfg.model, cfg.kernels))
    skipped: list[str] = []
    for ckpt_path in reversed(found):
        try:
            ckpt = load_checkpoint(ckpt_path)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        mismatch = state_mismatch(ckpt["model"], lm.state_dict())
        if mismatch:
            skipped.append(f"checkpoint {str(ckpt_path)!r} does not fit the config's model: {mismatch}")
            continue
        lm.load_state_dict(ckpt["model"])
        for reason in skipped:
            print(f"--export-only: skipped a damaged checkpoint: {reason}", file=sys.stderr)
        print(f"exported {ckpt_path} to {export(lm, cfg.out_dir, cfg.data_dir)}")
        return 0
    raise ConfigError("--export-only: no intact checkpoint: " + "; ".join(skipped))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``train-moe``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    from model.checkpoint import NonFiniteError
    from model.data import DataError
    from model.training import train

    try:
        from model.train_config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.kernels is not None:
            cfg.kernels = args.kernels
        if args.export_only:
            return _export_only(cfg)
        if args.allow_config_change and not args.resume:
            raise ConfigError("--allow-config-change only applies with --resume")
        if args.overwrite and (args.resume or args.export_only):
            raise ConfigError("--overwrite starts a fresh run: it cannot be combined with --resume or --export-only")
        train(
            cfg,
            resume=args.resume,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            allow_config_change=args.allow_config_change,
        )
    except (ConfigError, DataError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except NonFiniteError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the machine's (disk full, a file vanished): one line; checkpoints are written atomically
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; resume with --resume (from the last checkpoint)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
