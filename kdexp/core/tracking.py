"""Experiment loggers: W&B (online or offline, decided before ``wandb.init``), CSV, none.

Every factory here is called with the same keyword arguments (``save_dir``,
``run_name``, ``job_type``, ``group``, ``config``) so ``conf/logger/*.yaml`` can
select one by ``_target_`` with ``_partial_: true``.
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from kdexp.core.console import wandb_settings
from kdexp.core.errors import ConfigError
from kdexp.core.vocabulary import DATA_FINGERPRINT, TEACHER_HASH

if TYPE_CHECKING:  # Lightning (and torch) load only when a logger is built, so `kdexp report` starts fast
    from pytorch_lightning.loggers import Logger

log = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled")
WANDB_SERVICE_ENV = "WANDB_SERVICE"  # where W&B tells child processes how to reach its service
WANDB_INIT_TIMEOUT_S = 30  # how long an online start may take before the run goes offline (W&B's default: 90)
# What a student run adds to its W&B config beside the resolved Hydra config. The
# report's W&B source pops exactly these back out to rebuild a run record.
RUN_CONFIG_EXTRAS = ("job_type", TEACHER_HASH, "teacher_test_acc", DATA_FINGERPRINT, "student_parameters",
                     "output_dir", "objective", "teacher_outputs", "stage", "lineage", "slurm")


def wandb_group(group: str | None, choices: Mapping[str, Any]) -> str:
    """The W&B group a run logs into: its ``group`` setting, else ``<data>-<teacher>`` (the options it composed).

    Runs and the dashboards that filter them (``kdexp dashboard``) both take it from here, so a
    dashboard's filter is the group its runs log."""
    return str(group) if group else f"{choices.get('data', 'data')}-{choices.get('teacher', 'teacher')}"


def wandb_run_config(config: dict[str, Any], **extras: Any) -> dict[str, Any]:
    """``config`` plus the :data:`RUN_CONFIG_EXTRAS` a student run logs to W&B."""
    unknown = set(extras) - set(RUN_CONFIG_EXTRAS)
    if unknown:
        raise ValueError(f"not in RUN_CONFIG_EXTRAS (add them there, so reports read them back): {sorted(unknown)}")
    return {**config, **extras}


