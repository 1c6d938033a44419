"""How good a teacher is, and what a student's record says about it: its accuracy, whether it beats
chance (a random or broken teacher is refused), and the record's ``teacher`` fields."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from kdexp.core.errors import CheckpointError
from kdexp.core.tasks import UNLABELLED
from kdexp.data.batches import IndexBatches
from kdexp.teachers.chain import route_of
from kdexp.teachers.provision import Teacher

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, batches: IndexBatches) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode, restored after) on ``batches``: per sample, or
    per labelled position for a language model's (B, L) targets."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y, _ in batches:
        valid = y != UNLABELLED
        correct += int(((model(x).argmax(-1) == y) & valid).sum())
        total += int(valid.sum())
    model.train(was_training)
    return correct / max(total, 1)


def majority_share(targets: torch.Tensor) -> float:
    """The accuracy of always predicting the most frequent labelled target (the next-token task's
    most common byte, an imbalanced data set's largest class)."""
    labelled = targets[targets != UNLABELLED]
    return float(torch.bincount(labelled).max()) / max(len(labelled), 1) if len(labelled) else 0.0


def require_better_than_chance(teacher: Teacher, num_classes: int, allowed: bool, majority: float = 0.0) -> bool:
    """Refuse to distil from a teacher that scores no better than guessing (an untrained or broken file).

    Guessing is 1/C, or always answering the most frequent target (``majority``): a random
    language model that happens to predict the space character everywhere is no teacher.
    A record must not call a run "distilled" when there was nothing to distil; a
    random-teacher control is still possible, on purpose, with ``+teacher.allow_untrained=true``
    (``debug=fast`` sets it: its one-epoch teachers check that things run). Returns whether the
    teacher beat chance, for the record (``teacher.better_than_chance``).
    """
    chance = 1.0 / num_classes
    better = teacher.test_acc >= max(1.5 * chance, majority + 0.01)
    if not better and allowed:
        log.warning("The teacher scores %.1f %% on the test set, no better than chance (always answering the most "
                    "frequent target scores %.1f %%); distilling from it anyway (teacher.allow_untrained=true): "
                    "this run's record says teacher.better_than_chance: false.", 100 * teacher.test_acc,
                    100 * max(chance, majority))
    if not better and not allowed:
        raise CheckpointError(
            f"the teacher ({teacher.source}: {teacher.path}) scores {100 * teacher.test_acc:.1f} % on the test set, "
            f"no better than chance ({100 * chance:.1f} % for {num_classes} classes; always answering the most "
            f"frequent target scores {100 * majority:.1f} %): it looks untrained or broken. Check "
            "teacher.checkpoint (or teacher.max_epochs), or pass +teacher.allow_untrained=true for a deliberate "
            "random-teacher control."
        )
    return better


def teacher_fields(teacher: Teacher, better_than_chance: bool) -> dict[str, Any]:
    """What a student's record states about its teacher: identity, lineage, stage and route, and whether
    it beat chance (false only where ``teacher.allow_untrained=true`` let a weak teacher through)."""
    return {"teacher": {"hash": teacher.weights_hash, "test_acc": teacher.test_acc, "source": teacher.source,
                        "path": teacher.path, "cache_key": teacher.cache_key,
                        "verified": teacher.model is not None,  # False: taken from a predictions file
                        "better_than_chance": better_than_chance},
            "lineage": teacher.lineage, "stage": len(teacher.lineage), "route": route_of(teacher.lineage)}
