"""Why fine-tuning a reconstructed student can lose: rounding flips during the run, layer by layer.

Fine-tunes the reconstructed student (``init="reconstruct"``) of a zoo model on the demo's
256 ZeroQ images with the library's loop (300 iterations, lr 1e-4, seed 0), and at fixed
iterations prints top-1 on the Fashion-MNIST test images, the KL divergence to the float model
on the 256 images, and how many weight integers ``round(w / s)`` changed in each layer since
the previous line. ``--freeze LAYER`` keeps that layer's weights fixed (repeatable).

Run: ``.venv/bin/python benchmarks/finetune_oscillation.py --all-layers`` (about 4 minutes on
2 cores).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings

import torch
from torch import nn

from zq_plugin import datasets, zoo
from zq_plugin.finetuning import _Run, fx_student
from zq_plugin.synth.adadfq import AdaDFQConfig

CHECKS = (25, 50, 100, 150, 200, 225, 250, 275, 300)


def _integers(student: nn.Module) -> dict[str, torch.Tensor]:
    """Each quantized layer's weight integers ``clamp(round(w / s))``."""
    out = {}
    for name, layer in student.named_modules():
        fq = getattr(layer, "weight_fake_quant", None)
        if isinstance(layer, nn.Conv2d | nn.Linear) and fq is not None:
            shape = [-1] + [1] * (layer.weight.dim() - 1)
            ratio = layer.weight.detach() / fq.scale.reshape(shape)
            out[name] = torch.round(ratio).clamp(int(fq.quant_min), int(fq.quant_max))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models = [n for n in zoo.available() if zoo.has_batchnorm(n)]
    parser.add_argument("--model", default="mobilenetv2_s", choices=models)
    parser.add_argument("--bits", default="4/4", help="W/A (default: 4/4)")
    parser.add_argument("--all-layers", action="store_true", help="first and last layer at the pair's bits too")
    parser.add_argument("--freeze", action="append", default=[], metavar="LAYER", help="a layer whose weights stay")
    parser.add_argument("--test-images", type=int, default=10000)
    args = parser.parse_args()
    from reconstruction import calibration_images  # the same cached sets as the reconstruction table

    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")
    w, a = (int(b) for b in args.bits.split("/"))
    model = zoo.load(args.model)
    x_test, y_test = datasets.load_fashion_mnist("test")
    x_test, y_test = x_test[: args.test_images], y_test[: args.test_images]
    images = calibration_images(model, "zeroq", 256)

    def report(student: nn.Module) -> str:
        with torch.no_grad():
            pred = torch.cat([student(x_test[i : i + 500]).argmax(1) for i in range(0, len(x_test), 500)])
            p, q = torch.log_softmax(model(images), 1), torch.log_softmax(student(images), 1)
            kl = torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean")
        return f"{100 * float((pred == y_test).float().mean()):.2f} | {float(kl):.3f}"

    with tempfile.TemporaryDirectory() as cache:
        student = fx_student(
            model, images, w_bits=w, a_bits=a, first_last_bits=None if args.all_layers else 8, init="reconstruct",
            seed=0, cache_dir=cache,
        )  # fmt: skip
    for name in args.freeze:
        student.get_submodule(name).weight.requires_grad_(False)
    run = _Run(
        model, student, None, AdaDFQConfig(steps=CHECKS[-1], warmup=0), images=images, labels=None, batch_size=64,
        input_range=None, num_classes=10, seed=0,
    )  # fmt: skip
    print("| iteration | top-1 | KL on the set | integers changed since the previous line |")
    print("|---|---|---|---|")
    print(f"| 0 (reconstructed) | {report(student)} | |")
    before = _integers(student)
    for step in range(1, CHECKS[-1] + 1):
        run.advance()
        if step in CHECKS:
            now = _integers(student)
            flips = ", ".join(f"{n} {int((now[n] != before[n]).sum())}" for n in now if (now[n] != before[n]).any())
            before = now
            print(f"| {step} | {report(student)} | {flips} |", flush=True)


if __name__ == "__main__":
    main()
