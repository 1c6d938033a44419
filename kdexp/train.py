"""Run one experiment: ``python -m kdexp.train [overrides]`` (or ``kdexp train``).

    python -m kdexp.train data=mnist1d student=mlp student.width=128 \\
        kd=hinton kd.temperature=4 kd.alpha=0.9 seed=1

Reads top to bottom: quiet the console (``verbose=true`` keeps Lightning's and
W&B's own output), check the config, claim the output folder (one writer; a
finished run is never touched, a killed one is resumed), open the run record,
run the experiment, close W&B, print where everything landed. ``--help`` and
``--cfg job`` show the composed config as Hydra does.

Exit codes: 0 finished (or skipped), 2 a problem the user can fix (bad config value,
busy or finished folder, bad checkpoint, NaN loss; Hydra's own override errors too),
130 interrupted (Ctrl-C, SIGTERM: run the same command to resume), 1 a crash.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

import kdexp  # noqa: F401  (registers the config resolvers)
from kdexp.core.config import CONF_DIR, to_plain
from kdexp.core.console import configure_console
from kdexp.core.errors import ConfigError, KdexpError, RunInterrupted
from kdexp.core.files import atomic_write_text
from kdexp.core.records import RECORD_NAME, RunRecorder, read_record
from kdexp.run_folder import claim_run_folder, lock_folder
from kdexp.sweep import left_to_packs
from kdexp.core.vocabulary import TEACHER_TEST_ACC, TEST_ACC, TEST_ACC_LAST

log = logging.getLogger("kdexp")
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130
_task_started = False  # Hydra exits 1 both for its own config errors and for crashes; this tells them apart


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@contextmanager
def log_file_held_back(output_dir: Path) -> Iterator[None]:
    """Keep Hydra's log file for this run closed until the run owns its folder.

    Hydra attaches ``<run dir>/train.log`` before the task starts. A refused run must
    not append to a finished run's log, and an archived run's log must move whole, so
    the handler is detached here and re-attached (opening a fresh file) only once the
    folder is claimed. On refusal the message goes to the console alone.
    """
    root = logging.getLogger()
    held = [h for h in root.handlers if isinstance(h, logging.FileHandler)
            and Path(h.baseFilename).resolve().is_relative_to(output_dir.resolve())]
    for handler in held:
        root.removeHandler(handler)
        handler.close()
    yield  # on an exception the handlers stay detached: a refusal never writes into the folder
    for handler in held:
        root.addHandler(handler)  # FileHandler(delay=True) reopens the file on the next message


def write_hydra_files(output_dir: Path, cfg: DictConfig) -> None:
    """``.hydra/{config,hydra,overrides}.yaml`` as Hydra writes them, once the folder is ours."""
    from hydra.core.hydra_config import HydraConfig

    folder = output_dir / ".hydra"
    atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg), what="Hydra config")
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        atomic_write_text(folder / "hydra.yaml", OmegaConf.to_yaml({"hydra": hydra_cfg}), what="Hydra config")
        atomic_write_text(folder / "overrides.yaml", OmegaConf.to_yaml(list(hydra_cfg.overrides.task)),
                          what="Hydra config")


def record_rejected_config(output_dir: Path, cfg: DictConfig, err: ConfigError) -> None:
    """Leave a ``failed`` record for a config rejected before it started, in a fresh folder only.

    A folder that holds anything of an earlier run (finished, resumable, or busy) is
    left exactly as it is: a bad value on the command line must not cost a result.
    """
    if output_dir.exists() and any(output_dir.iterdir()):
        return
    try:
        lock = lock_folder(output_dir)
    except KdexpError:
        return
    from kdexp.pipeline import base_record

    try:
        RunRecorder(output_dir, base_record(cfg)).finish("failed", err)
    finally:
        lock.release()


class AnnouncingRecorder(RunRecorder):
    """The run's recorder; it also says on the console what is being trained, once the run has a name.

    The name (``distill-mlp128-hinton-T4-a0.9-s1``) is known only inside the experiment,
    after the teacher is ready and the objective is built; it reaches the record here.
    """

    _announced = False

    def update(self, **fields: Any) -> None:
        super().update(**fields)
        if "run_name" in fields and not self._announced:
            self._announced = True
            resumed = " (resumed)" if self.record.get("resumed") else ""
            log.info("Training %s%s → %s", fields["run_name"], resumed, self.folder)


def run(cfg: DictConfig) -> dict:
    """Run the experiment ``cfg`` describes and return its record (raises on failure)."""
    # Imported here, not at the top: the process that launches a parallel multirun
    # (hydra/launcher=joblib) runs no job itself and never needs torch or Lightning.
    from kdexp.pipeline import base_record, recorded, run_experiment, with_runtime
    from kdexp.validation import validate_config

    configure_console(bool(cfg.get("verbose", False)))  # first: the teacher may be trained (and print) below
    task_cfg, cfg = cfg, with_runtime(cfg)
    output_dir = Path(cfg.paths.output_dir)
    if left_to_packs(list(cfg.get("overrides") or [])):  # kdexp sweep --pack trained this point: hands off,
        return read_record(output_dir) or {}               # not even a log line in its folder
    with log_file_held_back(output_dir):
        try:
            validate_config(cfg)
        except ConfigError as err:
            record_rejected_config(output_dir, cfg, err)
            raise
        claim = claim_run_folder(output_dir, to_plain(cfg), str(cfg.if_finished), bool(cfg.resume))
        if claim.action == "skip":  # said while the log file is held back: a finished folder is never written
            claim.release()
            log.info("Skipping %s: it already holds a finished run.", output_dir)
            return claim.previous
    try:
        write_hydra_files(output_dir, task_cfg)
        resumes = claim.previous if claim.action == "resume" else None
        with recorded(AnnouncingRecorder(output_dir, base_record(cfg), resumes=resumes)) as recorder:
            run_experiment(cfg, recorder, resume_from=claim.checkpoint)
    finally:
        claim.release()
    announce_finished(recorder.record, output_dir)
    return recorder.record


def announce_finished(record: dict[str, Any], output_dir: Path) -> None:
    """The result line of a finished run: its test accuracies, the teacher's, and where the record is."""
    metrics = record["metrics"]
    wandb_url = (record.get("wandb") or {}).get("url")  # online runs only
    log.info(
        "%s finished: test/acc %.4f (last epoch %.4f), teacher %.4f, agreement %s | record: %s%s",
        record["run_name"], metrics[TEST_ACC], metrics[TEST_ACC_LAST], metrics[TEACHER_TEST_ACC],
        f"{metrics['test/agreement']:.4f}" if "test/agreement" in metrics else "n/a",
        output_dir / RECORD_NAME, f" | W&B: {wandb_url}" if wandb_url else "",
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    global _task_started
    _task_started = True
    try:
        record = run(cfg)
    except (RunInterrupted, KeyboardInterrupt) as err:
        # Stop the whole multirun too: an interrupt means "stop", not "skip this run".
        log.error("kdexp: interrupted: %s", err or "Ctrl-C")
        sys.exit(EXIT_INTERRUPTED)
    except KdexpError as err:
        # A problem the user can fix: say it plainly, without a traceback.
        log.error("kdexp: %s: %s", type(err).__name__, err)
        if _in_multirun():
            return None  # the record keeps the failure; the other jobs of the sweep go on
        sys.exit(EXIT_USAGE)
    except Exception:
        if not _in_multirun():
            raise
        # One broken run must not stop a grid: its record says failed, with the error.
        log.exception("kdexp: this run failed; the sweep goes on")
        return None
    return float(record.get("metrics", {}).get(TEST_ACC, float("nan")))


def prepare_output_dirs(argv: list[str]) -> None:
    """Create a ``hydra.run.dir`` / ``hydra.sweep.dir`` given on the command line, or explain why not.

    Hydra creates the folder itself before any kdexp code runs, and an unwritable
    place would end in its raw PermissionError traceback.
    """
    from kdexp.core.files import storage_error

    for arg in argv:
        key, _, value = arg.partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and value and "${" not in value:
            try:
                Path(value).mkdir(parents=True, exist_ok=True)
            except OSError as err:
                print(f"kdexp: StorageError: {storage_error(err, value, 'run folder')}", file=sys.stderr)
                sys.exit(EXIT_USAGE)


def main() -> None:
    """Console entry: Hydra's config errors (unknown key, bad override) exit 2 like kdexp's own."""
    prepare_output_dirs(sys.argv[1:])
    try:
        hydra_main()
    except SystemExit as stop:
        if stop.code == 1 and not _task_started:
            sys.exit(EXIT_USAGE)
        raise


def entry() -> None:
    """The ``kdexp-train`` command and ``python -m kdexp.train``: :func:`main`, then a prompt exit
    (:mod:`kdexp.core.processes`); a multirun's main process ends this way too."""
    from kdexp.core.processes import run_then_exit

    run_then_exit(main)


if __name__ == "__main__":
    entry()
