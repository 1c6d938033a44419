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

import hydra
from omegaconf import DictConfig

from kdexp.core.agent import agent_overrides
from kdexp.core.config import CONF_DIR
from kdexp.core.console import configure_console
from kdexp.core.distributed import JoinedRun, ddp_launch_problem, joined_run
from kdexp.core.errors import ConfigError, KdexpError, RunInterrupted
from kdexp.core.files import storage_error
from kdexp.core.processes import run_then_exit
from kdexp.core.vocabulary import TEST_ACC

log = logging.getLogger("kdexp")
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130
_task_started = False  # Hydra exits 1 both for its own config errors and for crashes; this tells them apart
_from_command_line = False  # set by the Hydra entry point: only a command line can start DDP ranks again


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
    held = detach_log_files(output_dir)
    yield  # on an exception the handlers stay detached: a refusal never writes into the folder
    for handler in held:
        logging.getLogger().addHandler(handler)  # FileHandler(delay=True) reopens the file on the next message


def detach_log_files(output_dir: Path) -> list[logging.FileHandler]:
    """Detach (and close) the root logger's file handlers that write into ``output_dir``; returns them."""
    root = logging.getLogger()
    held = [h for h in root.handlers if isinstance(h, logging.FileHandler)
            and Path(h.baseFilename).resolve().is_relative_to(output_dir.resolve())]
    for handler in held:
        root.removeHandler(handler)
        handler.close()
    return held


def run(cfg: DictConfig) -> dict:
    """Run the experiment ``cfg`` describes and return its record (raises on failure)."""
    # Imported here, not at the top: the process that launches a parallel multirun
    # (hydra/launcher=joblib) runs no job itself and never needs torch.
    from kdexp.run.engine import run_experiment
    from kdexp.run.lifecycle import run_in_folder, with_runtime

    configure_console(bool(cfg.get("verbose", False)))  # first: the teacher may be trained (and print) below
    task_cfg, cfg = cfg, with_runtime(cfg)
    output_dir = Path(cfg.paths.output_dir)
    joined = joined_run()
    if joined is not None:
        return join_run(cfg, output_dir, joined)
    with log_file_held_back(output_dir):  # a refusal writes nothing into the folder (it may hold a finished run)
        problem = ddp_launch_problem(cfg.trainer, in_sweep=_in_multirun(), from_command_line=_from_command_line)
        if problem:
            raise ConfigError(problem)
    return run_in_folder(cfg, output_dir, lambda recorder, last: run_experiment(cfg, recorder, resume_from=last),
                         task_cfg=task_cfg, if_finished=str(cfg.if_finished), resume=bool(cfg.resume),
                         held=lambda: log_file_held_back(output_dir))


class RankPrefix(logging.Filter):
    """Start each console line of a DDP rank above 0 with ``[rank N]``: its lines mix with rank 0's."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.prefix = f"[rank {rank}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and not record.msg.startswith(self.prefix):
            record.msg = self.prefix + record.msg
        return True


def join_run(cfg: DictConfig, output_dir: Path, joined: JoinedRun) -> dict:
    """A DDP rank above 0 (see :mod:`kdexp.core.distributed`): train and evaluate its share of rank 0's run
    in ``output_dir``, writing nothing there. Returns the record it kept in memory (never written)."""
    # Imported here, as in run(): the engine imports torch, which `import kdexp.train` must not.
    from kdexp.core.records import RunRecorder
    from kdexp.run.engine import run_experiment
    from kdexp.run.lifecycle import base_record

    if output_dir.resolve() != Path(joined.folder).resolve():
        raise KdexpError(f"DDP rank {joined.rank} was started for the run in {joined.folder}, but its config names "
                         f"{output_dir}; please report this with the command line.")
    detach_log_files(output_dir)  # rank 0 writes the run's train.log
    if not cfg.get("verbose", False):  # rank 0 says what the run does; this rank speaks up for problems only
        logging.getLogger("kdexp").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RankPrefix(joined.rank))
    recorder = RunRecorder(output_dir, base_record(cfg), written=False)
    run_experiment(cfg, recorder, resume_from=Path(joined.resume_from) if joined.resume_from else None)
    return recorder.record


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    global _task_started, _from_command_line
    _task_started = True
    _from_command_line = True
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

    for arg in argv:
        key, _, value = arg.partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and value and "${" not in value:
            try:
                Path(value).mkdir(parents=True, exist_ok=True)
            except OSError as err:
                print(f"kdexp: StorageError: {storage_error(err, value, 'run folder')}", file=sys.stderr)
                sys.exit(EXIT_USAGE)


def main() -> None:
    """Console entry: Hydra's config errors (unknown key, bad override) exit 2 like kdexp's own.

    Under ``wandb agent`` the agent's parameters are rewritten as ``kdexp sweep`` writes them
    (:func:`kdexp.core.agent.agent_overrides`), so a point's folder and overrides are the same."""
    sys.argv[1:] = agent_overrides(sys.argv[1:])
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

    run_then_exit(main)


if __name__ == "__main__":
    entry()
