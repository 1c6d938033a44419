"""Pairing of feature taps, shared by the feature objectives (FitNets, AT, SP, PKT, RKD).

``student_layers[i]`` is matched with ``teacher_layers[i]``; with no teacher list the
same paths are tapped in the teacher.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from kdexp.core.errors import require
from kdexp.objectives.base import DistillationObjective, ModelOutputs


def layer_lists(student_layers: Sequence[str] | str,
                teacher_layers: Sequence[str] | str | None) -> tuple[list[str], list[str]]:
    """Checked tap lists; ``teacher_layers=None`` taps the same paths in the teacher.

    A single string counts as one tap, so ``kd.student_layers=stage2`` means
    ``[stage2]`` rather than one tap per character.
    """
    student = [student_layers] if isinstance(student_layers, str) else [str(p) for p in student_layers]
    if teacher_layers is None:
        teacher = list(student)
    else:
        teacher = [teacher_layers] if isinstance(teacher_layers, str) else [str(p) for p in teacher_layers]
    require(len(student) >= 1,
            f"kd.student_layers must name at least one student layer, got {student}. "
            "Zoo models name theirs stage1, stage2, ... and pre_logits, e.g. kd.student_layers=[stage2].")
    require(len(teacher) == len(student),
            f"kd.teacher_layers must pair one teacher layer with each of kd.student_layers, got "
            f"{len(teacher)} teacher layer(s) {teacher} for {len(student)} student layer(s) {student}.")
    return student, teacher


def tapped_pairs(objective: DistillationObjective, student: ModelOutputs,
                 teacher: ModelOutputs) -> list[tuple[str, str, Tensor, Tensor]]:
    """``(student_path, teacher_path, student_feature, teacher_feature)`` for each tap pair.

    The teacher's features are detached: the teacher is a fixed target, and cached or
    user-supplied teacher outputs may still carry a graph.
    """
    pairs = []
    for s_path, t_path in zip(objective.student_features, objective.teacher_features):
        if s_path not in student.features or t_path not in teacher.features:
            raise ValueError(
                f"{type(objective).__name__} needs student feature '{s_path}' and teacher feature '{t_path}', "
                f"got student {sorted(student.features)} and teacher {sorted(teacher.features)}"
            )
        pairs.append((s_path, t_path, student.features[s_path], teacher.features[t_path].detach()))
    return pairs
