"""Teacher outputs computed once: cache correctness, sharing, damage, saved predictions."""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from pathlib import Path

import pytest
import torch

from kdexp.cli import main as cli_main
from kdexp.data import DigitsDataModule
from kdexp.core.errors import CheckpointError, ConfigError
from kdexp.models import CNN2D
from kdexp.models.ensemble import TeacherEnsemble
from kdexp.run.modules import DistillationModule
from kdexp.objectives import HintonKD
from kdexp.teachers.outputs import (
    CACHE_FILE,
    TeacherOutputStore,
    cache_key,
    cached_store,
    compute_store,
    read_store,
    save_store,
)
from kdexp.train import run
from conftest import compose_config

IDENTITY = {"teacher_hash": "t1", "data_fingerprint": "d1", "data_transform": {"val_fraction": 0.1},
            "teacher_layers": ["stage2"], "members": 0, "num_threads": 1}


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=64, eval_batch_size=500)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def teacher() -> CNN2D:
    torch.manual_seed(0)
    return CNN2D((1, 8, 8), 10, width=8).eval()  # BatchNorm in eval mode: outputs do not depend on the batch


def store_for(teacher: torch.nn.Module, dm: DigitsDataModule, **identity) -> TeacherOutputStore:
    return compute_store(teacher, dm.eval_batches, {**IDENTITY, **identity})


def module_for(teacher: torch.nn.Module, store: TeacherOutputStore | None, layers=()) -> DistillationModule:
    objective = HintonKD(temperature=4.0, alpha=0.9)
    objective.teacher_features = tuple(layers)
    return DistillationModule(model=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)),
                              teacher=teacher, optimizer=torch.optim.SGD, num_classes=10, objective=objective,
                              teacher_store=store)


def test_cached_outputs_equal_the_online_teacher_on_a_shuffled_batch(digits, teacher):
    store = store_for(teacher, digits, teacher_layers=["stage2"])
    online, cached = module_for(teacher, None, ["stage2"]), module_for(teacher, store, ["stage2"])
    x, y, index = next(iter(digits.train_dataloader()))  # shuffled: indices are not 0..B-1
    assert not torch.equal(index, torch.arange(len(index)))
    a, b = online.teacher_outputs(x, index, "train"), cached.teacher_outputs(x, index, "train")
    torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.features["stage2"], a.features["stage2"], atol=1e-4, rtol=1e-4)
    # Same batch, same view: the loss the student is trained on agrees within float tolerance.
    student = online.student_outputs(x)
    loss_online = sum(online.objective(student, a, y).values())
    loss_cached = sum(cached.objective(student, b, y).values())
    torch.testing.assert_close(loss_cached, loss_online, atol=1e-5, rtol=1e-5)


