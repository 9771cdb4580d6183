"""Block-wise reconstruction on calibration data (AdaRound, BRECQ, QDrop, Genie-M) and its parts.

:func:`reconstruct_fx` (also ``zq_plugin.reconstruct_fx``) quantizes a model in the clamping FX
simulation and reconstructs it unit by unit; the learned quantizers
(:mod:`zq_plugin.reconstruct.quantizers`), the units found from the graph
(:mod:`zq_plugin.reconstruct.blocks`) and the engine (:mod:`zq_plugin.reconstruct.engine`) are
its parts. docs/reconstruction.md has the math, the defaults and the measurements.
"""

from zq_plugin.reconstruct.blocks import Block, find_blocks, find_layers
from zq_plugin.reconstruct.engine import METHODS, ReconstructConfig, float_teacher, reconstruct_fx, reconstruct_unit
from zq_plugin.reconstruct.quantizers import (
    LearnedRoundingWeight,
    LSQActivation,
    beta_at,
    rectified_sigmoid,
    rounding_regularizer,
)

__all__ = [
    "METHODS",
    "Block",
    "LSQActivation",
    "LearnedRoundingWeight",
    "ReconstructConfig",
    "beta_at",
    "find_blocks",
    "find_layers",
    "float_teacher",
    "reconstruct_fx",
    "reconstruct_unit",
    "rectified_sigmoid",
    "rounding_regularizer",
]