def has_wandb_credentials() -> bool:
    """An API key in the environment or in ~/.netrc for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_server_reachable(timeout_s: float = 2.0) -> bool:
    """A TCP connection to the W&B server opens within ``timeout_s``.

    Checked before ``wandb.init`` because, with a key but no route to the server,
    init blocks ~90 s before it fails.
    """
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "api.wandb.ai", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def resolve_wandb_mode(requested: str = "auto") -> tuple[str, str]:
    """The mode to start W&B in, and why.

    ``WANDB_MODE`` in the environment wins; otherwise an explicit ``requested``
    mode; otherwise online only with credentials. Online, from any source, also
    needs the server to answer within 2 s: W&B trouble never stalls a run, it
    logs offline (``wandb sync`` uploads it later).
    """
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode:
        mode = {"dryrun": "offline", "run": "online"}.get(env_mode, env_mode)
        reason = f"WANDB_MODE={env_mode} in the environment"
    elif requested != "auto":
        if requested not in WANDB_MODES:

            raise ConfigError(f"logger.mode must be auto, {', '.join(WANDB_MODES)}; got '{requested}'.")
        mode, reason = requested, f"logger.mode={requested}"
    elif not has_wandb_credentials():
        return "offline", "no W&B credentials (run `wandb login` to log online)"
    else:
        mode, reason = "online", "W&B credentials found"
    if mode == "online" and not wandb_server_reachable():
        log.warning("W&B: %s asks for online logging, but the server (%s) does not answer: logging offline; "
                    "upload later with `wandb sync`.", reason, os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
        return "offline", f"{reason}, but the server is unreachable"
    return mode, reason + (" and the server is reachable" if mode == "online" else "")


_announced_modes: set[tuple[str, str]] = set()


def announce_wandb_mode(mode: str, reason: str) -> None:
    """Say the W&B mode and why, once per process (a teacher's run and a sweep's later runs repeat it at DEBUG)."""
    if (mode, reason) in _announced_modes:
        log.debug("W&B mode: %s (%s)", mode, reason)
        return
    _announced_modes.add((mode, reason))
    log.info("W&B mode: %s (%s)", mode, reason)


def wandb_logger(
    save_dir: str | Path,
    run_name: str,
    job_type: str,
    group: str | None = None,
    config: dict[str, Any] | None = None,
    project: str = "kdexp",
    entity: str | None = None,
    mode: str = "auto",
    tags: list[str] | None = None,
    log_model: bool = False,
    run_id: str | None = None,
    verbose: bool = False,
    lightning: bool = True,
) -> Logger | WandbRun:
    """A Lightning ``WandbLogger`` whose run lives under ``save_dir/wandb``.

    ``run_id``: continue that run (a resumed kdexp run logs into its own W&B run,
    not a second one). ``verbose``: let W&B print its banners and run history
    (see :mod:`kdexp.core.console`; ``WANDB_SILENT`` / ``WANDB_QUIET`` set by the user win).
    ``lightning=False``: the same run as a :class:`WandbRun`, without importing Lightning
    (a packed student's run, replayed after its pack has trained).
    """
    import wandb

    resolved, reason = resolve_wandb_mode(mode)
    announce_wandb_mode(resolved, reason)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    console_settings = wandb_settings(verbose)

    def make(mode_now: str) -> Logger | WandbRun:
        init = {"name": run_name, "project": project, "entity": entity, "group": group, "job_type": job_type,
                "tags": list(tags or []), "config": config or {}, "mode": mode_now,
                "settings": wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S, **console_settings)}
        if not lightning:
            return WandbRun(dir=str(save_dir), id=run_id, resume="allow", **init)
        from pytorch_lightning.loggers import WandbLogger

        logger = WandbLogger(save_dir=str(save_dir), log_model=log_model, **init,
                             **({"id": run_id, "resume": "allow"} if run_id else {}))
        # Lightning 2.6 always passes anonymous=None ("not set") to wandb.init, which W&B 0.31 answers
        # with a deprecation warning, printed before any setting applies; left out, it means the same.
        init_kwargs = getattr(logger, "_wandb_init", {})
        if "anonymous" in init_kwargs and init_kwargs["anonymous"] is None:
            del init_kwargs["anonymous"]
        logger.experiment  # start the run now, so a failure to start is handled here, not mid-fit  # noqa: B018
        return logger

    own_wandb_service()
    if resolved != "online":
        return make(resolved)
    try:
        return make("online")
    except Exception as err:  # a rejected key, a server error, a timeout: never the end of the run
        log.warning("W&B could not start an online run (%s: %s): logging this run offline instead; upload it "
                    "later with `wandb sync`.", type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        finish_wandb(exit_code=1)
        return make("offline")


def own_wandb_service() -> None:
    """Let this process's W&B runs live in a W&B service of its own, not one inherited from a parent.

    W&B hands its service to child processes through ``WANDB_SERVICE`` (a notebook, a launcher or a
    test that logged a run itself, then started kdexp). A run killed with SIGKILL never tells that
    shared service it ended, so the service keeps the run id "in use" as long as the parent lives,
    and the resumed run is refused. A private service dies with the process that started it.
    """
    token = os.environ.get(WANDB_SERVICE_ENV, "")
    parts = token.split("-")  # W&B's token: "<version>-<pid of the process that started it>-<transport>-..."
    if not token or (len(parts) > 1 and parts[1] == str(os.getpid())):
        return
    del os.environ[WANDB_SERVICE_ENV]
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is None:
        wandb.teardown()  # drops a connection to the inherited service (never stops it: this process does not own it)


class WandbRun:
    """A W&B run started and logged as Lightning's ``WandbLogger`` starts and logs one (the same
    ``wandb.init`` arguments; every metric stepped by ``trainer/global_step``), without Lightning.

    Packed students' runs are written through it after their pack has trained, by a process
    that never imports Lightning (4 s); a test checks their runs against single runs'.
    """

    def __init__(self, **init: Any) -> None:
        import wandb

        self.experiment = wandb.init(**init)
        self.experiment.define_metric("trainer/global_step")
        self.experiment.define_metric("*", step_metric="trainer/global_step", step_sync=True)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.experiment.log(dict(metrics) if step is None else {**metrics, "trainer/global_step": step})

    def save(self) -> None:
        """Nothing to do: W&B writes each logged row itself (as for ``WandbLogger``)."""


def csv_logger(save_dir: str | Path, run_name: str, **_: Any) -> Logger:
    """Metrics to ``save_dir/csv/metrics.csv``, for people without W&B."""
    from pytorch_lightning.loggers import CSVLogger

    return CSVLogger(save_dir=str(save_dir), name="csv", version="")


@contextmanager
def packages_listed_once() -> Iterator[None]:
    """Within the block, W&B runs list the installed packages (their ``requirements.txt``) from one
    listing instead of each making its own.

    ``wandb.init`` lists them by parsing every installed package's metadata: 0.2 s, nine tenths
    of starting an offline run. A pack writes its members' runs one after another in one process,
    where the list cannot change. W&B looks ``wandb.util.working_set`` up at each run's start;
    it is restored after the block (and left alone if W&B no longer has it).
    """
    util = getattr(sys.modules.get("wandb"), "util", None)
    original = getattr(util, "working_set", None)
    if original is None:
        yield
        return
    listed = list(original())
    util.working_set = lambda: iter(listed)
    try:
        yield
    finally:
        util.working_set = original


def wandb_run_info(logger: Logger | WandbRun | None) -> dict[str, Any] | None:
    """Id, mode and folder of the W&B run behind ``logger`` (None for other loggers)."""
    wandb = sys.modules.get("wandb")  # not imported: no W&B run exists
    if logger is None or wandb is None:
        return None
    run = getattr(logger, "experiment", None)
    if not isinstance(run, wandb.sdk.wandb_run.Run):
        return None
    return {
        "id": getattr(run, "id", None),
        "name": getattr(run, "name", None),
        "project": getattr(run, "project", None),
        "mode": getattr(getattr(run, "settings", None), "mode", None),
        "dir": str(Path(run.dir).parent) if getattr(run, "dir", None) else None,
        # An offline run has no URL (reading it prints a W&B warning).
        "url": None if getattr(run, "offline", False) else getattr(run, "url", None),
    }


def finish_wandb(exit_code: int = 0) -> None:
    """Close the current W&B run, so the next job of a multirun starts its own."""
    wandb = sys.modules.get("wandb")  # not imported: no run was started (importing it costs ~0.5 s)
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)


def logs_to_wandb(cfg: Any) -> bool:
    """Whether runs of ``cfg`` log through kdexp's W&B logger."""
    return bool(cfg.get("logger")) and str(cfg.logger.get("_target_", "")).endswith("wandb_logger")


def import_wandb() -> None:
    """Import what a process's first W&B run imports (wandb, and its launch inputs: 0.7–2 s). A sweep
    does it before it forks its pack workers, so that it is done once, not once per worker."""
    try:
        import wandb  # noqa: F401
        import wandb.sdk.launch.inputs.internal  # noqa: F401 - wandb.init imports it for every first run
    except Exception:  # noqa: BLE001 - the members' own wandb.init imports it, and reports what fails
        log.debug("W&B could not be imported ahead", exc_info=True)


def start_wandb_service() -> None:
    """Start W&B's service process (run in a thread while a pack trains): a process's first W&B run
    otherwise waits seconds for it, after training, before the members' runs can be replayed."""
    try:
        import wandb

        wandb.setup()
    except Exception:  # noqa: BLE001 - the members' own wandb.init then starts it, and reports what fails
        log.debug("W&B's service did not start early", exc_info=True)
