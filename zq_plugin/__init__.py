"""zq_plugin: zero-shot (data-free) quantization for the PyTorch quantization flows.

Synthesize calibration data from a trained model alone, then calibrate torch.ao FX (and,
later, Brevitas and torchao PT2E) quantized models with it.

Example:
    >>> import zq_plugin
    >>> sorted(zq_plugin.METHODS)
    ['adadfq', 'dsg', 'gdfq', 'genie', 'noise', 'retro', 'zeroq']
"""

from zq_plugin import finetuning  # noqa: F401  (registers the game's synthesizers, adadfq and gdfq)
from zq_plugin._utils import CalibrationSummary
from zq_plugin.backends.fx import calibrate, convert_int8_fx, qconfig, quantize_fx, uniform_qconfig_mapping
from zq_plugin.data import SyntheticDataset, model_fingerprint
from zq_plugin.errors import (
    ConfigError,
    DataMismatchError,
    DatasetCorruptError,
    DatasetNotFoundError,
    MissingDependencyError,
    ModelError,
    NotCalibratedError,
    ZQError,
)
from zq_plugin.evaluation import accuracy
from zq_plugin.fake_quant import FastFakeQuantize
from zq_plugin.recipe import finetune, quantize, reconstruct_brevitas, reconstruct_pt2e
from zq_plugin.reconstruct import ReconstructConfig, reconstruct_fx
from zq_plugin.report import describe
from zq_plugin.synth import METHODS, AdaDFQConfig, DSGConfig, GDFQConfig, NoiseConfig, ZeroQConfig, synthesize
from zq_plugin.synth.stream import GeneratorStream

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "AdaDFQConfig",
    "CalibrationSummary",
    "ConfigError",
    "DSGConfig",
    "DataMismatchError",
    "DatasetCorruptError",
    "DatasetNotFoundError",
    "FastFakeQuantize",
    "GDFQConfig",
    "GeneratorStream",
    "MissingDependencyError",
    "ModelError",
    "NoiseConfig",
    "NotCalibratedError",
    "ReconstructConfig",
    "SyntheticDataset",
    "ZQError",
    "ZeroQConfig",
    "__version__",
    "accuracy",
    "calibrate",
    "convert_int8_fx",
    "describe",
    "finetune",
    "model_fingerprint",
    "qconfig",
    "quantize",
    "quantize_fx",
    "reconstruct_brevitas",
    "reconstruct_fx",
    "reconstruct_pt2e",
    "synthesize",
    "uniform_qconfig_mapping",
]
