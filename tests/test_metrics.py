"""kdexp.run.metrics against torchmetrics, an independent implementation of the same definitions."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from kdexp.run.metrics import EvalMetrics
from kdexp.objectives.base import UNLABELLED


def batches(n_batches: int = 5, size: int = 37, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for b in range(n_batches):
        # Sharper logits in later batches, so the confidences fill many calibration bins.
        logits = torch.randn(size, classes, generator=g) * (0.5 + b)
        targets = torch.randint(classes, (size,), generator=g)
        teacher = logits + torch.randn(size, classes, generator=g)
        yield logits, targets, teacher


def test_eval_metrics_equal_torchmetrics_over_several_batches():
    ours = EvalMetrics(10)
    acc = MulticlassAccuracy(num_classes=10, average="micro")
    ece = MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")
    nll, agreement, kl = MeanMetric(), MeanMetric(), MeanMetric()
    for logits, targets, teacher in batches():
        ours.update(logits, targets, teacher)
        acc.update(logits, targets)
        ece.update(logits.softmax(-1), targets)
        nll.update(F.cross_entropy(logits, targets, reduction="none"))
        agreement.update((logits.argmax(-1) == teacher.argmax(-1)).float())
        kl.update(F.kl_div(logits.log_softmax(-1), teacher.log_softmax(-1), reduction="none",
                           log_target=True).sum(-1))
    got = ours.compute()
    assert set(got) == {"acc", "ece", "nll", "agreement", "kl_teacher"}
    expected = {"acc": acc.compute(), "ece": ece.compute(), "nll": nll.compute(),
                "agreement": agreement.compute(), "kl_teacher": kl.compute()}
    for name, value in expected.items():
        assert float(got[name]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), name
    assert 0 < float(got["ece"]) < 1


def test_reset_starts_over_and_an_empty_split_reports_nan():
    metrics = EvalMetrics(10)
    first, second = list(batches(2))
    metrics.update(*first)
    metrics.reset()
    metrics.update(*second)
    alone = EvalMetrics(10)
    alone.update(*second)
    assert {k: float(v) for k, v in metrics.compute().items()} == {k: float(v) for k, v in alone.compute().items()}
    assert all(math.isnan(float(v)) for v in EvalMetrics(10).compute().values())


def test_sequence_metrics_count_only_labelled_positions():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 8, 20, generator=g)
    targets = torch.randint(20, (3, 8), generator=g)
    targets[:, :3] = UNLABELLED  # a prompt: not predicted
    metrics = EvalMetrics(20)
    metrics.update(logits, targets)
    got = metrics.compute()
    valid = targets != UNLABELLED
    nll = F.cross_entropy(logits[valid], targets[valid])
    assert float(got["nll"]) == pytest.approx(float(nll), rel=1e-6)
    assert float(got["ppl"]) == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert float(got["bpb"]) == pytest.approx(float(nll) / math.log(2), rel=1e-6)
    assert float(got["acc"]) == pytest.approx(float((logits[valid].argmax(-1) == targets[valid]).float().mean()))
