"""Teacher provisioning: train once under a lock, reuse, and explain bad checkpoints."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest
import torch

from kdexp.core.errors import CheckpointError
from kdexp.models import CNN2D, MLP
from kdexp.teachers.provision import Teacher, load_teacher_weights, provision_teacher, save_teacher, weights_hash


def _fit_tiny(model: torch.nn.Module, folder: Path) -> float:
    """A real (tiny) training loop that also leaves a trace of every call."""
    with open(folder.parent / "train_calls.log", "a") as f:
        f.write(f"{folder.name}\n")
    time.sleep(1.0)  # long enough for the other process to reach the lock
    x, y = _tiny_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return _accuracy(model)


def _tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(64, 4, generator=generator), torch.randint(0, 3, (64,), generator=generator)


@torch.no_grad()
def _accuracy(model: torch.nn.Module) -> float:
    x, y = _tiny_data()
    return float((model(x).argmax(-1) == y).float().mean())


def provision_tiny(cache: Path, key: str) -> Teacher:
    """Provision a tiny MLP teacher (no checkpoint) under ``cache/key``, training it with ``_fit_tiny``."""
    return provision_teacher(lambda: MLP([4], 3, width=8), None, 3, cache, key, train=_fit_tiny,
                             evaluate=_accuracy)


def _provision(cache: str, out: "mp.Queue") -> None:
    teacher = provision_tiny(Path(cache), "key123")
    out.put((teacher.source, teacher.weights_hash))


def test_concurrent_runs_train_the_teacher_exactly_once(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_provision, args=(str(tmp_path), queue)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    results = sorted(queue.get(timeout=5) for _ in workers)
    assert [source for source, _ in results] == ["cache", "trained"]
    assert results[0][1] == results[1][1]  # both hold the same weights
    assert (tmp_path / "train_calls.log").read_text().splitlines() == ["key123"]


def test_cached_teacher_keeps_its_weights_and_accuracy(tmp_path):
    first, again = provision_tiny(tmp_path, "k"), provision_tiny(tmp_path, "k")
    assert (first.source, again.source) == ("trained", "cache")
    assert weights_hash(again.model) == first.weights_hash and again.test_acc == first.test_acc


def test_class_count_mismatch_is_explained(tmp_path):
    path = tmp_path / "five_classes.pt"
    save_teacher(path, CNN2D([1, 8, 8], 5, width=4), {})
    with pytest.raises(CheckpointError, match="predicts 5 classes but the data set has 10"):
        load_teacher_weights(CNN2D([1, 8, 8], 10, width=4), path, num_classes=10)


def test_architecture_mismatch_is_explained(tmp_path):
    path = tmp_path / "narrow.pt"
    save_teacher(path, CNN2D([1, 8, 8], 10, width=4), {})
    with pytest.raises(CheckpointError, match="does not match teacher model CNN2D.*teacher.model.width"):
        load_teacher_weights(CNN2D([1, 8, 8], 10, width=8), path, num_classes=10)


def test_unreadable_checkpoint_is_explained(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read teacher checkpoint"):
        load_teacher_weights(MLP([4], 3), path, num_classes=3)


def test_a_cached_teacher_whose_weights_were_replaced_is_refused(tmp_path):
    trained = provision_tiny(tmp_path, "k")
    path = Path(trained.path)
    blob = torch.load(path, weights_only=True)
    blob["state_dict"] = {k: v + 1.0 for k, v in blob["state_dict"].items()}  # meta still claims the old hash
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match="other than the ones stored when it was trained"):
        provision_tiny(tmp_path, "k")


def test_a_cache_hit_reports_the_accuracy_measured_now(tmp_path):
    trained = provision_tiny(tmp_path, "k")
    path = Path(trained.path)
    blob = torch.load(path, weights_only=True)
    blob["kdexp_meta"]["test_acc"] = 0.999  # a stale or edited claim
    torch.save(blob, path)
    again = provision_tiny(tmp_path, "k")
    assert again.test_acc == trained.test_acc != 0.999
