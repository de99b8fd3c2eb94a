"""Train several configs in one gloo process group, each through ``train_moe.py``'s entry point:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/gloo_train.py A.yaml B.yaml ...

tests/test_model_moe.py runs every FFN variant's two-rank case in one launch this way: a launch costs
~7 s of process starts and imports on the 2-core VM, more than a tiny run's training. ``model.cli.main``
trains in the group this script made (a group it did not make is not its to leave); the plain
``torchrun train_moe.py`` path, where the trainer makes and leaves the group, is tests/test_model_training.py's.
Exits with the largest exit code of the runs.
"""

import sys

import torch.distributed as dist

from model.cli import main

if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        codes = [main([path, "--no-progress"]) for path in sys.argv[1:]]
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.exit(max(codes, default=2))
