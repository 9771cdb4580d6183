"""Block-wise reconstruction on calibration data (AdaRound, BRECQ, QDrop, Genie-M): in progress (issue 15).

Today: the learned quantizers (:mod:`zq_plugin.reconstruct.quantizers`).
"""

from zq_plugin.reconstruct.quantizers import (
    LearnedRoundingWeight,
    LSQActivation,
    beta_at,
    rectified_sigmoid,
    rounding_regularizer,
)

__all__ = ["LSQActivation", "LearnedRoundingWeight", "beta_at", "rectified_sigmoid", "rounding_regularizer"]
