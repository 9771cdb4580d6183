"""Post-training recipe vs data-free fine-tuning (fixed synthetic set, AdaDFQ, GDFQ) on the zoo.

For each zoo model with BatchNorm and each W/A pair, on the 256 cached ZeroQ images of the
demo (200 steps, seed 0; ``zq_out/cache``), first and last layer at 8 bits (``--all-layers``:
every layer at the pair's bits):

* **PTQ best**: the best post-training recipe, Genie-M reconstruction (``reconstruct_fx``);
* **FT fixed**: ``finetune(model, images)`` from the MSE-calibrated student, ``--steps`` iterations
  (the student's learning rate ``--lr``, by default the library's 1e-4, in every column);
* **FT fixed, from PTQ**: the same from the reconstructed student (``init="reconstruct"``);
* **AdaDFQ / GDFQ**: ``finetune(model, images, generator=...)``: the same reconstructed student
  fine-tuned on the generator's stream, the generator trained ``--warmup`` iterations alone
  first, ``--game-steps`` in all.

Printed: top-1 on the 10,000 Fashion-MNIST test images (``--test-images`` for fewer) and the
seconds each took in this process (the reconstruction is cached and shared by the rows that
start from it: its time is in the PTQ column only).

Run: ``.venv/bin/python benchmarks/finetune.py --bits 3/3`` (about 40 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings

import torch

from zq_plugin import datasets, zoo
from zq_plugin.finetuning import finetune
from zq_plugin.reconstruct import reconstruct_fx
from zq_plugin.synth.adadfq import AdaDFQConfig, GDFQConfig


def _top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        pred = torch.cat([model(images[i : i + 500]).argmax(1) for i in range(0, len(images), 500)])
    return 100 * float((pred == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models = [n for n in zoo.available() if zoo.has_batchnorm(n)]
    parser.add_argument("--models", nargs="+", default=models, choices=models)
    parser.add_argument("--bits", nargs="+", default=["4/4", "3/3", "2/4"], help="W/A pairs (default: 4/4 3/3 2/4)")
    parser.add_argument("--all-layers", action="store_true", help="first and last layer at the pair's bits too")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning iterations on the fixed set")
    parser.add_argument("--game-steps", type=int, default=800, help="AdaDFQ/GDFQ iterations, warm-up included")
    parser.add_argument("--warmup", type=int, default=500, help="generator-only iterations of the game")
    parser.add_argument(
        "--lr", type=float, default=AdaDFQConfig.lr_student, help="the student's SGD learning rate (default: 1e-4)"
    )
    parser.add_argument("--methods", nargs="+", default=["fixed", "fixed-ptq", "adadfq", "gdfq"])
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learn-steps", action="store_true", help="LSQ steps in every fine-tuning column")
    args = parser.parse_args()
    from reconstruction import calibration_images  # the same cached sets as the reconstruction table

    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")
    x_test, y_test = datasets.load_fashion_mnist("test")
    x_test, y_test = x_test[: args.test_images], y_test[: args.test_images]
    first_last = None if args.all_layers else 8
    names = {"fixed": "FT fixed", "fixed-ptq": "FT fixed, from PTQ", "adadfq": "AdaDFQ", "gdfq": "GDFQ"}
    print(f"| model | W/A | layers | FP32 | PTQ best | {' | '.join(names[m] for m in args.methods)} |")
    print("|---|---|---|---|---|" + "---|" * len(args.methods))
    for name in args.models:
        model = zoo.load(name)
        images = calibration_images(model, "zeroq", 256)
        fp32 = _top1(model, x_test, y_test)
        for pair in args.bits:
            w, a = (int(b) for b in pair.split("/"))
            bits = {"w_bits": w, "a_bits": a, "first_last_bits": first_last}
            cells = []
            with tempfile.TemporaryDirectory() as cache:
                started = time.perf_counter()
                ptq = reconstruct_fx(model, images, seed=args.seed, cache_dir=cache, progress=False, **bits)
                cells.append(f"{_top1(ptq, x_test, y_test):.2f} ({time.perf_counter() - started:.0f} s)")
                for method in args.methods:
                    started = time.perf_counter()
                    common = {"seed": args.seed, "cache_dir": cache, "progress": False, "batch_size": 64, **bits}
                    if method.startswith("fixed"):
                        config = AdaDFQConfig(
                            steps=args.steps, warmup=0, lr_student=args.lr, learn_steps=args.learn_steps
                        )
                        init = "reconstruct" if method == "fixed-ptq" else "calibrate"
                        q = finetune(model, images, config=config, init=init, **common)
                    else:
                        kind = AdaDFQConfig if method == "adadfq" else GDFQConfig
                        config = kind(
                            steps=args.game_steps, warmup=args.warmup, lr_student=args.lr, learn_steps=args.learn_steps
                        )
                        q = finetune(model, images, generator=method, config=config, init="reconstruct", **common)
                    cells.append(f"{_top1(q, x_test, y_test):.2f} ({time.perf_counter() - started:.0f} s)")
            layers = ("all" if args.all_layers else "first/last 8") + (", LSQ" if args.learn_steps else "")
            print(f"| {name} | W{w}A{a} | {layers} | {fp32:.2f} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
