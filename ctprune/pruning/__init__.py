"""Pruning engines. ClickTrain pattern + connectivity pruning (this package's top level); PreCropping in `precrop/`.

    weights, skipped, macs = prunable_convs(conv_layers(model), tg.onnx_parameters())
    pruner = ClickTrainPruner(weights, ratio=8, patterns=8, skipped=skipped, macs=macs)   # TrainHooks
    ... training loop calls begin / extra_loss / after_backward / after_step / end_epoch ...
    plan = pruner.final_plan()
    plan.layer_patterns()   # {conv node: LayerPatterns} for the rewriter
    plan.layer_report(), plan.totals()   # for the report
"""

from ctprune.pruning.clicktrain import ClickTrainPruner
from ctprune.pruning.connectivity import allocate_kernels, largest_ratio
from ctprune.pruning.importance import ImportanceMeter, magnitude_importance
from ctprune.pruning.layers import prunable_convs
from ctprune.pruning.oneshot import OneShotPruner, one_shot_plan
from ctprune.pruning.patterns import PatternLibrary
from ctprune.pruning.plan import PlanLayer, PruningPlan
from ctprune.pruning.schedule import PruningSchedule
from ctprune.pruning.selection import select_plan

__all__ = [
    "ClickTrainPruner",
    "OneShotPruner",
    "one_shot_plan",
    "ImportanceMeter",
    "magnitude_importance",
    "PatternLibrary",
    "PruningPlan",
    "PlanLayer",
    "PruningSchedule",
    "allocate_kernels",
    "largest_ratio",
    "prunable_convs",
    "select_plan",
]
