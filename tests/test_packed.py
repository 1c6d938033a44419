"""Packed training: N students in one vmapped loop, each equal to the same student trained alone."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
import torch.nn.functional as F

from conftest import compose_config, load_record, records_in, run_cli
from kdexp.models import MLP
from kdexp.objectives.base import ModelOutputs
from kdexp.objectives.hinton import HintonKD
from kdexp.grid.pack import StudentPack, epoch_order, pack_groups, train_epoch
from kdexp.grid.compose import job_configs
from kdexp.grid.members import run_pack
from kdexp.train import run

BASE = ["data=mnist1d", "student=mlp", "student.width=64", "trainer.max_epochs=3", "teacher.max_epochs=20"]
POINTS = [(1, 4.0, 0.9), (2, 4.0, 0.9), (1, 2.0, 0.5), (2, 2.0, 0.5)]  # two seeds × two (T, α)
SETTINGS = [[f"seed={s}", f"kd.temperature={t}", f"kd.alpha={a}"] for s, t, a in POINTS] + [["kd=none", "seed=2"]]


# Counted metrics (accuracy, agreement) must agree exactly; the others within float tolerance: a batched
# (vmapped) matrix product sums in another order than a single one, and 100 Adam steps carry ~1e-6
# differences in the weights into the 5th digit of a loss or a binned calibration error.
COUNTED = ("acc", "acc_last", "acc_best", "acc_init", "agreement", "agreement_last", "best_val_score", "test_acc")


def assert_same_metrics(mine: dict, theirs: dict) -> None:
    assert set(mine) == set(theirs)  # every metric key of a single run's record
    for key, value in theirs.items():
        tolerance = {"abs": 1e-9} if key.endswith(COUNTED) else {"rel": 2e-4, "abs": 1e-6}
        assert mine[key] == pytest.approx(value, **tolerance), key


@pytest.fixture(scope="module")
def alone_and_packed(tmp_path_factory):
    """Four Hinton students (two seeds × two (T, α)) and a CE-only one, each trained alone by
    ``kdexp train`` and, separately, all five as one pack; W&B offline for both."""
    base = tmp_path_factory.mktemp("packed")
    with pytest.MonkeyPatch.context() as env:
        for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(base),
                           "KDEXP_CACHE_DIR": str(base / "cache")}.items():
            env.setenv(key, value)
        env.chdir(base)  # a job's paths.root_dir is the working directory, as under `kdexp sweep`
        alone = [run(compose_config([*BASE, *point, f"paths.output_dir={base / 'alone' / str(i)}"], base))
                 for i, point in enumerate(SETTINGS)]
        statuses = run_pack(job_configs(base / "packed", [[*BASE, *point] for point in SETTINGS]))
    packed = [load_record(folder) for folder in statuses]
    return base, alone, packed


def test_a_pack_of_four_kd_students_and_a_ce_only_one_equals_each_trained_alone(alone_and_packed):
    _, alone, packed = alone_and_packed
    assert len({round(r["metrics"]["train/loss"], 3) for r in alone}) == 5  # five different runs, not one repeated
    for single, member in zip(alone, packed):
        assert member["status"] == "finished"
        assert_same_metrics(member["metrics"], single["metrics"])


def test_a_packed_record_holds_what_a_single_runs_record_holds(alone_and_packed):
    _, alone, packed = alone_and_packed
    for index, (single, member) in enumerate(zip(alone, packed)):
        assert set(member) - set(single) == {"packed"} and set(single) <= set(member)
        for key in ("run_name", "job_type", "objective", "parameters", "epochs", "global_steps", "seed", "task",
                    "data_fingerprint", "data_sizes", "lineage", "route", "choices"):
            assert member[key] == single[key], key
        assert member["teacher"]["hash"] == single["teacher"]["hash"]
        assert set(member["timings_s"]) == set(single["timings_s"])
        assert member["packed"]["size"] == 5 and member["packed"]["index"] == index
        assert member["overrides"] == [o for o in single["overrides"] if not o.startswith("paths.")]


def test_packed_checkpoints_hold_the_weights_and_epochs_a_single_run_saves(alone_and_packed):
    _, alone, packed = alone_and_packed
    for single, member in zip(alone, packed):
        for name in ("best", "last"):
            mine = torch.load(member["checkpoints"][name], weights_only=True)
            theirs = torch.load(single["checkpoints"][name], weights_only=True)
            assert (mine["epoch"], mine["global_step"]) == (theirs["epoch"], theirs["global_step"]), name
            assert set(mine["state_dict"]) == set(theirs["state_dict"])
            for key, tensor in theirs["state_dict"].items():  # the same weights, to float noise amplified by
                # training (a ReLU unit that flips on one sample moves its row by ~lr): relative size < 1 %
                assert (mine["state_dict"][key] - tensor).norm() <= 1e-2 * tensor.norm(), (name, key)
            assert set(mine["kdexp"]["metrics"]) == set(theirs["kdexp"]["metrics"])
        last = torch.load(member["checkpoints"]["last"], weights_only=True)
        assert last["optimizer_states"][0]["state"][0]["exp_avg"].shape == last["state_dict"]["model.stage1.0.weight"].shape


def test_a_packed_students_wandb_run_is_the_one_its_single_run_logs(alone_and_packed):
    from wandb_file import read_run

    _, alone, packed = alone_and_packed
    for single, member in zip(alone, packed):
        mine, theirs = read_run(member["output_dir"]), read_run(single["output_dir"])
        for key in ("name", "group", "job_type", "tags", "config_keys", "exit_code"):
            assert mine[key] == theirs[key], key
        # the installed packages W&B lists for each run, listed once for all of a pack's runs
        requirements = [sorted(Path(record["output_dir"]).glob("wandb/*-run-*/files/requirements.txt"))
                        for record in (member, single)]
        assert all(len(found) == 1 for found in requirements), requirements
        assert requirements[0][0].read_text() == requirements[1][0].read_text() != ""
        assert [sorted(row) for row in mine["history"]] == [sorted(row) for row in theirs["history"]]
        for row_mine, row_theirs in zip(mine["history"], theirs["history"]):
            for key in ("epoch", "trainer/global_step"):
                assert row_mine.get(key) == row_theirs.get(key), key
            assert_same_metrics({k: float(v) for k, v in row_mine.items()}, {k: float(v) for k, v in row_theirs.items()})


def test_a_member_whose_loss_goes_nan_fails_its_own_record_and_the_others_finish_as_alone(alone_and_packed):
    """Validation refuses a temperature that would make the loss NaN (kd.temperature >= 0.05), so the middle
    member gets one after its folder is claimed: a loss that goes non-finite inside a pack."""
    from kdexp.grid.members import claim_members, train_members

    base, alone, _ = alone_and_packed
    points = [SETTINGS[0], ["seed=1", "kd.temperature=3", "kd.alpha=0.9"], SETTINGS[2]]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KDEXP_CACHE_DIR", str(base / "cache"))
        env.chdir(base)
        members = claim_members(job_configs(base / "nan", [[*BASE, *point] for point in points]), "skip")
        members[1].cfg.kd.temperature = 1e-40  # float32: t / T overflows, softmax(t / T) is NaN at the first step
        try:
            train_members(members)
        finally:
            for member in members:
                member.claim.release()
    records = [load_record(member.job.output_dir) for member in members]
    assert [r["status"] for r in records] == ["finished", "failed", "finished"]
    assert records[1]["error"]["type"] == "NonFiniteLossError"
    assert "training loss became nan at global step 0 (epoch 0, batch 0)" in records[1]["error"]["message"]
    assert "checkpoints" not in records[1]
    for member, single in ((records[0], alone[0]), (records[2], alone[2])):
        assert_same_metrics(member["metrics"], single["metrics"])


@pytest.mark.parametrize("width", [16, 512])
def test_a_packed_epoch_is_each_students_own_epoch_bit_for_bit(width):
    """Three students (two Hinton settings and a CE-only one) trained two epochs in a pack, against
    the same students trained one at a time by a plain loop: every weight identical to the last bit."""
    from kdexp.data.batches import IndexBatches
    from kdexp.objectives.base import total_loss
    from kdexp.objectives.cross_entropy import CrossEntropyOnly

    torch.manual_seed(0)
    x, y, teacher = torch.randn(250, 40), torch.randint(0, 10, (250,)), torch.randn(250, 10)
    students = [MLP([40], 10, width=width) for _ in range(3)]
    alone = [copy.deepcopy(s) for s in students]
    objectives = [HintonKD(4.0, 0.9), HintonKD(2.0, 0.5), CrossEntropyOnly()]
    seeds = [1, 2, 3]
    pack = StudentPack(students)
    optimizer = torch.optim.Adam(pack.optimizer_parameters(), lr=3e-3)
    for epoch in range(2):
        sums = train_epoch(pack, optimizer, x, y, teacher, seeds, epoch, 100, objectives)
    # Bit for bit where the BLAS computes one slice of a batched product as it computes the single
    # product (every CPU this was run on); elsewhere only to float tolerance.
    b, m, w = torch.randn(2, 1, 7), torch.randn(2, 50, 40), torch.randn(2, 40, 7)
    same = torch.equal if torch.equal(torch.baddbmm(b, m, w)[0], torch.addmm(b[0], m[0], w[0])) else \
        (lambda a, c: torch.allclose(a, c, atol=1e-5))
    for i, (student, objective) in enumerate(zip(alone, objectives)):
        own = torch.optim.Adam(student.parameters(), lr=3e-3)
        loader = IndexBatches(x, y, batch_size=100, shuffle=True, seed=seeds[i])  # each pass draws the next epoch
        for epoch in range(2):
            total = None
            for xb, yb, index in loader:
                terms = objective(ModelOutputs(student(xb)), ModelOutputs(teacher[index]) if objective.needs_teacher
                                  else None, yb)
                loss = total_loss(terms)
                own.zero_grad()
                loss.backward()
                own.step()
                total = loss.detach() if total is None else total + loss.detach()
        for name, tensor in student.state_dict().items():
            assert same(pack.state_dict(i)[name], tensor), (i, name)
        assert sums.means(i)["train/loss"] == pytest.approx(float(total / 3), rel=1e-6)  # the mean a single run logs
    if same is torch.equal:  # the fused Hinton step proved itself bit-identical, and trained these weights
        assert pack.fused is True


def test_a_fused_step_that_differs_from_autograd_is_not_used(monkeypatch):
    """The first step compares the fused Hinton gradient with autograd's; off by one ulp, the pack trains
    on autograd's per-student path, and its weights equal a pack that never tried the fused one."""
    from kdexp.grid import pack as packed

    def train(perturb: bool):
        torch.manual_seed(0)
        x, y, teacher = torch.randn(120, 12), torch.randint(0, 5, (120,)), torch.randn(120, 5)
        pack = StudentPack([MLP([12], 5, width=8) for _ in range(2)])
        if not perturb:
            pack.fused = False  # autograd from the start
        optimizer = torch.optim.Adam(pack.optimizer_parameters(), lr=0.01)
        for epoch in range(2):
            train_epoch(pack, optimizer, x, y, teacher, [1, 2], epoch, 40, [HintonKD(4.0, 0.9), HintonKD(2.0, 0.5)])
        return pack

    loss_and_grad = packed.FusedHinton.loss_and_grad
    monkeypatch.setattr(packed.FusedHinton, "loss_and_grad",
                        lambda self, s, t, y: (lambda v, terms, g: (v, terms, torch.nextafter(g, g + 1)))(
                            *loss_and_grad(self, s, t, y)))
    fell_back = train(perturb=True)
    monkeypatch.undo()
    reference = train(perturb=False)
    assert fell_back.fused is False
    assert torch.equal(fell_back.flat, reference.flat)


