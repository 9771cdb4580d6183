"""Worker for tests/test_generation.py: synthesize under torchrun (gloo) and save rank 0's images."""

import os
import pathlib
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # tests/, for conftest's tiny model
from conftest import TinyBNNet, randomize_bn

import zq_plugin


def main() -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = randomize_bn(TinyBNNet()).eval()
    data = zq_plugin.synthesize(
        model, "zeroq", num_samples=10, input_shape=(1, 12, 12), batch_size=3, seed=7, steps=4, progress=False
    )
    if dist.get_rank() == 0:
        torch.save(data.images, sys.argv[1])
    # teardown that other processes on the machine cannot disturb: every rank is done with the
    # group before any destroys it, and the process then ends without running C++ static
    # destructors (a gloo thread still joinable there aborts with "terminate called without an
    # active exception", seen once in about 20 runs on a loaded 2-core machine)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
