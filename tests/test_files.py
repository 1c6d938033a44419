"""Files kdexp reads and writes: no code runs from a checkpoint, unwritable places get clear
messages, and a read-only teacher cache still serves the teachers it holds."""

from __future__ import annotations

import os
import pickle
import shutil
import stat

import pytest
import torch

from conftest import DIGITS_FAST, load_record, run_cli
from kdexp.core.errors import CheckpointError, StorageError
from kdexp.core.files import atomic_write_text, load_weights

FAST = [*DIGITS_FAST, "logger=none"]


class _RunsCode:
    """A pickle payload that would create ``marker`` if unpickled without weights_only."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_malicious(path, marker) -> None:
    """A file shaped like a checkpoint whose unpickling would run ``touch marker``."""
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"weight": _RunsCode(marker)}, "epoch": 0}, f, protocol=2)


def test_load_weights_refuses_a_pickle_that_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    write_malicious(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError, match="loading it would run code .*posix.system"):
        load_weights(tmp_path / "evil.pt")
    assert not marker.exists()
    # Plain unpickling runs it: the payload is real, and the refusal is what protects.
    with open(tmp_path / "evil.pt", "rb") as f:
        pickle.load(f)
    assert marker.exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished run, whose teacher sits in the cache."""
    base = tmp_path_factory.mktemp("files")
    proc = run_cli([*FAST, f"hydra.run.dir={base / 'run'}"], base / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return base


def test_a_malicious_teacher_checkpoint_is_refused_without_running(trained, tmp_path):
    marker = tmp_path / "pwned"
    write_malicious(tmp_path / "teacher.pt", marker)
    proc = run_cli([*FAST, f"teacher.checkpoint={tmp_path / 'teacher.pt'}", f"hydra.run.dir={tmp_path / 'r'}"],
                   trained / "cache")
    assert proc.returncode == 2 and "refused to load teacher checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists()
    assert load_record(tmp_path / "r")["status"] == "failed"


def test_a_malicious_file_in_the_teacher_cache_is_refused_without_running(trained, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(trained / "cache", cache)
    marker = tmp_path / "pwned"
    cached = next(cache.glob("teachers/*/teacher.pt"))
    write_malicious(cached, marker)
    proc = run_cli([*FAST, f"hydra.run.dir={tmp_path / 'r'}"], cache)
    assert proc.returncode == 2 and "refused to load teacher checkpoint" in proc.stderr
    assert not marker.exists()


def test_a_malicious_checkpoint_to_resume_from_is_refused_without_running(trained, tmp_path):
    folder = tmp_path / "r"
    args = [*FAST, "trainer.max_epochs=4", "+callbacks.stop._target_=kdexp_test_plugins.StopAt",
            f"hydra.run.dir={folder}"]
    assert run_cli(args, trained / "cache", extra_env={"KDEXP_TEST_STOP_AT": "2:0:SIGKILL"}).returncode == -9
    marker = tmp_path / "pwned"
    write_malicious(folder / "checkpoints" / "last.ckpt", marker)
    proc = run_cli(args, trained / "cache")
    assert proc.returncode == 2 and "its checkpoint checkpoints/last.ckpt would run code" in proc.stderr
    assert not marker.exists()


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "record.json"
    atomic_write_text(target, "old")

    class Boom(Exception):
        pass

    def failing(tmp):
        tmp.write_text("half")
        raise Boom

    from kdexp.core.files import atomic_write

    with pytest.raises(Boom):
        atomic_write(target, failing)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["record.json"]


# -- unwritable places -------------------------------------------------------------------
def without_root_override() -> list[str]:
    """A command prefix under which file permissions bind (root ignores them by default)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a folder unwritable for this process")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]


def make_read_only(folder) -> None:
    for path in [folder, *folder.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def run_unprivileged(args, cache, tmp_path):
    import subprocess
    import sys

    from conftest import PLUGINS, ROOT

    env = dict(os.environ, KDEXP_CACHE_DIR=str(cache), WANDB_MODE="offline", WANDB_SILENT="true",
               PYTHONPATH=str(PLUGINS), WANDB_DIR=str(tmp_path))
    return subprocess.run([*without_root_override(), sys.executable, "-m", "kdexp.train", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def test_a_read_only_teacher_cache_serves_its_teacher(trained, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(trained / "cache", cache)
    make_read_only(cache)
    try:
        proc = run_unprivileged([*FAST, f"hydra.run.dir={tmp_path / 'r'}"], cache, tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        record = load_record(tmp_path / "r")
        assert record["teacher"]["source"] == "cache" and record["status"] == "finished"
        assert record["teacher"]["hash"] == load_record(trained / "run")["teacher"]["hash"]
    finally:
        cache.chmod(0o755)


def test_a_read_only_cache_without_the_teacher_is_explained(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    make_read_only(cache)
    try:
        proc = run_unprivileged([*FAST, f"hydra.run.dir={tmp_path / 'r'}"], cache, tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "cannot write teacher cache folder" in proc.stderr and "not writable" in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        cache.chmod(0o755)


def test_a_read_only_output_folder_is_explained(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    make_read_only(out)
    try:
        proc = run_unprivileged([*FAST, f"hydra.run.dir={out}"], tmp_path / "cache", tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "cannot write run folder" in proc.stderr and "not writable" in proc.stderr
        assert "Traceback" not in proc.stderr and list(out.iterdir()) == []
        # a folder to be created inside it: Hydra would create it and fail with a raw traceback
        proc = run_unprivileged([*FAST, f"hydra.run.dir={out / 'new'}"], tmp_path / "cache", tmp_path)
        assert proc.returncode == 2 and "cannot write run folder" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        out.chmod(0o755)


def test_storage_errors_say_what_and_how(tmp_path):
    import errno

    from kdexp.core.files import storage_error

    full = storage_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "x", "run record")
    assert isinstance(full, StorageError) and "the disk is full" in str(full) and "Nothing half-written" in str(full)


def test_an_untrained_teacher_is_refused_unless_asked_for(tmp_path):
    from kdexp.models import CNN2D

    torch.manual_seed(0)
    torch.save(CNN2D([1, 8, 8], 10, width=32).state_dict(), tmp_path / "random.pt")
    args = [*FAST, f"teacher.checkpoint={tmp_path / 'random.pt'}"]
    proc = run_cli([*args, f"hydra.run.dir={tmp_path / 'refused'}"], tmp_path / "cache")
    assert proc.returncode == 2 and "no better than chance" in proc.stderr
    assert load_record(tmp_path / "refused")["status"] == "failed"
    control = run_cli([*args, "+teacher.allow_untrained=true", f"hydra.run.dir={tmp_path / 'control'}"],
                      tmp_path / "cache")
    assert control.returncode == 0, control.stderr[-2000:]
    record = load_record(tmp_path / "control")
    assert record["status"] == "finished" and record["config"]["teacher"]["allow_untrained"] is True