def test_stacked_adam_equals_one_adam_per_student_and_gradients_never_cross():
    torch.manual_seed(0)
    students = [MLP([10], 4, width=8, depth=2) for _ in range(3)]
    alone = [copy.deepcopy(s) for s in students]
    pack = StudentPack(students)
    stacked = torch.optim.Adam(pack.optimizer_parameters(), lr=0.01)
    separate = [torch.optim.Adam(s.parameters(), lr=0.01) for s in alone]
    for step in range(5):
        x, y = torch.randn(3, 6, 10), torch.randint(0, 4, (3, 6))
        losses = F.cross_entropy(pack.forward(x).reshape(18, 4), y.reshape(18), reduction="none").view(3, 6).mean(1)
        pack.zero_grad()
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
        optimizer = torch.optim.Adam(pack.optimizer_parameters(), lr=0.01)
        seeds = [1, 2, 3] if with_broken else [1, 3]
        objectives = [HintonKD(2.0, 0.5) for _ in seeds]
        for epoch in range(3):
            train_epoch(pack, optimizer, x, y, teacher, seeds, epoch, 16, objectives)
        results[with_broken] = pack
    broken, clean = results[True], results[False]
    assert list(broken.failures) == [1] and "training loss became nan at global step 0 (epoch 0, batch 0)" in broken.failures[1]
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


