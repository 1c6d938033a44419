"""Packed training: N students in one vmapped loop, each equal to the same student trained alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_config
from kdexp.models import MLP
from kdexp.objectives.base import ModelOutputs
from kdexp.objectives.hinton import HintonKD
from kdexp.packed import StudentPack, epoch_order, fit_pack, pack_groups, packed_hinton_terms, train_epoch
from kdexp.train import run

BASE = ["data=mnist1d", "student=mlp", "student.width=64", "trainer.max_epochs=3", "teacher.max_epochs=20",
        "logger=none"]
POINTS = [(1, 4.0, 0.9), (2, 4.0, 0.9), (1, 2.0, 0.5), (2, 2.0, 0.5)]  # two seeds × two (T, α)


def test_a_pack_of_four_kd_students_and_a_ce_only_one_equals_each_trained_alone(tmp_path):
    settings = [[f"seed={s}", f"kd.temperature={t}", f"kd.alpha={a}"] for s, t, a in POINTS] + [["kd=none", "seed=2"]]
    alone = [run(compose_config([*BASE, *point, f"paths.output_dir={tmp_path / str(i)}"], tmp_path))["metrics"]
             for i, point in enumerate(settings)]
    packed = fit_pack([compose_config([*BASE, *point], tmp_path) for point in settings])
    assert len({round(m["train/loss"], 3) for m in alone}) == 5  # five different runs, not one repeated
    for single, member in zip(alone, packed):
        assert member["status"] == "finished"
        assert set(member) - {"status"} == set(single)  # the keys a single run's record holds, all of them
        for key, value in single.items():  # and their values: accuracies exactly, losses and calibration closely
            assert member[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_the_packed_loss_is_each_students_hinton_loss():
    torch.manual_seed(0)
    logits, teacher = torch.randn(3, 8, 5), torch.randn(3, 8, 5)
    targets = torch.randint(0, 5, (3, 8))
    temperature, alpha = torch.tensor([1.0, 4.0, 8.0]), torch.tensor([0.1, 0.5, 0.9])
    terms = packed_hinton_terms(logits, targets, teacher, temperature, alpha)
    for i in range(3):
        single = HintonKD(float(temperature[i]), float(alpha[i]))(ModelOutputs(logits[i]), ModelOutputs(teacher[i]),
                                                                   targets[i])
        for name in ("loss_ce", "loss_kd"):
            assert terms[name][i] == pytest.approx(float(single[name]), rel=1e-6), (i, name)


def test_stacked_adam_equals_one_adam_per_student_and_gradients_never_cross():
    torch.manual_seed(0)
    students = [MLP([10], 4, width=8, depth=2) for _ in range(3)]
    alone = [copy.deepcopy(s) for s in students]
    pack = StudentPack(students)
    stacked = torch.optim.Adam(pack.parameters(), lr=0.01)
    separate = [torch.optim.Adam(s.parameters(), lr=0.01) for s in alone]
    for step in range(5):
        x, y = torch.randn(3, 6, 10), torch.randint(0, 4, (3, 6))
        losses = F.cross_entropy(pack.forward(x).reshape(18, 4), y.reshape(18), reduction="none").view(3, 6).mean(1)
        stacked.zero_grad()
        (losses * torch.tensor([1.0, 0.0, 1.0])).sum().backward()  # student 1 gets no loss this time
        stacked.step()
        for i, (student, optimizer) in enumerate(zip(alone, separate)):
            optimizer.zero_grad()
            (F.cross_entropy(student(x[i]), y[i]) * (0.0 if i == 1 else 1.0)).backward()
            optimizer.step()
    for i, student in enumerate(alone):
        for name, tensor in student.state_dict().items():
            assert torch.allclose(pack.state_dict(i)[name], tensor, atol=1e-6), (i, name)


def test_each_student_keeps_its_own_data_order():
    from kdexp.data.batches import IndexBatches

    x, y = torch.arange(50).float().unsqueeze(1), torch.arange(50)
    for seed in (1, 7):
        loader = IndexBatches(x, y, batch_size=50, shuffle=True, seed=seed)
        for epoch in range(3):
            _, _, index = next(iter(loader))
            assert torch.equal(index, epoch_order(50, seed, epoch))
    assert not torch.equal(epoch_order(50, 1, 0), epoch_order(50, 7, 0))


def test_a_member_whose_loss_goes_nan_fails_alone_and_the_others_train_on_unchanged():
    def students(with_broken: bool) -> list:
        built = []
        for seed in (1, 2, 3):
            torch.manual_seed(seed)
            built.append(MLP([10], 4, width=8, depth=2))
        if with_broken:
            with torch.no_grad():
                built[1].stage1[0].weight[0, 0] = float("nan")  # its logits, hence its loss, are NaN
            return built
        return [built[0], built[2]]

    x, y, teacher = torch.randn(60, 10), torch.randint(0, 4, (60,)), torch.randn(60, 4)
    results = {}
    for with_broken in (True, False):
        pack = StudentPack(students(with_broken))
        optimizer = torch.optim.Adam(pack.parameters(), lr=0.01)
        seeds = [1, 2, 3] if with_broken else [1, 3]
        settings = torch.full((len(seeds),), 2.0), torch.full((len(seeds),), 0.5)
        for epoch in range(3):
            train_epoch(pack, optimizer, x, y, teacher, seeds, epoch, 16, *settings)
        results[with_broken] = pack
    broken, clean = results[True], results[False]
    assert list(broken.failures) == [1] and "training loss became nan at epoch 0, batch 0" in broken.failures[1]
    for mine, theirs in ((0, 0), (2, 1)):  # the healthy members equal a pack that never held the broken one
        for name, tensor in clean.state_dict(theirs).items():
            assert torch.allclose(broken.state_dict(mine)[name], tensor, atol=1e-6), (mine, name)


def test_grid_points_pack_by_everything_but_seed_temperature_and_alpha(tmp_path):
    grid = [[f"seed={s}", f"kd.temperature={t}", f"student.width={w}"] for w in (64, 128) for t in (2, 4)
            for s in (1, 2, 3)]
    grid += [["kd=none", "seed=1", "student.width=64"], ["kd=dkd", "seed=1", "student.width=64"],
             ["chain=[96]", "seed=1", "student.width=64"]]
    cfgs = [compose_config(["data=mnist1d", "student=mlp", *point], tmp_path) for point in grid]
    packs, alone = pack_groups(cfgs, size=4)
    widths = [{int(cfgs[i].student.width) for i in pack} for pack in packs]
    assert all(len(w) == 1 for w in widths)  # a pack never mixes widths
    assert sorted(i for pack in packs for i in pack) == list(range(13))  # 12 Hinton points + the CE-only one
    assert max(len(p) for p in packs) == 4 and len(packs) == 4  # width 64: 7 points → 4 + 3; width 128: 6 → 4 + 2
    assert set(alone) == {13, 14} and "Hinton KD and CE-only" in alone[13] and "chains" in alone[14]
