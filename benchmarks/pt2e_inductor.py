"""Real int8 CPU inference of a PT2E W8A8 result through torchao's X86 inductor lowering.

For each zoo model: ``quantize_pt2e`` at W8A8 (all layers 8-bit, MinMax observers, the demo's
256 ZeroQ images; Retro's for ``plain_cnn``), then ``torch.compile`` with inductor's freezing
on and torchao's X86 passes imported, which rewrite each dequantize -> conv/linear -> quantize
pattern into oneDNN int8 kernels (``onednn.qconv_pointwise``, ``qlinear_pointwise``; the
script counts them in the generated code). Reported: top-1 on the 10,000 Fashion-MNIST test
images of the FP32 model, of the converted model run eagerly (q/dq in float) and of the
compiled int8 model; and the median latency of one batch (``--batch``) over ``--repeats`` runs
of the FP32 model (eager and compiled, the same process) and of the compiled int8 model, with
the ratio FP32-compiled / int8-compiled. Latency is machine-dependent: only ratios from one
process are compared.

Run: ``.venv/bin/python benchmarks/pt2e_inductor.py`` (about 3 minutes on 2 cores, most of it
compiling).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch._inductor.config as inductor_config
from torch._inductor.utils import run_and_get_code

from zq_plugin import datasets, zoo
from zq_plugin.backends.pt2e import quantize_pt2e


def _calibration(model: torch.nn.Module, name: str) -> torch.Tensor:
    from reconstruction import calibration_images  # the same cached sets as the reconstruction table

    return calibration_images(model, "zeroq" if zoo.has_batchnorm(name) else "retro", 256)


def _top1(model, x_test: torch.Tensor, y_test: torch.Tensor, batch: int) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x_test) - batch + 1, batch):  # whole batches: one compiled shape
            correct += int((model(x_test[i : i + batch]).argmax(1) == y_test[i : i + batch]).sum())
    return 100 * correct / (len(x_test) // batch * batch)


def _median_ms(model, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=zoo.available(), choices=zoo.available())
    parser.add_argument("--batch", type=int, default=64, help="batch size of the latency runs (default: 64)")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per model (default: 30)")
    args = parser.parse_args()
    import torchao.quantization.pt2e.inductor_passes.x86  # noqa: F401  (registers the int8 lowering passes)

    inductor_config.freezing = True  # weights as constants: the int8 patterns need them
    x_test, y_test = datasets.load_fashion_mnist("test")
    x = x_test[: args.batch]
    print(
        "| model | FP32 top-1 | PT2E W8A8 eager | int8 compiled | int8 kernels | FP32 eager ms | FP32 compiled ms "
        "| int8 compiled ms | FP32 compiled / int8 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model = zoo.load(name)
        converted = quantize_pt2e(model, _calibration(model, name), w_bits=8, a_bits=8, first_last_bits=None)
        with torch.no_grad():
            compiled_fp32 = torch.compile(model)
            compiled_int8 = torch.compile(converted)
            _, code = run_and_get_code(compiled_int8, x)
        kernels = sum("".join(code).count(k) for k in ("qconv_pointwise", "qconv2d_pointwise", "qlinear_pointwise"))
        top1 = [_top1(m, x_test, y_test, args.batch) for m in (model, converted, compiled_int8)]
        ms = [_median_ms(m, x, args.repeats) for m in (model, compiled_fp32, compiled_int8)]
        cells = [*(f"{t:.2f}" for t in top1), str(kernels), *(f"{t:.2f}" for t in ms), f"{ms[1] / ms[2]:.2f}x"]
        print(f"| {name} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