def test_a_sweep_packs_what_can_pack_and_runs_the_rest_alone(tmp_path):
    """An lr schedule cannot pack: those points run in the multirun after the pack, the others in it.
    The pack's worker is a fresh interpreter here (KDEXP_FORK=0), as on macOS: the smoke sweep
    of test_sweep.py covers forked workers."""
    sweep = tmp_path / "mixed.yaml"
    sweep.write_text(yaml.safe_dump({"name": "mixed", "method": "grid", "parameters": {
        "experiment": {"value": "digits_smoke"}, "kd.temperature": {"value": 4}, "seed": {"values": [1, 2]},
        "scheduler": {"values": ["none", "cosine"]}, "student.width": {"value": 16},
        "trainer.max_epochs": {"value": 2}, "teacher.max_epochs": {"value": 2}, "logger": {"value": "csv"}}}))
    proc = run_cli(["sweep", str(sweep), "--pack", "4", "--dir", str(tmp_path / "out")], tmp_path / "cache",
                   module="kdexp.cli", extra_env={"KDEXP_FORK": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--pack 4: 2 run(s) in 1 pack(s), 2 alone" in proc.stdout and "alone (2): lr schedulers" in proc.stdout
    assert "4 runs — 4 finished" in proc.stdout and "2 run(s) outside the packs" in proc.stdout
    records = records_in(tmp_path / "out")
    assert sorted("packed" in r for r in records) == [False, False, True, True]
    for record in records:  # the packed ones are the ones without a schedule
        assert ("packed" in record) == (not record["config"].get("scheduler"))
        assert record["status"] == "finished" and (Path(record["output_dir"]) / "checkpoints" / "best.ckpt").is_file()


@pytest.mark.parametrize("override, reason", [
    ("scheduler=cosine", "lr schedulers"),
    ("+trainer.limit_train_batches=3", "trainer.limit_train_batches"),
    ("+trainer.gradient_clip_val=1.0", "gradient clipping would mix members"),
    ("optimizer._target_=torch.optim.RMSprop", "only Adam, AdamW and SGD"),
    ("kd.cache_teacher=false", "cached teacher outputs"),
    ("+callbacks.early_stop={_target_:pytorch_lightning.callbacks.EarlyStopping,monitor:val/acc}", "mode=max"),
    ("+callbacks.lr={_target_:pytorch_lightning.callbacks.LearningRateMonitor}", "callbacks.lr"),
    ("student=cnn1d", "only MLP students"),
])
def test_points_that_a_pack_cannot_reproduce_run_alone_and_say_why(tmp_path, override, reason):
    from kdexp.grid.pack import why_not_packable

    assert why_not_packable(compose_config(["data=mnist1d"], tmp_path)) is None
    assert reason in why_not_packable(compose_config(["data=mnist1d", override], tmp_path))


def test_pack_options_that_cannot_work_are_refused_before_anything_runs(capsys):
    from kdexp.cli import main

    assert main(["sweep", "sweeps/smoke.yaml", "--pack", "1"]) == 2
    assert "--pack must be >= 2" in capsys.readouterr().err
    assert main(["sweep", "sweeps/smoke.yaml", "--pack", "4", "--wandb"]) == 2
    assert "does not combine with --wandb" in capsys.readouterr().err


EARLY_STOP = "+callbacks.early_stop={_target_:pytorch_lightning.callbacks.EarlyStopping,monitor:val/acc,mode:max," \
             "patience:1,min_delta:0.01}"


def test_each_packed_student_stops_early_when_its_own_run_would(alone_and_packed, tmp_path, monkeypatch):
    cached, _, _ = alone_and_packed  # its teacher, trained once for this module
    monkeypatch.chdir(cached)
    monkeypatch.setenv("KDEXP_CACHE_DIR", str(cached / "cache"))
    base = ["data=mnist1d", "student.width=32", "trainer.max_epochs=12", "teacher.max_epochs=20", "logger=none",
            EARLY_STOP]
    points = [["seed=1", "kd.temperature=4"], ["seed=2", "kd.temperature=2", "kd.alpha=0.5"], ["kd=none", "seed=3"]]
    alone = [run(compose_config([*base, *point, f"paths.output_dir={tmp_path / 'alone' / str(i)}"], cached))
             for i, point in enumerate(points)]
    statuses = run_pack(job_configs(tmp_path / "packed", [[*base, *point] for point in points]))
    packed = [load_record(folder) for folder in statuses]
    assert len({r["epochs"] for r in alone}) > 1 and min(r["epochs"] for r in alone) < 12  # they stop, each its own way
    for single, member in zip(alone, packed):
        assert (member["epochs"], member["global_steps"]) == (single["epochs"], single["global_steps"])
        assert_same_metrics(member["metrics"], single["metrics"])
        last = torch.load(member["checkpoints"]["last"], weights_only=True)
        assert last["epoch"] == single["epochs"] - 1


def test_a_pack_trains_and_writes_its_runs_without_importing_lightning(alone_and_packed, tmp_path):
    """Why packed sweeps start fast: their workers never import Lightning or torchmetrics (4 s together)."""
    import json
    import os
    import subprocess
    import sys

    base, _, _ = alone_and_packed
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from kdexp.grid.compose import job_configs\nfrom kdexp.grid.members import run_pack\n"
        f"jobs = job_configs(Path({str(tmp_path)!r}), [{BASE!r} + ['trainer.max_epochs=1', f'seed={{s}}'] for s in (1, 2)])\n"
        "statuses = run_pack(jobs)\n"
        "print(json.dumps({'statuses': sorted(statuses.values()),\n"
        "                  'imported': [m for m in ('pytorch_lightning', 'lightning_fabric', 'torchmetrics', 'wandb')\n"
        "                               if m in sys.modules]}))\n"
    )
    env = {**os.environ, "KDEXP_CACHE_DIR": str(base / "cache"), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], cwd=base, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"statuses": ["finished", "finished"], "imported": ["wandb"]}, done.stderr[-2000:]
    for folder in tmp_path.glob("seed=*"):
        record = load_record(folder)
        assert record["wandb"]["mode"] == "offline" and (folder / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow  # end to end; a second packed sweep
def test_a_packed_sweep_counts_the_runs_it_was_refused_as_refused(tmp_path):
    """Two sweeps into one --dir: a folder the other one holds is refused here, and the summary says so,
    whether that run is still going (exit 1) or the other sweep has finished it (no run of this sweep's)."""
    import json

    from filelock import FileLock

    from kdexp.run.folder import LOCK_NAME
    from kdexp.grid.sweep import grid, load_sweep, summarize

    sweep = tmp_path / "two.yaml"
    sweep.write_text(yaml.safe_dump({"name": "two", "method": "grid", "parameters": {
        "experiment": {"value": "digits_smoke"}, "kd.temperature": {"values": [2, 4]}, "seed": {"values": [1, 2]},
        "student.width": {"value": 16}, "trainer.max_epochs": {"value": 1}, "teacher.max_epochs": {"value": 2},
        "logger": {"value": "none"}}}))
    points = grid(load_sweep(sweep))
    held = points[3]  # the other sweep's run of kd.temperature=4 seed=2, still training: it holds the lock
    folder = tmp_path / "out" / ",".join(item for item in held if not item.startswith("logger="))
    folder.mkdir(parents=True)
    lock = FileLock(str(folder / LOCK_NAME), timeout=0)
    lock.acquire()
    try:
        (folder / "run_record.json").write_text(json.dumps({"status": "running", "overrides": list(held),
                                                            "sweep_id": "the-other-sweep"}))
        before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
        proc = run_cli(["sweep", str(sweep), "--pack", "4", "--dir", str(tmp_path / "out")], tmp_path / "cache",
                       module="kdexp.cli")
        assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()} == before  # untouched
        # the other sweep finishes its run
        (folder / "run_record.json").write_text(json.dumps({"status": "finished", "overrides": list(held),
                                                            "sweep_id": "the-other-sweep"}))
    finally:
        lock.release()
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "4 runs — 3 finished, 0 skipped (already finished), 0 failed, 0 missing, 1 refused" in proc.stdout
    assert "in use by another run" in proc.stdout and "is in use by another run" in proc.stderr
    mine = {load_record(p.parent)["sweep_id"] for p in (tmp_path / "out").glob("*/run_record.json")} - {"the-other-sweep"}
    assert len(mine) == 1  # the records of the three runs this sweep trained name it
    text, counts = summarize(points, tmp_path / "out", set(), mine.pop())  # as it reads once the other has finished
    assert "4 runs — 3 finished, 0 skipped (already finished), 0 failed, 0 missing, 1 refused" in text
    assert "finished by another run" in text and (counts["refused"], counts["refused_unfinished"]) == (1, 0)
