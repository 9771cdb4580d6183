"""The only module that imports ``torch.ao.quantization`` (and, later, torchao) internals.

torch.ao.quantization is deprecated in favour of torchao's PT2E (integration-notes §1.5):
keeping every import here leaves one place to change when it moves or disappears. The FX
entry points are wrapped so that the deprecation warnings, which concern the user's choice of
flow and not our internal calls, do not flood the output of our helpers.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.ao.quantization import (
    FakeQuantize,
    FakeQuantizeBase,
    HistogramObserver,
    MinMaxObserver,
    ObserverBase,
    PerChannelMinMaxObserver,
    QConfig,
    QConfigMapping,
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
    enable_observer,
    get_observer_state_dict,
    load_observer_state_dict,
)
from torch.ao.quantization import quantize_fx as _quantize_fx
from torch.ao.quantization.observer import UniformQuantizationObserverBase

from zq_plugin.errors import MissingDependencyError

__all__ = [
    "FakeQuantize",
    "FakeQuantizeBase",
    "HistogramObserver",
    "MinMaxObserver",
    "ObserverBase",
    "PerChannelMinMaxObserver",
    "QConfig",
    "QConfigMapping",
    "UniformQuantizationObserverBase",
    "convert_fx",
    "convert_to_reference_fx",
    "disable_fake_quant",
    "disable_observer",
    "enable_fake_quant",
    "enable_observer",
    "get_observer_state_dict",
    "is_exported_module",
    "load_observer_state_dict",
    "node_qconfigs",
    "prepare_fx",
    "prepare_qat_fx",
    "torchao_pt2e",
]

_QUIET = (
    (DeprecationWarning, r".*torch\.ao\.quantization.*"),
    (UserWarning, r".*quantized tensor creation functions.*"),
    (UserWarning, r".*_check_is_valid_config_dict.*"),
    # sigmoid/hardsigmoid/tanh have fixed ranges: torch.ao keeps its own fixed-qparams quantizer at the
    # qconfig's bits for them and warns about a QConfig the user never wrote (found from outside, issue 15)
    (UserWarning, r".*QConfig must specify a FixedQParamsObserver.*"),
)


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        for category, pattern in _QUIET:
            warnings.filterwarnings("ignore", message=pattern, category=category)
        return fn(*args, **kwargs)


def prepare_fx(
    model: torch.nn.Module, mapping: QConfigMapping, example_inputs: tuple[Any, ...]
) -> torch.fx.GraphModule:
    """``torch.ao.quantization.quantize_fx.prepare_fx`` without its deprecation warning."""
    return _quiet(_quantize_fx.prepare_fx, model, mapping, example_inputs)


def prepare_qat_fx(
    model: torch.nn.Module, mapping: QConfigMapping, example_inputs: tuple[Any, ...]
) -> torch.fx.GraphModule:
    """``torch.ao.quantization.quantize_fx.prepare_qat_fx`` without its deprecation warning."""
    return _quiet(_quantize_fx.prepare_qat_fx, model, mapping, example_inputs)


def convert_fx(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``torch.ao.quantization.quantize_fx.convert_fx`` (real int8 kernels) without its warnings."""
    return _quiet(_quantize_fx.convert_fx, model)


