"""What a run prints on the console, decided in one place.

By default a run prints what a researcher reads: what is being trained, a progress
bar on a terminal, the result line, and warnings. Lightning's info lines ("GPU
available", "TPU available", the litlogger tip, "`Trainer.fit` stopped", "Restoring
states from the checkpoint", the model summary), W&B's banners and run-history
sparklines, Lightning's ``LeafSpec`` deprecation warning, its "`srun` is available but not
used" hint on SLURM machines, the joblib launcher's ``Joblib.Parallel(...)`` line and submitit's
"Bypassing sacct error" warnings stay off the console.

``verbose=true`` brings all of it back, plus kdexp's own details (logged at DEBUG).
W&B's own switches work as usual: a user who sets ``WANDB_SILENT`` or ``WANDB_QUIET``
gets exactly what W&B does with that value, and ``WANDB_CONSOLE`` is never touched.
No environment variable is set or changed here.

Idempotent and per process: a multirun that runs many jobs in one process calls
:func:`configure_console` once per job, and each job gets its own setting.
"""

from __future__ import annotations

import logging
import os
import warnings

# Lightning's info lines come from children of these loggers (rank_zero_info logs to
# pytorch_lightning.utilities.rank_zero, the model summary to pytorch_lightning.callbacks.
# model_summary); each package sets its top logger to INFO when it is imported.
LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning_fabric")
# W&B's own verbosity switches: set by the user (to any value), W&B's verbosity is theirs.
WANDB_VERBOSITY_ENV = ("WANDB_SILENT", "WANDB_QUIET")
# torch deprecates LeafSpec, and Lightning 2.6 still builds one on every fit and test
# (pytorch_lightning/utilities/_pytree.py): noise from Lightning's code, not from a run's.
LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
# On any machine with `srun` on PATH (a SLURM login node) Lightning warns on every Trainer that
# srun is not used (lightning_fabric/plugins/environments/slurm.py): a hint about how the command
# was started, whatever it does. kdexp's SLURM route is `kdexp sweep --launcher slurm` (submitit).
SRUN_HINT_WARNING = r"The `srun` command is available on your system but is not used"
# Where hydra-joblib-launcher logs its lines (the Joblib.Parallel repr among them).
JOBLIB_LAUNCHER_LOGGER = "hydra_plugins.hydra_joblib_launcher"
# submitit warns "Call #N - Bypassing sacct error ..., status may be inaccurate." on every poll of a cluster
# without accounting (sacct fails there); kdexp's SLURM launcher watches squeue, so the warning says nothing.
SUBMITIT_LOGGER, SACCT_WARNING = "submitit", "Bypassing sacct error"


class ConsoleFormatter(logging.Formatter):
    """``[16:55:30] message`` on the console, with the level for warnings and errors.

    Hydra's console handler uses it (``conf/hydra/default.yaml``); the run's log file
    keeps Hydra's full format (date, logger name, level).
    """

    def __init__(self) -> None:
        super().__init__("[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
        self._flagged = logging.Formatter("[%(asctime)s] %(levelname)s: %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return self._flagged.format(record) if record.levelno >= logging.WARNING else super().format(record)


class LauncherLineFilter(logging.Filter):
    """Drop the joblib launcher's ``Joblib.Parallel(n_jobs=2,backend=loky,...) is launching N jobs``
    line from the console unless ``verbose``: it describes joblib's settings, not the runs. Hydra's
    own lines of a multirun (the sweep folder, ``#0 : kd=hinton ...``) stay.

    It is attached to the console handler of the launching process (``conf/hydra/default.yaml``,
    ``hydra_logging``), which logs before any job, so :func:`configure_console` is too late there.
    """

    def __init__(self, verbose: bool = False) -> None:
        super().__init__()
        self.verbose = bool(verbose)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.verbose or not (record.name.startswith(JOBLIB_LAUNCHER_LOGGER)
                                    and record.getMessage().startswith("Joblib.Parallel("))


_verbose: bool | None = None  # the verbosity the last configure_console chose (None: not called)


def configure_console(verbose: bool, lightning: bool = True) -> None:
    """Quiet Lightning and its warning (``verbose=False``), or let everything through (``True``).

    Call it at the start of a run. Importing Lightning sets its loggers back to INFO, so this
    imports it first (``lightning=False``: not, for a process that may never need it, such as
    a packed sweep's worker; :mod:`kdexp.run.fit` applies the choice when it imports Lightning).
    """
    global _verbose
    _verbose = verbose
    if lightning:
        import pytorch_lightning  # noqa: F401  (sets its loggers' levels at import: do that first)
    quiet_lightning()
    # kdexp logs its details at DEBUG; quiet, the "kdexp" logger inherits the root's level.
    logging.getLogger("kdexp").setLevel(logging.DEBUG if verbose else logging.NOTSET)
    # The newest filter wins, and filterwarnings drops an identical older one first.
    warnings.filterwarnings("default" if verbose else "ignore", message=LEAFSPEC_WARNING, category=FutureWarning)
    # By message only: its category (PossibleUserWarning) lives in Lightning, which a pack worker never imports.
    warnings.filterwarnings("default" if verbose else "ignore", message=SRUN_HINT_WARNING)


class SacctWarningFilter(logging.Filter):
    """Drop submitit's sacct warning (:data:`SACCT_WARNING`) unless ``verbose``."""

    def __init__(self, verbose: bool = False) -> None:
        super().__init__()
        self.verbose = bool(verbose)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.verbose or SACCT_WARNING not in record.getMessage()


def quiet_submitit(verbose: bool) -> None:
    """Keep submitit's sacct warnings off the console (``verbose=True``: let them through). On its logger,
    not a handler: submitit prints through handlers of its own as well as the root's."""
    logger = logging.getLogger(SUBMITIT_LOGGER)
    for old in [f for f in logger.filters if isinstance(f, SacctWarningFilter)]:
        logger.removeFilter(old)
    logger.addFilter(SacctWarningFilter(verbose))


def quiet_lightning() -> None:
    """Set Lightning's loggers to the chosen verbosity (again, after importing Lightning resets them);
    nothing when no run has chosen one (a library call keeps Lightning's own levels)."""
    if _verbose is None:
        return
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if _verbose else logging.WARNING)


def wandb_user_chose_verbosity() -> bool:
    """The user set ``WANDB_SILENT`` or ``WANDB_QUIET`` (an empty value counts as unset)."""
    return any(os.environ.get(name) for name in WANDB_VERBOSITY_ENV)


def wandb_settings(verbose: bool) -> dict[str, bool]:
    """Keyword arguments for ``wandb.Settings``: ``silent`` unless ``verbose`` or the user chose.

    ``silent`` is W&B's only setting that drops its offline banners ("syncing is set to
    offline", "Run data is saved locally") as well as the run-history sparklines
    (``quiet`` keeps the banners). W&B still writes everything to the run's debug logs.
    """
    if verbose or wandb_user_chose_verbosity():
        return {}
    return {"silent": True}
