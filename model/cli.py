"""``train-moe`` / ``python train_moe.py CONFIG.yaml``: parse arguments, call ``model.training.train``.

User errors (config, data, missing CUDA) print one line ``error: ...`` and exit with code 2, with
no traceback unless ``--debug``. A diverging run (non-finite loss) exits with code 1.
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
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    p.add_argument(
        "--export-only",
        action="store_true",
        help="do not train: export the latest checkpoint in out_dir to out_dir/hf and exit",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    return p


def _export_only(cfg) -> int:
    from pathlib import Path

    from model.checkpoint import latest_checkpoint, load_checkpoint
    from model.lm import LunarisLM
    from model.train_config import build_model_config
    from model.training import export

    ckpt_path = latest_checkpoint(cfg.out_dir)
    if ckpt_path is None:
        raise ConfigError(f"--export-only: no checkpoint in {Path(cfg.out_dir) / 'checkpoints'}")
    ckpt = load_checkpoint(ckpt_path)
    lm = LunarisLM(build_model_config(cfg.model, cfg.kernels))
    lm.load_state_dict(ckpt["model"])
    print(f"exported {ckpt_path} to {export(lm, cfg.out_dir, cfg.data_dir)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``train-moe``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    from model.data import DataError
    from model.training import NonFiniteLossError, train

    try:
        from model.train_config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.kernels is not None:
            cfg.kernels = args.kernels
        if args.export_only:
            return _export_only(cfg)
        train(cfg, resume=args.resume, progress=not args.no_progress)
    except (ConfigError, DataError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except NonFiniteLossError as e:
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