def convert_to_reference_fx(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``torch.ao.quantization.quantize_fx.convert_to_reference_fx`` (float ops between quantize/dequantize)."""
    return _quiet(_quantize_fx.convert_to_reference_fx, model)


def node_qconfigs(prepared: torch.fx.GraphModule) -> dict[str, Any]:
    """``node name -> QConfig`` (None: not quantized) that ``prepare_fx``/``prepare_qat_fx`` resolved.

    Read from the prepared model's private metadata; empty when it is missing (another torch).
    """
    attrs = getattr(prepared, "meta", {}).get("_observed_graph_module_attrs")
    return dict(getattr(attrs, "node_name_to_qconfig", None) or {})


def is_exported_module(model: torch.nn.Module) -> bool:
    """True for a ``torch.export`` GraphModule (``ExportedProgram.module()``, ``prepare_pt2e`` output).

    Such modules replace ``train``/``eval`` per instance (they raise ``NotImplementedError``, or,
    after torchao's ``allow_exported_model_train_eval``, rewrite dropout/BN in the graph).
    """
    return isinstance(model, torch.fx.GraphModule) and ("eval" in vars(model) or "train" in vars(model))


@contextlib.contextmanager
def _quiet_import(*loggers: str) -> Iterator[None]:
    """Raise the named loggers to ERROR while importing, restored afterwards.

    torchao warns on import about its CUDA-only kernels, which a CPU torch cannot load and the PT2E
    flow does not use. torch 2.13's ``torch.utils.mkldnn``, imported by torchao's x86 quantizer,
    uses the deprecated ``torch.jit.script_method`` at import (torch's own code; 2.15 defers it): that
    DeprecationWarning is ignored too, so that ``-W error::DeprecationWarning`` can import the plugin.
    """
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for log, _ in saved:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script_method", category=DeprecationWarning)
            yield
    finally:
        for log, level in saved:
            log.setLevel(level)


def torchao_pt2e() -> Any:
    """The torchao PT2E namespace (observer bases, prepare/convert, quantizer specs), imported on first use.

    Returns a ``types.SimpleNamespace`` with ``ObserverBase``, ``UniformQuantizationObserverBase``,
    ``MinMaxObserver``, ``PerChannelMinMaxObserver``, ``HistogramObserver``, ``PartialWrapper``,
    ``prepare_pt2e``, ``prepare_qat_pt2e``, ``FakeQuantize``,
    ``convert_pt2e``, ``move_exported_model_to_eval``, ``move_exported_model_to_train``,
    ``QuantizationSpec``, ``QuantizationConfig``,
    ``QuantizationAnnotation``, ``Quantizer``, ``X86InductorQuantizer``.

    Raises:
        MissingDependencyError: torchao is not installed.
    """
    global _TORCHAO
    if _TORCHAO is None:
        try:
            with _quiet_import("torchao", "torch.utils._pytree"):
                import torchao.quantization.pt2e as pt2e
                from torchao.quantization.pt2e import observer as ao_observer
                from torchao.quantization.pt2e.fake_quantize import FakeQuantize as AOFakeQuantize
                from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
                from torchao.quantization.pt2e.quantizer import (
                    QuantizationAnnotation,
                    QuantizationSpec,
                    Quantizer,
                )
                from torchao.quantization.pt2e.quantizer.utils import QuantizationConfig
                from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer
        except ImportError as err:
            raise MissingDependencyError(
                f"the PT2E observers need torchao ({err}); install the extra: pip install 'zq-plugin[pt2e]' "
                "(torchao does not pull another torch)."
            ) from err
        import types

        _TORCHAO = types.SimpleNamespace(
            ObserverBase=pt2e.ObserverBase,
            UniformQuantizationObserverBase=pt2e.UniformQuantizationObserverBase,
            MinMaxObserver=pt2e.MinMaxObserver,
            PerChannelMinMaxObserver=pt2e.PerChannelMinMaxObserver,
            HistogramObserver=pt2e.HistogramObserver,
            get_observer_state_dict=ao_observer.get_observer_state_dict,
            load_observer_state_dict=ao_observer.load_observer_state_dict,
            PartialWrapper=ao_observer.PartialWrapper,
            prepare_pt2e=_with_pattern_cache(prepare_pt2e),
            prepare_qat_pt2e=_with_pattern_cache(prepare_qat_pt2e),
            FakeQuantize=AOFakeQuantize,
            convert_pt2e=_with_pattern_cache(convert_pt2e),
            move_exported_model_to_eval=_with_pattern_cache(getattr(pt2e, "move_exported_model_to_eval", None)),
            move_exported_model_to_train=_with_pattern_cache(getattr(pt2e, "move_exported_model_to_train", None)),
            QuantizationSpec=QuantizationSpec,
            QuantizationConfig=QuantizationConfig,
            QuantizationAnnotation=QuantizationAnnotation,
            Quantizer=Quantizer,
            X86InductorQuantizer=X86InductorQuantizer,
        )
    return _TORCHAO


_PATTERNS: dict[Any, torch.fx.GraphModule] = {}
_PATTERN_MODULES = (
    "torchao.quantization.pt2e.utils",
    "torchao.quantization.pt2e.qat_utils",
    "torchao.quantization.pt2e.reference_representation_rewrite",
)


def _frozen(value: Any, *, tensors: bool = True) -> Any:
    """A hashable stand-in for one argument of a pattern export; ``TypeError`` when there is none.

    An input tensor counts by what ``torch.export`` traces (shape, dtype, device,
    ``requires_grad``): the pattern graph does not depend on its values. A tensor the pattern
    closes over is a constant of the graph: ``tensors=False`` refuses it (``TypeError``).
    """
    if isinstance(value, torch.Tensor):
        if not tensors:
            raise TypeError("a tensor constant")
        return ("tensor", tuple(value.shape), value.dtype, value.device.type, value.requires_grad)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_frozen(v, tensors=tensors) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _frozen(v, tensors=tensors)) for k, v in value.items())))
    hash(value)
    return value


def _pattern_key(pattern: Any, example_inputs: Any, is_cuda: bool, kwargs: dict[str, Any]) -> Any:
    """The key of one pattern graph: the function's code, its closure and defaults, the inputs' shapes.

    ``None`` (not cached) for anything else: a module with state, a closure over a tensor or over
    something unhashable.
    """
    fn = getattr(pattern, "fn", pattern) if type(pattern).__name__ == "WrapperModule" else pattern
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    try:
        cells = tuple(_frozen(cell.cell_contents, tensors=False) for cell in (fn.__closure__ or ()))
        defaults = _frozen(fn.__defaults__ or (), tensors=False)
        return (code, cells, defaults, _frozen(example_inputs), is_cuda, _frozen(kwargs))
    except (TypeError, ValueError):  # an unhashable cell, an empty cell
        return None


@contextlib.contextmanager
def torchao_pattern_cache() -> Iterator[None]:
    """Within the block, torchao exports each of its rewrite patterns once per process.

    torchao's BatchNorm folding (``convert_pt2e`` after QAT, ``prepare_qat_pt2e``) and its
    train/eval rewrites (``move_exported_model_to_eval``) turn small pattern functions into aten
    graphs with ``torch.export`` on every call: 96 exports, about 40 s on 2 cores, for one QAT
    ``convert_pt2e``. The graphs depend only on the pattern's code, its closure and the example
    inputs' shapes, so they are kept here (keyed on exactly those) and each caller gets a deep copy
    (3 ms). The patch of torchao's private ``_get_aten_graph_module_for_pattern`` lives only inside
    the block; a torchao without it runs unchanged.
    """
    import importlib

    modules = []
    for name in _PATTERN_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if callable(getattr(module, "_get_aten_graph_module_for_pattern", None)):
            modules.append(module)
    if not modules:
        yield
        return
    original = modules[0].__dict__["_get_aten_graph_module_for_pattern"]
    if getattr(original, "zq_cached", False):  # nested: the outer block already patched it
        yield
        return

    def cached(pattern: Any, example_inputs: Any, is_cuda: bool = False, **kwargs: Any) -> Any:
        key = _pattern_key(pattern, example_inputs, is_cuda, kwargs)
        if key is None:
            return original(pattern, example_inputs, is_cuda, **kwargs)
        if key not in _PATTERNS:
            _PATTERNS[key] = original(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(_PATTERNS[key])

    cached.zq_cached = True  # type: ignore[attr-defined]
    saved = [(module, module.__dict__["_get_aten_graph_module_for_pattern"]) for module in modules]
    for module, _ in saved:
        module._get_aten_graph_module_for_pattern = cached  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module, fn in saved:
            module._get_aten_graph_module_for_pattern = fn  # type: ignore[attr-defined]


def _with_pattern_cache(fn: Any) -> Any:
    """``fn`` run inside :func:`torchao_pattern_cache`; ``None`` stays ``None``."""
    if fn is None:
        return None

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torchao_pattern_cache():
            return fn(*args, **kwargs)

    return wrapper


def has_torchao() -> bool:
    """True if torchao's PT2E flow can be imported."""
    try:
        torchao_pt2e()
    except MissingDependencyError:
        return False
    return True


_TORCHAO: Any = None
