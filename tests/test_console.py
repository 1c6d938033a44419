"""A quiet console: a run prints what is being trained and its result; ``verbose=true`` brings the rest back."""

from __future__ import annotations

import logging
import re
import warnings

import pytest

from conftest import DIGITS_FAST, load_record, path_with_fake_srun, run_cli
from kdexp.core.console import LEAFSPEC_WARNING, ConsoleFormatter, LauncherLineFilter, configure_console, wandb_settings

# What Lightning and W&B print by themselves; none of it belongs on a default console.
LIBRARY_NOISE = ("wandb: Run history", "Tracking run with wandb", "syncing is set to `offline`", "wandb:",
                 "GPU available", "TPU available", "litlogger", "LeafSpec", "Trainer.fit` stopped",
                 "Restoring states", "Loaded model weights", "`srun` command is available")
# Lightning's words (lightning_fabric/plugins/environments/slurm.py), as on a SLURM login node.
SRUN_HINT = ("The `srun` command is available on your system but is not used. HINT: If your intention is to run "
             "Lightning on SLURM, prepend your python command with `srun` like so: srun python ...")
KDEXP_LINE = re.compile(r"\[\d\d:\d\d:\d\d\] ")  # kdexp's (and Hydra's) console format


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A default run that trains its tiny teacher, then a verbose run that reuses it.

    W&B's own switch is unset, as on a researcher's machine (the other CLI tests set WANDB_SILENT);
    ``srun`` is on PATH, as on a SLURM login node.
    """
    base = tmp_path_factory.mktemp("console")
    results = {}
    for name, extra in (("quiet", []), ("verbose", ["verbose=true"])):
        proc = run_cli([*DIGITS_FAST, "teacher.max_epochs=2", "trainer.max_epochs=2", *extra,
                        f"hydra.run.dir={base / name}"], base / "cache",
                       extra_env={"WANDB_SILENT": None, "WANDB_QUIET": None, "WANDB_DIR": str(base),
                                  "PATH": path_with_fake_srun(base / "bin")})
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = (base / name, proc.stdout + proc.stderr)
    return results


def test_default_run_prints_what_is_trained_and_the_result_only(runs):
    folder, out = runs["quiet"]
    record = load_record(folder)
    for noise in LIBRARY_NOISE:
        assert noise not in out, f"{noise!r} on the default console:\n{out}"
    lines = [line for line in out.splitlines() if line.strip()]
    assert all(KDEXP_LINE.match(line) for line in lines), out  # nothing printed around kdexp's logging
    assert f"Training {record['run_name']} → {folder}" in out
    assert "training it now" in out and "Teacher trained" in out  # the teacher, trained on first use
    assert out.count("W&B mode:") == 1  # the teacher's W&B run and the student's: said once
    assert re.search(rf"{re.escape(record['run_name'])} finished: test/acc .* \| record: {re.escape(str(folder))}", out)
    # Quiet is only the console: W&B still logged the run, offline, ready for `wandb sync`.
    assert record["wandb"]["mode"] == "offline" and record["wandb"]["url"] is None
    assert any((folder / "wandb").glob("offline-run-*/*.wandb"))


def test_verbose_brings_lightning_and_wandb_output_back(runs):
    _, out = runs["verbose"]
    assert "GPU available" in out and "Tracking run with wandb" in out and "wandb: Run history" in out
    assert "`srun` command is available" in out  # the fake srun was seen: the quiet run's check means something
    assert "record:" in out


def test_verbose_is_recorded_in_the_config(runs):
    folder, _ = runs["verbose"]
    assert load_record(folder)["config"]["verbose"] is True
    assert load_record(runs["quiet"][0])["config"]["verbose"] is False


@pytest.mark.parametrize(("verbose", "env", "expected"), [
    (False, {}, {"silent": True}),
    (True, {}, {}),
    (False, {"WANDB_SILENT": "false"}, {}),  # the user's own switch wins, whatever its value
    (False, {"WANDB_QUIET": "true"}, {}),
    (False, {"WANDB_SILENT": ""}, {"silent": True}),  # empty counts as unset
])
def test_wandb_settings_respect_the_users_environment(monkeypatch, verbose, env, expected):
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    monkeypatch.delenv("WANDB_QUIET", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert wandb_settings(verbose) == expected


@pytest.fixture
def restore_console():
    import pytorch_lightning  # noqa: F401

    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning_fabric", "kdexp")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():  # restores the warning filters
        yield
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


def test_configure_console_switches_lightning_and_the_leafspec_warning(restore_console):
    from lightning_fabric.utilities.warnings import PossibleUserWarning

    message = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
    assert re.match(LEAFSPEC_WARNING, message)
    for verbose in (False, True, False):  # idempotent, both ways (a multirun's jobs share a process)
        configure_console(verbose)
        assert logging.getLogger("pytorch_lightning.utilities.rank_zero").isEnabledFor(logging.INFO) is verbose
        assert logging.getLogger("kdexp.teachers.provision").isEnabledFor(logging.DEBUG) is verbose
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn(message, FutureWarning)
            warnings.warn(SRUN_HINT, PossibleUserWarning)
        assert len(caught) == 2 * int(verbose)


def test_the_joblib_settings_line_shows_only_when_verbose():
    line = logging.LogRecord("hydra_plugins.hydra_joblib_launcher._core", logging.INFO, __file__, 1,
                             "Joblib.Parallel(%s) is launching %d jobs", ("n_jobs=2,backend=loky", 2), None)
    sweep_line = logging.LogRecord("hydra_plugins.hydra_joblib_launcher._core", logging.INFO, __file__, 1,
                                   "Launching jobs, sweep output dir : %s", ("sd",), None)
    assert not LauncherLineFilter(verbose=False).filter(line) and LauncherLineFilter(verbose=True).filter(line)
    assert LauncherLineFilter(verbose=False).filter(sweep_line)  # Hydra's lines about the runs stay


def test_console_format_is_short_and_flags_warnings():
    formatter = ConsoleFormatter()
    info = logging.LogRecord("kdexp", logging.INFO, __file__, 1, "Training %s", ("x",), None)
    warning = logging.LogRecord("kdexp", logging.WARNING, __file__, 1, "careful", (), None)
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] Training x", formatter.format(info))
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] WARNING: careful", formatter.format(warning))
