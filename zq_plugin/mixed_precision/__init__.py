"""Mixed precision from synthetic data: sensitivity, Pareto-optimal bit plans, hybrid granularity, non-uniform weights.

1. :func:`measure_sensitivity`: ZeroQ's Omega_i(k) per layer and bit width.
2. :func:`pareto_plan`: the exact minimum-sensitivity plan for a weight-size budget, and the frontier.
3. :func:`hybrid_plan`: Retro-Synthesis's per-tensor/per-channel choice per layer.
   :func:`bops_plan`: weight and input bits per layer for a bit-operations budget ("W4A4").
4. :class:`BitPlan`: the plan as a plain value (JSON, table); :func:`to_qconfig_mapping` turns
   it into a torch.ao ``QConfigMapping`` (activation bits moved to the producer's output).
"""

from zq_plugin.mixed_precision.bops import BopsPlanResult, bops_plan, layer_macs
from zq_plugin.mixed_precision.pareto import Budget, FrontierPoint, best_under, pareto_frontier
from zq_plugin.mixed_precision.planner import PlanResult, hybrid_plan, pareto_plan
from zq_plugin.mixed_precision.sensitivity import HybridChoice, Sensitivity, measure_sensitivity, quantize_weight
from zq_plugin.nonuniform import NonUniformFakeQuantize, clustered_quantize
from zq_plugin.plan import BitPlan, LayerBits

__all__ = [
    "BitPlan",
    "BopsPlanResult",
    "Budget",
    "FrontierPoint",
    "HybridChoice",
    "LayerBits",
    "NonUniformFakeQuantize",
    "PlanResult",
    "Sensitivity",
    "best_under",
    "bops_plan",
    "clustered_quantize",
    "hybrid_plan",
    "layer_macs",
    "measure_sensitivity",
    "pareto_frontier",
    "pareto_plan",
    "quantize_weight",
]
