"""Training engines: MONAI's ``SupervisedTrainer`` with each network's own training step.

MONAI's ``SupervisedTrainer`` takes an ``iteration_update(engine, batchdata)`` that replaces its
default iteration; every network brings such a step and the bundle's one trainer runs it.

- :mod:`.supervised`: MGRAD-UNet's feedback step (one plain step a batch for a network without
  feedback) and the trainer, the training budget, autocast.

The peers' own steps (MedSegDiff's batch, Hi-gMISnet's adversarial step) live with them in
:mod:`mgrad_net.peers`.
"""

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
    "EvaluatorAutocast",
    "FeedbackStep",
    "FeedbackTrainer",
    "TrainingBudget",
    "autocast",
    "logits_of",
    "native_mixed_precision",
    "prepare_batch",
]
