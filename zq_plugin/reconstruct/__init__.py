"""Block-wise reconstruction on calibration data (AdaRound, BRECQ, QDrop, Genie-M): in progress (issue 15).

Today: the learned quantizers (:mod:`zq_plugin.reconstruct.quantizers`), the units found from
the graph (:mod:`zq_plugin.reconstruct.blocks`) and a first engine
(:func:`zq_plugin.reconstruct.engine.reconstruct`; experimental: it lowers accuracy today,
docs/reconstruction.md).
"""

from zq_plugin.reconstruct.blocks import Block, find_blocks
from zq_plugin.reconstruct.quantizers import (
    LearnedRoundingWeight,
    LSQActivation,
    beta_at,
    rectified_sigmoid,
    rounding_regularizer,
)

__all__ = [
    "Block",
    "LSQActivation",
    "LearnedRoundingWeight",
    "beta_at",
    "find_blocks",
    "rectified_sigmoid",
    "rounding_regularizer",
]
