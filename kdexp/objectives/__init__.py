"""KD objectives, one per file. The config group ``conf/kd/`` is the registry."""

from kdexp.objectives.base import DistillationObjective, ModelOutputs, total_loss
from kdexp.objectives.cross_entropy import CrossEntropyOnly
from kdexp.objectives.hinton import HintonKD, soft_target_kl

__all__ = [
    "CrossEntropyOnly",
    "DistillationObjective",
    "HintonKD",
    "ModelOutputs",
    "soft_target_kl",
    "total_loss",
]
