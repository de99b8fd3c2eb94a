"""Train LunarisCodex-MoC: ``python train_moe.py CONFIG.yaml [--set key=value ...]`` (see ``--help``).

A shim: argument parsing and everything else live in ``model.cli`` (also installed as ``train-moe``).
"""

import sys

from model.cli import main

if __name__ == "__main__":
    sys.exit(main())
