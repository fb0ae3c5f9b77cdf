"""Training engines: MONAI's ``SupervisedTrainer`` with each network's own training step.

MONAI's ``SupervisedTrainer`` takes an ``iteration_update(engine, batchdata)`` that replaces its
default iteration; every network brings such a step and the bundle's one trainer runs it.

- :mod:`.supervised`: MGRAD-UNet's feedback step and the trainer, the training budget, autocast.
- :mod:`.diffusion`: MedSegDiff's batch (the label noised, the image the condition) for MONAI's DiffusionInferer.
- :mod:`.adversarial`: Hi-gMISnet's pGAN step (discriminators, then generators), its losses, one LR schedule over
  several optimizers.
"""

from mgrad_net.engines.adversarial import AdversarialStep, HiGMISnetLoss, SchedulerGroup
from mgrad_net.engines.diffusion import SegmentationDiffusionPrepareBatch
from mgrad_net.engines.supervised import (
    EvaluatorAutocast,
    FeedbackStep,
    FeedbackTrainer,
    TrainingBudget,
    autocast,
    logits_of,
    native_mixed_precision,
    prepare_batch,
)

__all__ = [
    "AdversarialStep",
    "HiGMISnetLoss",
    "SchedulerGroup",
    "SegmentationDiffusionPrepareBatch",
    "EvaluatorAutocast",
    "FeedbackStep",
    "FeedbackTrainer",
    "TrainingBudget",
    "autocast",
    "logits_of",
    "native_mixed_precision",
    "prepare_batch",
]
