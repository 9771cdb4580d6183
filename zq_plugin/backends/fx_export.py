"""The FX simulation's exports, each loading without zq_plugin: a ``torch.export`` program and ONNX.

* ``.pt2``: :func:`zq_plugin.backends.fx.export_sim` (``torch.export.load(path).module()``).
* ONNX: :func:`export_onnx`: the same frozen simulation (every FakeQuantize as
  ``clamp(round(x / s), qmin - zp, qmax - zp) * s`` with its calibrated parameters) through
  ``torch.onnx.export``; in onnxruntime (:func:`zq_plugin.backends.brevitas.run_onnx`;
  ``optimize=False`` sets ``graph_optimization_level=ORT_DISABLE_ALL``, computing the ops as
  written) its outputs equal the simulation's to float rounding. It holds float weights and
  ``Round``/``Clip`` ops, the simulation as it computes, not integer kernels: for QDQ integer
  ONNX use the PT2E or Brevitas backend.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from zq_plugin import _compat
from zq_plugin.errors import MissingDependencyError, ModelError


def export_onnx(sim: nn.Module, example: torch.Tensor, path: str | os.PathLike[str]) -> Path:
    """Write the calibrated FX simulation as ONNX (dynamic batch), atomically; ``sim`` is not changed.

    Args:
        sim: a :func:`zq_plugin.quantize_fx` / :func:`zq_plugin.quantize` (FX) result.
        example: one input batch ``[N, C, H, W]`` on the model's device.
        path: the ``.onnx`` file to write (folders are created).

    Returns:
        ``path``.

    Raises:
        MissingDependencyError: onnx / onnxscript are not installed (``pip install 'zq-plugin[onnx]'``).
        ModelError: the exporter refused the model (its reason is named).

    Example:
        >>> import tempfile, torch, zq_plugin
        >>> from zq_plugin.backends.brevitas import run_onnx
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(144, 3)).eval()
        >>> sim = zq_plugin.quantize_fx(net, torch.randn(16, 1, 8, 8), w_bits=4, a_bits=4)
        >>> x = torch.randn(5, 1, 8, 8)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     got = run_onnx(export_onnx(sim, x[:2], f"{tmp}/sim.onnx"), x)
        >>> bool(torch.allclose(got, sim(x), atol=1e-5))
        True
    """
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as err:
        raise MissingDependencyError(
            f"ONNX export needs onnx and onnxscript ({err}): pip install 'zq-plugin[onnx]'."
        ) from err
    from zq_plugin.backends.fx import _FrozenFakeQuant
    from zq_plugin.data import atomic_write

    frozen = copy.deepcopy(sim).eval()
    for module in list(frozen.modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, _compat.FakeQuantize):
                setattr(module, name, _FrozenFakeQuant(child))
    example = example.repeat(2, *[1] * (example.dim() - 1)) if example.shape[0] == 1 else example
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's progress notes
            program = torch.onnx.export(
                frozen, (example,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False
            )
    except Exception as exc:  # the exporter raises many kinds; name its reason
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(f"torch.onnx.export could not export the simulation ({type(exc).__name__}: {first}).") from exc
    if program is None:
        raise ModelError("torch.onnx.export returned no ONNX program; export with torch's own torch.onnx.export.")
    proto = program.model_proto
    atomic_write(path, lambda f: f.write(proto.SerializeToString()))
    return Path(path)
