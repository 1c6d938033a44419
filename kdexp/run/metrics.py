"""Evaluation metrics of a classifier in plain torch: accuracy, calibration, likelihood and agreement.

Single runs log them from their LightningModule and packed runs from their own loop
(:mod:`kdexp.grid.pack`), so both compute each number the same way, batch by batch. They are
plain torch, not torchmetrics, because importing torchmetrics (it imports transformers and
scipy.signal) takes 2.5 s: a packed sweep's workers train without it.

Every metric is a sum over samples (counts, and per-bin sums for the calibration error), kept
in float64, so a distributed run adds its ranks' sums (``all_reduce``) and gets the metric of
the whole split, as torchmetrics does by gathering its states.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdexp.objectives.base import UNLABELLED, DistillationObjective
from kdexp.schedules import Schedule

ECE_BINS = 15  # equal-width confidence bins of the expected calibration error (Guo et al., 2017)


class EvalMetrics(nn.Module):
    """Accuracy and calibration of a classifier, plus agreement with a teacher when given one.

    ``acc``: top-1 accuracy. ``ece``: expected calibration error, the l1 gap between accuracy and
    mean top-1 confidence over 15 equal-width bins, weighted by each bin's share of the samples
    (Guo et al., 2017, "On Calibration of Modern Neural Networks"). ``nll``: mean negative
    log-likelihood of the targets, in nats. With a teacher: ``agreement`` (same top-1 class) and
    ``kl_teacher`` (KL(teacher ‖ student) at T = 1 per sample). A language model's every
    labelled position is one prediction, and it also gets ``ppl`` and ``bpb`` (bits per token).
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.has_teacher = False
        self.sequence = False
        self.sums: dict[str, Tensor] = {}
        # Moves with the LightningModule, so a rank that evaluated nothing still knows the device its
        # all-reduce runs on (NCCL reduces GPU tensors only). Not saved in checkpoints.
        self.register_buffer("_device_marker", torch.zeros(0), persistent=False)

    def _add(self, name: str, value: Tensor) -> None:
        value = value.detach().double()
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def update(self, logits: Tensor, targets: Tensor, teacher_logits: Tensor | None = None) -> None:
        if logits.dim() == 3:  # a language model: every labelled position is one prediction
            self.sequence = True
            valid = targets != UNLABELLED
            logits, targets = logits[valid], targets[valid]
            teacher_logits = teacher_logits[valid] if teacher_logits is not None else None
        logits = logits.float()
        probabilities = logits.softmax(-1)
        confidence, predicted = probabilities.max(-1)
        correct = (predicted == targets).float()
        # Bin b holds the confidences in [b/15, (b+1)/15); a confidence of exactly 1 gets a bin of its own.
        edges = torch.linspace(0, 1, ECE_BINS + 1, dtype=confidence.dtype, device=confidence.device)
        bins = torch.bucketize(confidence, edges, right=True) - 1
        per_bin = torch.zeros(3, ECE_BINS + 1, dtype=torch.float64, device=logits.device)
        per_bin[0].index_add_(0, bins, torch.ones_like(confidence, dtype=torch.float64))
        per_bin[1].index_add_(0, bins, confidence.double())
        per_bin[2].index_add_(0, bins, correct.double())
        self._add("bins", per_bin)
        self._add("count", torch.tensor(float(len(targets)), device=logits.device))
        self._add("correct", correct.sum())
        self._add("nll", F.cross_entropy(logits, targets, reduction="sum"))
        if teacher_logits is not None:
            self.has_teacher = True
            teacher_logits = teacher_logits.float()
            self._add("agreement", (predicted == teacher_logits.argmax(-1)).sum())
            kl = F.kl_div(logits.log_softmax(-1), teacher_logits.log_softmax(-1), reduction="none", log_target=True)
            self._add("kl_teacher", kl.sum())

    def compute(self) -> dict[str, Tensor]:
        sums = self._summed_over_ranks()
        if not sums:  # nothing evaluated (an empty split): no number to report
            return {name: torch.tensor(math.nan) for name in ("acc", "ece", "nll")}
        count = sums["count"]
        counts, confidences, corrects = sums["bins"]
        shares = counts / count
        gaps = (corrects - confidences).abs() / counts.clamp(min=1)
        out = {"acc": sums["correct"] / count, "ece": (gaps * shares).sum(), "nll": sums["nll"] / count}
        if self.sequence:  # per token: perplexity, and bits per token (= per byte for byte-level text)
            out["ppl"] = out["nll"].exp()
            out["bpb"] = out["nll"] / math.log(2)
        if self.has_teacher:
            out["agreement"] = sums["agreement"] / count
            out["kl_teacher"] = sums["kl_teacher"] / count
        return {name: value.float() for name, value in out.items()}

    def reset(self) -> None:
        self.sums = {}

    def _summed_over_ranks(self) -> dict[str, Tensor]:
        """The sums of every rank's samples (this process's alone without DDP).

        Every rank takes part with the same tensors in the same order, also one that evaluated no
        sample (a split smaller than the number of ranks): two all-reduces, the flags (did any rank
        see a sample, a teacher, a sequence) and then every sum packed into one vector.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return dict(self.sums)
        device = self._device_marker.device
        flags = torch.tensor([bool(self.sums), self.has_teacher, self.sequence], dtype=torch.float64, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if not bool(flags[0]):
            return {}
        self.has_teacher, self.sequence = bool(flags[1]), bool(flags[2])
        shapes = {"bins": (3, ECE_BINS + 1), "count": (), "correct": (), "nll": ()}
        if self.has_teacher:
            shapes.update(agreement=(), kl_teacher=())
        parts = [self.sums.get(name, torch.zeros(shape, dtype=torch.float64)).to(device).reshape(-1)
                 for name, shape in shapes.items()]
        packed = torch.cat(parts)
        dist.all_reduce(packed)
        sums, start = {}, 0
        for name, shape in shapes.items():
            size = math.prod(shape)
            sums[name] = packed[start:start + size].reshape(shape)
            start += size
        return sums


def settings_in_force(objective: DistillationObjective, schedules: Mapping[str, Schedule] | None = None
                      ) -> dict[str, float]:
    """An objective's numeric knobs and scheduled settings as they stand, as ``train/<name>``."""
    scheduled = [n for n in (schedules or {}) if n not in objective.knobs]
    values = {name: getattr(objective, name, None) for name in [*objective.knobs, *scheduled]}
    return {f"train/{name}": float(v) for name, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
