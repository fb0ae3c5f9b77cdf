"""Ignite handlers the bundle needs beyond MONAI's own.

- :mod:`.evaluation`: :class:`SegmentationReport` (per-case × per-class metrics and their summary)
  and :class:`OptimizeForInference` (the evaluator's network in its inference form);
- :mod:`.training`: :class:`StopOnNonFiniteLoss`, :class:`TrainingLog` (with
  :func:`read_training_log`), :class:`BestMetricRecord` and :class:`WeightsWithoutValidation`;
- :mod:`.utils`: what they share (a batch's source files, which process writes).
"""

from mgrad_net.handlers.evaluation import OptimizeForInference, SegmentationReport
from mgrad_net.handlers.training import (
    TRAINING_LOG_FIELDS,
    BestMetricRecord,
    StopOnNonFiniteLoss,
    TrainingLog,
    WeightsWithoutValidation,
    read_training_log,
)

__all__ = [
    "SegmentationReport",
    "OptimizeForInference",
    "StopOnNonFiniteLoss",
    "TRAINING_LOG_FIELDS",
    "TrainingLog",
    "read_training_log",
    "BestMetricRecord",
    "WeightsWithoutValidation",
]
