"""Placeholder: replaced by the trainer implementation."""
from modelscope.trainers.trainer import EpochBasedTrainer


class VisionEfficientTuningTrainer(EpochBasedTrainer):
    pass