def test_outputs_are_keyed_by_split_not_just_index(digits, teacher):
    store = store_for(teacher, digits)
    index = torch.arange(5)
    for split in ("train", "val", "test"):
        x = digits.splits[split].x[index]
        expected = teacher(digits.batch_transform(x)).detach()
        torch.testing.assert_close(store.outputs(split, index).logits, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(store.outputs("train", index).logits, store.outputs("test", index).logits)


def test_ensemble_members_are_stored_and_served(digits, teacher):
    torch.manual_seed(1)
    ensemble = TeacherEnsemble([teacher, CNN2D((1, 8, 8), 10, width=8).eval()])
    store = store_for(ensemble, digits, members=2, teacher_layers=[])
    index = torch.tensor([7, 3, 11])
    x = digits.batch_transform(digits.splits["val"].x[index])
    got = store.outputs("val", index)
    for mine, theirs in zip(got.members, ensemble.member_logits(x)):
        torch.testing.assert_close(mine, theirs.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.logits, ensemble(x).detach(), atol=1e-4, rtol=1e-4)


def test_a_second_request_reads_and_a_changed_identity_is_another_entry(tmp_path, digits, teacher):
    calls = []

    def compute(**identity):
        calls.append(identity)
        return store_for(teacher, digits, **identity)

    first, how1 = cached_store(tmp_path, IDENTITY, lambda: compute())
    again, how2 = cached_store(tmp_path, IDENTITY, lambda: compute())
    assert (how1, how2) == ("computed", "read") and len(calls) == 1
    torch.testing.assert_close(again.splits["train"].logits, first.splits["train"].logits, atol=0, rtol=0)
    for change in ({"teacher_hash": "t2"}, {"data_fingerprint": "d2"}, {"data_transform": {"val_fraction": 0.2}},
                   {"teacher_layers": []}):
        assert cache_key({**IDENTITY, **change}) != cache_key(IDENTITY)
        _, how = cached_store(tmp_path, {**IDENTITY, **change}, lambda c=change: compute(**c))
        assert how == "computed"
    assert len(calls) == 5


def _race(folder: str, out: "mp.Queue") -> None:
    def slow_compute() -> TeacherOutputStore:
        time.sleep(1.0)  # long enough for the other process to reach the lock
        logits = torch.arange(6000, dtype=torch.float32).reshape(600, 10)
        from kdexp.teachers.outputs import SplitOutputs
        return TeacherOutputStore({"train": SplitOutputs(logits)}, {**IDENTITY, "version": 1, "splits": {
            "train": {"rows": 600, "checksum": SplitOutputs(logits).checksum()}}})

    store, how = cached_store(Path(folder), IDENTITY, slow_compute)
    out.put((how, float(store.splits["train"].logits.sum())))


def test_two_processes_racing_write_one_complete_file(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_race, args=(str(tmp_path), queue)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    results = sorted(queue.get(timeout=5) for _ in workers)
    assert [how for how, _ in results] == ["computed", "read"]
    assert results[0][1] == results[1][1] == float(sum(range(6000)))
    entry = tmp_path / cache_key(IDENTITY)
    assert sorted(p.name for p in entry.iterdir() if not p.name.startswith(".")) == [CACHE_FILE]  # no temp files left


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_cache_file_is_detected_and_rebuilt_never_used(tmp_path, digits, teacher, damage, caplog):
    store, _ = cached_store(tmp_path, IDENTITY, lambda: store_for(teacher, digits))
    path = store.path
    del store
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:  # one byte inside the stored logits: the archive still opens, the checksum does not match
        logits = store_for(teacher, digits).splits["train"].logits.numpy().tobytes()
        offset = bytes(data).find(logits[:64])
        assert offset > 0
        data[offset + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        read_store(path)
    with caplog.at_level(logging.WARNING, logger="kdexp.teachers.outputs"):
        rebuilt, how = cached_store(tmp_path, IDENTITY, lambda: store_for(teacher, digits))
    assert how == "computed"
    assert "computing the teacher outputs again" in caplog.text
    assert len(list(path.parent.glob("damaged-*.pt"))) == 1  # kept for inspection, out of the way
    torch.testing.assert_close(rebuilt.splits["train"].logits, store_for(teacher, digits).splits["train"].logits)


def test_a_file_that_is_not_teacher_outputs_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match="not a kdexp teacher-outputs file"):
        read_store(path)
    with pytest.raises(CheckpointError, match="not found.*kdexp predict"):
        read_store(tmp_path / "missing.pt")


# -- through the real entry points ----------------------------------------------------------
FAST = ["experiment=digits_smoke", "teacher.max_epochs=3", "trainer.max_epochs=3", "logger=none"]


def run_in(tmp_path: Path, name: str, *overrides: str) -> dict:
    cfg = compose_config([*FAST, f"paths.output_dir={tmp_path / name}", *overrides], tmp_path)
    return run(cfg)


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    """The same short run three ways: teacher online, from the shared cache, from a saved-predictions file."""
    tmp_path = tmp_path_factory.mktemp("outputs")
    online = run_in(tmp_path, "online", "kd.cache_teacher=false")
    cached = run_in(tmp_path, "cached")
    again = run_in(tmp_path, "cached_again", "seed=2")
    predictions = tmp_path / "predictions.pt"
    compose_config([], tmp_path)  # HydraConfig set as the CLI would have it
    assert cli_main(["predict", "--out", str(predictions), *FAST, f"paths.cache_dir={tmp_path / 'cache'}"]) == 0
    from_file = run_in(tmp_path, "predictions", f"teacher.predictions={predictions}")
    return tmp_path, {"online": online, "cached": cached, "again": again, "predictions": from_file}


def test_results_agree_with_and_without_the_cache(three_runs):
    _, runs = three_runs
    assert runs["online"]["teacher_outputs"] == {"source": "online", "reason": "kd.cache_teacher=false"}
    assert runs["cached"]["teacher_outputs"]["source"] == "cache" and runs["cached"]["teacher_outputs"]["computed"]
    assert runs["again"]["teacher_outputs"]["computed"] is False  # the second run of the sweep reads it
    assert runs["predictions"]["teacher_outputs"]["source"] == "predictions"
    for name in ("cached", "predictions"):
        for key in ("test/acc", "val/acc_best", "test/agreement", "train/loss", "test/kl_teacher"):
            assert runs[name]["metrics"][key] == pytest.approx(runs["online"]["metrics"][key], abs=2e-3), (name, key)


def test_records_say_where_the_run_time_went(three_runs):
    _, runs = three_runs
    for record in runs.values():
        parts = record["timings_s"]
        assert {"data", "teacher", "teacher_outputs", "fit", "test"} <= parts.keys()
        assert parts["fit"] > 0 and sum(parts.values()) <= record["wall_time_s"]


def test_a_launcher_process_does_not_import_torch():
    """`python -m kdexp.train --multirun` with a parallel launcher runs no job itself: importing
    kdexp.train must not pull in torch or Lightning (seconds of CPU beside the workers)."""
    import subprocess
    import sys

    code = "import sys, kdexp.train; print(sorted(m for m in ('torch', 'pytorch_lightning') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_predictions_file_from_another_teacher_or_data_is_refused(three_runs, capsys):
    tmp_path, _ = three_runs
    predictions = tmp_path / "predictions.pt"
    with pytest.raises(CheckpointError, match="teacher_hash: file"):
        run_in(tmp_path, "other_teacher", f"teacher.predictions={predictions}", "teacher.seed=5")
    with pytest.raises(CheckpointError, match="data_transform"):
        run_in(tmp_path, "other_data", f"teacher.predictions={predictions}", "data.val_fraction=0.2")
    before = predictions.read_bytes()
    assert cli_main(["predict", "--out", str(predictions), *FAST]) == 2
    assert "never overwritten" in capsys.readouterr().err and predictions.read_bytes() == before


def test_predictions_saved_over_a_changed_file_are_refused(three_runs, tmp_path):
    source, _ = three_runs
    store = read_store(source / "predictions.pt")
    store.splits["train"].logits = store.splits["train"].logits.clone() + 1.0  # checksum no longer matches
    save_store(tmp_path / "edited.pt", store)
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        run_in(source, "edited", f"teacher.predictions={tmp_path / 'edited.pt'}")


def test_random_augmentation_keeps_the_teacher_online(tmp_path):
    from kdexp.teachers.source import get_teacher_outputs
    from kdexp.teachers.provision import Teacher

    class AugmentedDigits(DigitsDataModule):
        def train_augmentation(self):
            return lambda x, generator: x

    dm = AugmentedDigits()
    dm.setup()
    teacher = Teacher(CNN2D((1, 8, 8), 10, width=8), "h", 0.9, "checkpoint", "x")
    cfg = compose_config(FAST, tmp_path)
    store, note = get_teacher_outputs(cfg, dm, teacher, 0, HintonKD())
    assert store is None and note == {"source": "online", "reason": "random augmentation"}
    cfg.kd.cache_teacher = True
    with pytest.raises(ConfigError, match="augments its training inputs at random"):
        get_teacher_outputs(cfg, dm, teacher, 0, HintonKD())


# -- checked against the teacher, not only against checksums ---------------------------------
def forge(path: Path, split: str, out: Path | None = None) -> Path:
    """Zero a split's logits and rewrite its checksum to match: an edit the checksums cannot see."""
    store = read_store(path)
    outputs = store.splits[split]
    outputs.logits = torch.zeros_like(outputs.logits)
    store.manifest["splits"][split]["checksum"] = outputs.checksum()
    return save_store(out or path, store)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_a_forged_cache_is_caught_by_the_teacher_and_computed_again(tmp_path, digits, teacher, split, caplog):
    from kdexp.teachers.outputs import VERIFY_ROWS, verify_against_teacher

    def verify(store: TeacherOutputStore) -> None:
        verify_against_teacher(store, teacher, lambda s, i: digits.batch_transform(digits.splits[s].x[i]))

    def compute() -> TeacherOutputStore:
        return store_for(teacher, digits)

    first, how = cached_store(tmp_path, IDENTITY, compute, verify)
    assert how == "computed" and first.verification is None  # just computed by this teacher: nothing to check
    path = first.path
    clean, how = cached_store(tmp_path, IDENTITY, compute, verify)
    assert how == "read" and clean.verification["rows"] == 3 * VERIFY_ROWS
    assert clean.verification["max_abs_diff"] <= clean.verification["tolerance"]
    del first, clean
    forge(path, split)
    read_store(path)  # the checksums alone pass it
    with caplog.at_level(logging.WARNING, logger="kdexp.teachers.outputs"):
        rebuilt, how = cached_store(tmp_path, IDENTITY, compute, verify)
    assert how == "computed"
    assert f"of the '{split}' split checked against the teacher differ" in caplog.text and str(path) in caplog.text
    assert len(list(path.parent.glob("damaged-*.pt"))) == 1  # the forged file, kept aside for inspection
    torch.testing.assert_close(rebuilt.splits[split].logits, compute().splits[split].logits)


def test_a_run_reading_the_cache_records_the_check(three_runs):
    _, runs = three_runs
    check = runs["again"]["teacher_outputs"]["verified"]
    assert check["rows"] == 3 * 64 and 0 <= check["max_abs_diff"] <= check["tolerance"] == 1e-3
    assert "verified" not in runs["cached"]["teacher_outputs"]  # computed by the run itself
    assert runs["predictions"]["teacher_outputs"]["verified"]["rows"] == 3 * 64


def test_a_forged_predictions_file_is_refused_unless_the_teacher_is_not_loaded(three_runs, tmp_path):
    source, _ = three_runs
    forged = forge(source / "predictions.pt", "train", tmp_path / "forged.pt")
    with pytest.raises(CheckpointError, match="'train' split checked against the teacher differ.*kdexp predict"):
        run_in(source, "forged", f"teacher.predictions={forged}")
    # Without the teacher nothing can recompute a row: the record says the outputs were not verified.
    unloaded = run_in(source, "forged_unloaded", f"teacher.predictions={forged}", "teacher.load=false",
                      "trainer.max_epochs=1")
    assert unloaded["teacher"]["verified"] is False
    assert unloaded["teacher_outputs"]["verified"] is False
    assert "teacher.load=false" in unloaded["teacher_outputs"]["unverified_because"]


def test_a_predictions_file_of_another_architecture_is_refused_without_the_teacher(three_runs):
    source, _ = three_runs
    predictions = source / "predictions.pt"  # written by the CNN2D teacher of digits_smoke
    for name, override in (("mlp", "teacher=mlp"), ("wider", "teacher.model.width=64")):
        with pytest.raises(ConfigError, match="was written by another teacher than teacher="):
            run_in(source, name, f"teacher.predictions={predictions}", "teacher.load=false", override)
        assert not (source / name / "checkpoints").exists()  # refused before anything was trained
