"""On a CUDA device: bf16 mixed precision gives the KD step float32 gives, within bf16's precision.

Marked ``gpu`` and skipped without CUDA; ``scripts/gpu_check.sh`` runs them (``pytest -m gpu``) and
counts a skip there as a failure. The pair is the CRD one (resnet32x4 -> resnet8x4), random weights,
one CIFAR-shaped batch of 64. bf16 keeps 8 mantissa bits (relative rounding ~4e-3 per operation), so
the loss is compared at 2 % relative and the gradient by direction (cosine > 0.99), not bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config

from kdexp.models import cifar
from kdexp.objectives.base import ModelOutputs
from kdexp.objectives.hinton import HintonKD

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _kd_step(autocast: bool) -> tuple[float, torch.Tensor]:
    torch.manual_seed(0)
    teacher = cifar.resnet32x4(in_shape=(3, 32, 32), num_classes=100).cuda().eval().requires_grad_(False)
    student = cifar.resnet8x4(in_shape=(3, 32, 32), num_classes=100).cuda().train()
    x = torch.randn(64, 3, 32, 32, device="cuda")  # (B, C, H, W)
    y = torch.randint(0, 100, (64,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        terms = HintonKD(temperature=4.0, alpha=0.9)(ModelOutputs(student(x)), ModelOutputs(teacher(x)), y)
        loss = sum(terms.values())
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in student.parameters()])
    return float(loss), grad


def test_a_bf16_kd_step_matches_float32():
    loss32, grad32 = _kd_step(autocast=False)
    loss16, grad16 = _kd_step(autocast=True)
    assert loss16 == pytest.approx(loss32, rel=2e-2)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.99


def test_trainer_gpu_asks_bf16_mixed_where_the_gpu_has_it(tmp_path):
    cfg = compose_config(["trainer=gpu"], tmp_path)
    expected = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == expected
