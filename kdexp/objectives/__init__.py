"""KD objectives, one per file. The config group ``conf/kd/`` is the registry."""

from kdexp.objectives.attention import AttentionTransfer
from kdexp.objectives.base import DistillationObjective, ModelOutputs, total_loss
from kdexp.objectives.cross_entropy import CrossEntropyOnly
from kdexp.objectives.dist import DIST
from kdexp.objectives.dkd import DKD
from kdexp.objectives.fitnets import FitNets
from kdexp.objectives.hinton import HintonKD, soft_target_kl
from kdexp.objectives.mse_logits import MSELogitsKD
from kdexp.objectives.multi_teacher import MultiTeacherKD
from kdexp.objectives.pkt import PKT
from kdexp.objectives.rkd import RKD
from kdexp.objectives.similarity import SimilarityPreserving
from kdexp.objectives.svm import HingeKD, MulticlassHinge

__all__ = [
    "DIST",
    "DKD",
    "PKT",
    "RKD",
    "AttentionTransfer",
    "CrossEntropyOnly",
    "DistillationObjective",
    "FitNets",
    "HingeKD",
    "HintonKD",
    "MSELogitsKD",
    "ModelOutputs",
    "MultiTeacherKD",
    "MulticlassHinge",
    "SimilarityPreserving",
    "soft_target_kl",
    "total_loss",
]
