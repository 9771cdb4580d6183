"""Train the zoo's checkpoints on Fashion-MNIST (seeded; CPU is enough).

Run from the repository root::

    python -m zq_plugin.zoo.train                 # all four models
    python -m zq_plugin.zoo.train resnet_s        # one model

Each run writes ``zq_plugin/zoo/checkpoints/<name>.pt`` (a float32 ``state_dict``) and
updates ``zq_plugin/zoo/checkpoints/metrics.json`` with the test accuracy. Recipe: the full
60k training set, random 2-px shifts and horizontal flips, cross-entropy; SGD with Nesterov
momentum and a one-cycle cosine schedule for the BN nets, AdamW with a cosine schedule for
the net without normalization. The seed fixes the initialization, the shuffling and the
augmentation; bit-for-bit equality across machines is not promised by PyTorch's CPU kernels.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from zq_plugin import datasets
from zq_plugin.evaluation import accuracy
from zq_plugin.zoo.models import MobileNetV2S, MobileNetV3S, PlainCNN, ResNetS

logger = logging.getLogger(__name__)
CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Training hyper-parameters of one zoo model."""

    epochs: int
    optimizer: str  # "sgd" (Nesterov, momentum 0.9) or "adamw"
    lr: float
    weight_decay: float
    batch_size: int = 128
    seed: int = 0


RECIPES: dict[str, tuple[type[nn.Module], Recipe]] = {
    "resnet_s": (ResNetS, Recipe(epochs=15, optimizer="sgd", lr=0.1, weight_decay=5e-4)),
    "mobilenetv2_s": (MobileNetV2S, Recipe(epochs=20, optimizer="sgd", lr=0.1, weight_decay=4e-5)),
    "mobilenetv3_s": (MobileNetV3S, Recipe(epochs=12, optimizer="sgd", lr=0.1, weight_decay=4e-5)),
    "plain_cnn": (PlainCNN, Recipe(epochs=12, optimizer="adamw", lr=2e-3, weight_decay=5e-4)),
}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 px (zero-padded in pixel space).

    ``x``: normalized images ``[B, 1, 28, 28]``; padding uses the normalized value of a black pixel.
    """
    b = x.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    black = (0.0 - datasets.MEAN) / datasets.STD
    padded = F.pad(x, (2, 2, 2, 2), value=black)  # [B, 1, 32, 32]
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
    return padded[:, :, dy : dy + 28, dx : dx + 28]


def train(name: str, out_dir: Path = CHECKPOINT_DIR) -> float:
    """Train zoo model ``name``, save its checkpoint and return its test accuracy (%)."""
    cls, r = RECIPES[name]
    torch.manual_seed(r.seed)
    gen = torch.Generator().manual_seed(r.seed)
    model = cls()
    x_train, y_train = datasets.load_fashion_mnist("train")
    x_test, y_test = datasets.load_fashion_mnist("test")
    steps_per_epoch = math.ceil(len(x_train) / r.batch_size)
    total = r.epochs * steps_per_epoch
    opt: torch.optim.Optimizer
    if r.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=r.lr, momentum=0.9, nesterov=True, weight_decay=r.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r.lr, total_steps=total, pct_start=0.15)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r.lr, total_steps=total, pct_start=0.1)
    start = time.perf_counter()
    for epoch in range(r.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(x_train), r.batch_size):
            idx = perm[i : i + r.batch_size]
            loss = F.cross_entropy(model(augment(x_train[idx], gen)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        acc = accuracy(model, x_test, y_test)
        logger.info("%s epoch %d/%d loss %.4f test %.2f%% (%.0f s)", name, epoch + 1, r.epochs, loss.item(), acc,
                    time.perf_counter() - start)  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out_dir / f"{name}.pt")
    metrics_path = out_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    metrics[name] = {
        "test_top1": round(acc, 2),
        "params": sum(p.numel() for p in model.parameters()),
        "epochs": r.epochs,
        "train_seconds": round(time.perf_counter() - start),
        "torch": torch.__version__,
    }
    metrics_path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return acc


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"models to train (default: all of {list(RECIPES)})")
    parser.add_argument("--out", type=Path, default=CHECKPOINT_DIR)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(RECIPES))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {sorted(RECIPES)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in args.names or list(RECIPES):
        train(name, args.out)


if __name__ == "__main__":
    main()
