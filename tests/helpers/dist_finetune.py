"""Worker for tests/test_adadfq.py: fine-tune on a fixed set under torchrun (gloo); rank 0 saves the student."""

import os
import pathlib
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # tests/, for conftest's tiny model
from conftest import TinyBNNet, randomize_bn

from zq_plugin.finetuning import finetune
from zq_plugin.synth.adadfq import AdaDFQConfig


def main() -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = randomize_bn(TinyBNNet()).eval()
    images = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    config = AdaDFQConfig(steps=6, warmup=0, lr_student=0.05)
    student = finetune(model, images, config=config, batch_size=16, progress=False, cache_dir=sys.argv[2])
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, {k: v.clone() for k, v in student.state_dict().items()})
    if dist.get_rank() == 0:
        same = all(torch.equal(states[0][k], other[k]) for other in states for k in states[0])
        torch.save({"state": student.state_dict(), "ranks_agree": same}, sys.argv[1])
    dist.barrier()  # every rank is done with the group before any destroys it (tests/helpers/dist_synth.py)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no C++ static destructors racing a gloo thread (tests/helpers/dist_synth.py)


if __name__ == "__main__":
    main()
