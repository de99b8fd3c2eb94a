"""``kotara`` / ``python kotara.py``: perplexity of 2+ causal LMs alone and fused per token, and
text generated from the fused model: the command line, a layer on top of the ``kotara`` library.

    kotara [score] --model A --model B --dataset_path text.txt --strategy entropy ...   # DESIGN §5
    kotara generate --model A --model B --prompt TEXT --strategy poe --poe_beta 1.5 --poe_beta -0.5 ...
    kotara eval --model A --model B --strategy all --tasks hellaswag,my_tasks/ --limit 200 ...   # DESIGN §5b

The original command line (no subcommand) keeps working unchanged and means ``score``::

    python kotara.py --model_a A --model_b B --dataset_path text.txt --strategy entropy \\
        --temp_a 0.85 --temp_b 1.1 --dtype bfloat16 --max_length 2048 --stride 1024 --save_metrics out.json

One module per subcommand (``score``, ``generate``, ``eval``), each parse -> resolve -> call the
library -> report, over ``options`` (the shared flags and what they resolve to). Nothing in the
library imports this package.

User errors print one line and exit with code 2 (``--debug`` shows the traceback); nothing is
written unless the run finished. Under ``torchrun`` scoring shards the windows across ranks (gloo
on CPU, nccl on CUDA) and all-reduces the sums; rank 0 prints and writes. Generation runs in one
process.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from kotara.cli import options
from kotara.loading import one_line

COMMANDS = ("score", "generate", "eval")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kotara`` and ``python kotara.py``; returns the exit code.

    ``kotara generate ...`` generates; ``kotara eval ...`` runs lm-eval tasks; ``kotara score ...`` or
    no subcommand (the original flat command line) scores.
    """
    from kotara.cli import eval as eval_command
    from kotara.cli import generate, score

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "score"
    if argv and argv[0] in COMMANDS:
        argv = argv[1:]
    module = {"generate": generate, "eval": eval_command}.get(command, score)
    args = module.build_parser().parse_args(argv)
    try:
        return module.run(args)
    except (ValueError, NotImplementedError) as err:
        if args.debug:
            raise
        return options.fail(one_line(err))
    except KeyboardInterrupt:  # Ctrl-C: one line and 130 (128 + SIGINT), as train_moe.py; nothing half-written
        if args.debug:
            raise
        print(f"{options.PROG}: interrupted (results are written only when a run finishes)", file=sys.stderr)
        return 130
