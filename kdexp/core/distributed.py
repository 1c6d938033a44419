"""One run over several processes (``trainer=ddp`` / ``trainer=ddp_cpu``): who owns the run, and the
trainer settings that start other processes. Plain Python: no torch, no Lightning.

With ``trainer.strategy=ddp``, Lightning starts the other ranks when rank 0 first calls ``fit``: it runs
the same command again, once per rank, with ``LOCAL_RANK`` set. By then rank 0 has claimed the run folder,
opened the record and the W&B run, and provisioned the teacher and its outputs, each in one process. It
leaves ``$KDEXP_DDP_RUN`` (the folder, and the checkpoint the run resumes from) for the ranks it starts: a
process that finds it with a rank above 0 *joins* that run. It loads the cached teacher and outputs, trains
and evaluates its share, and writes nothing of its own: no record, no ``.hydra/``, no log file, no W&B run
(Lightning writes checkpoints from rank 0 only).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

DDP_RUN_ENV = "KDEXP_DDP_RUN"
# Lightning strategies that start the other ranks by running the command line again (a subprocess each).
SUBPROCESS_STRATEGIES = ("ddp", "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true")
# Lightning strategies that train in processes started with multiprocessing: refused (see ddp_launch_problem).
SPAWNING_STRATEGIES = ("ddp_spawn", "ddp_fork", "ddp_notebook")
# Trainer settings that only matter with several processes: a one-process trainer drops them.
_MULTI_PROCESS_KEYS = ("strategy", "num_nodes", "sync_batchnorm", "use_distributed_sampler")


@dataclass(frozen=True)
class JoinedRun:
    """The run a rank above 0 joins: rank 0's folder, and the ``last.ckpt`` it resumed from (or None)."""

    folder: str
    resume_from: str | None
    rank: int


def local_rank() -> int:
    """This process's rank on its node, as Lightning's launcher sets it (0 when none is set)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def joined_run() -> JoinedRun | None:
    """The run this process joins as a rank above 0; None for rank 0 and for every single-process run."""
    raw = os.environ.get(DDP_RUN_ENV)
    rank = local_rank()
    if not raw or rank == 0:
        return None
    shared = json.loads(raw)
    return JoinedRun(str(shared["folder"]), shared.get("resume_from"), rank)


def started_by_another_launcher() -> bool:
    """Whether this process is one of several that another launcher started (torchrun's ``WORLD_SIZE``,
    srun's ``SLURM_NTASKS``, mpirun's ``OMPI_COMM_WORLD_SIZE`` above 1), not a rank Lightning started."""
    if os.environ.get(DDP_RUN_ENV):
        return False
    for name in ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        try:
            if int(os.environ.get(name, "1")) > 1:
                return True
        except ValueError:
            continue
    return False


def joining_environment(folder: str, resume_from: str | None) -> dict[str, str]:
    """What rank 0 leaves in its environment for the ranks Lightning starts from it."""
    return {DDP_RUN_ENV: json.dumps({"folder": str(folder), "resume_from": resume_from})}


def _devices_count(devices: Any) -> int | None:
    """How many devices ``trainer.devices`` asks for; None where only the machine can tell (-1, "auto")."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            return len([d for d in text.split(",") if d.strip()])
        if text.lstrip("-").isdigit():
            devices = int(text)
        else:
            return None
    if isinstance(devices, int) and not isinstance(devices, bool):
        return None if devices < 0 else devices
    return None


def runs_several_processes(trainer_cfg: Any) -> bool:
    """Whether ``trainer_cfg`` (the ``trainer`` node, or a dict of it) trains in more than one process:
    several devices (``-1`` and ``auto`` count as several: only the machine can tell) or nodes."""
    count = _devices_count(trainer_cfg.get("devices", 1))
    return count is None or count > 1 or int(trainer_cfg.get("num_nodes") or 1) > 1


def spawns_rank_processes(trainer_cfg: Any) -> bool:
    """Whether ``trainer_cfg`` starts its other ranks by running the command line again: strategy ``ddp``
    (or ``auto``, which Lightning makes ``ddp`` on several devices) in more than one process."""
    strategy = str(trainer_cfg.get("strategy") or "auto")
    return (strategy in SUBPROCESS_STRATEGIES or strategy == "auto") and runs_several_processes(trainer_cfg)


def one_process_trainer(trainer_cfg: dict[str, Any]) -> dict[str, Any]:
    """``trainer_cfg`` (plain) for one process on one device: what a DDP run trains its teacher and chain
    stages with, in rank 0 before the other ranks exist. A one-process config is returned as it is, so the
    teacher of a ``trainer=ddp_cpu`` run is the one a ``trainer=cpu`` run with the same settings trains
    (and caches under the same key)."""
    if not runs_several_processes(trainer_cfg):
        return dict(trainer_cfg)
    single = {k: v for k, v in trainer_cfg.items() if k not in _MULTI_PROCESS_KEYS}
    single["devices"] = 1
    return single


def ddp_launch_problem(trainer_cfg: Any, *, in_sweep: bool, from_command_line: bool) -> str | None:
    """Why a run of ``trainer_cfg`` cannot start its DDP ranks where it runs, or None when it can.

    Lightning's ``ddp`` starts each other rank by running this process's command line again: in a sweep
    (a Hydra multirun, ``kdexp sweep``, ``--pack`` or not) that would re-run the whole sweep once per rank,
    and from Python (``kdexp.train_run``, a notebook) it would run the caller's script. The
    multiprocessing strategies (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``) train in processes that hand
    back only part of the trainer's state (a ``ddp_spawn`` run reports 0 epochs trained), so a run cannot
    be tested and recorded after them: they are refused everywhere.
    """
    strategy = str(trainer_cfg.get("strategy") or "auto")
    if runs_several_processes(trainer_cfg) and started_by_another_launcher():
        return ("this process is one of several that torchrun, srun (several tasks) or mpirun started. kdexp runs "
                "DDP from one process, started as `kdexp train trainer=ddp ...`: Lightning starts the other ranks and "
                "they join its run (one folder, record and teacher). Ranks started by another launcher are not "
                "supported.")
    if runs_several_processes(trainer_cfg) and strategy.startswith(SPAWNING_STRATEGIES):
        return (f"trainer.strategy={strategy} is not supported: Lightning trains in processes it starts itself and "
                "hands back only part of the trainer's state, so the run could not be tested and recorded. Use "
                "trainer.strategy=ddp (trainer=ddp on GPUs, trainer=ddp_cpu on CPU processes), one run per command.")
    if not spawns_rank_processes(trainer_cfg):
        return None
    if in_sweep:
        return (f"trainer.strategy={strategy} (trainer=ddp, trainer=ddp_cpu) cannot run inside a sweep: Lightning "
                "starts each other rank by running the command line again, which would re-run the whole sweep once "
                "per rank. Run each DDP run as a command of its own (`kdexp train trainer=ddp ...` or `python -m "
                "kdexp.train trainer=ddp ...`), or sweep with one process per run (trainer=cpu / trainer=gpu).")
    if not from_command_line:
        return (f"trainer.strategy={strategy} starts each other rank by running the command line again, so it runs "
                "from the command line only: `kdexp train trainer=ddp ...` or `python -m kdexp.train trainer=ddp ...`.")
    return None
