"""SLURM for ``kdexp sweep --launcher slurm``: hydra-submitit-launcher's SLURM launcher, watched.

:class:`WatchedSlurmLauncher` (``conf/hydra/launcher/slurm.yaml``) submits the grid as one job array,
as the plugin does, and then follows the array in ``squeue`` instead of waiting blind:

- a job that stays pending for a reason that never clears by itself (``PartitionConfig``,
  ``ReqNodeNotAvail``, an invalid account...) is reported with the reason and the
  ``hydra.launcher.<key>=...`` override that fixes it, and the whole array is cancelled;
- a submission that ``sbatch`` refuses (an unknown partition, more memory than any node has) is
  explained the same way instead of ending in a traceback;
- Ctrl-C, SIGTERM (what ``kdexp sweep`` sends its multirun when it is stopped) and the death of
  ``kdexp sweep`` cancel every job of the array: nothing of a stopped sweep stays queued or running;
- inside each job, a pre-emption or time-limit warning (SIGUSR2, ``signal_delay_s`` before the limit)
  stops the run after its batch with ``last.ckpt`` saved and requeues the job, which resumes the run
  (same folder, same W&B run) until it is done (:func:`requeued_when_stopped`).

It waits on ``squeue`` and the jobs' result files, never on ``sacct``: with accounting off (a small
cluster) every ``sacct`` call fails, and submitit would print a warning for each of its polls.
Those warnings (should some other path poll) stay off the console unless ``verbose=true``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

from kdexp.core.console import quiet_submitit
from kdexp.run.preemption import clear_stop, request_stop, stop_requested

log = logging.getLogger(__name__)

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130  # as kdexp.train's: a problem the user can fix / stopped
STUCK_AFTER_S = 5.0     # a never-clearing pending reason seen this long (two polls at least) is reported
POLL_S = (2.0, 10.0)    # squeue every 2 s at first, then every 10 s at most (the controller's load)
# Pending reasons that will not clear while the job waits (squeue's %r; ReqNodeNotAvail carries a
# suffix). Priority, Resources, Dependency, BeginTime, JobArrayTaskLimit and the group limits
# (AssocGrp*, QOSGrp*) clear as other jobs finish: those are waited out.
STUCK_REASONS = {
    "PartitionConfig": "the job asks for more than a node of its partition has (CPUs, memory, GPUs) "
                       "or than the partition allows",
    "PartitionNodeLimit": "the job asks for more nodes than its partition allows",
    "PartitionTimeLimit": "the job's time limit is above its partition's",
    "ReqNodeNotAvail": "the nodes the job needs are down, drained or reserved",
    "PartitionDown": "its partition is down",
    "PartitionInactive": "its partition is inactive",
    "InvalidAccount": "its account does not exist or is not yours",
    "InvalidQOS": "its QOS does not exist or is not allowed to you",
    "BadConstraints": "no node has the features its constraint asks for",
    "DependencyNeverSatisfied": "it depends on a job that failed",
    "JobHeldAdmin": "an administrator holds it (or it failed to launch and was held)",
    "JobHeldUser": "it is held (scontrol hold)",
}
PER_JOB_LIMIT = re.compile(r"^(QOS|Assoc)Max(\w+?)PerJob(Limit)?$")  # e.g. QOSMaxCpuPerJobLimit: never clears
ENDED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}
# Ends after which SLURM (or submitit, on pre-emption) may requeue the same job: final only once they last.
REQUEUE_STATES, REQUEUE_GRACE_S = {"PREEMPTED", "NODE_FAIL", "BOOT_FAIL"}, 60.0


# -- what the jobs ask for, what the cluster has ---------------------------------------------
def counted(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("s" if n != 1 else "")


@dataclass(frozen=True)
class Request:
    """What each job of the array asks of SLURM (the launcher's settings)."""

    partition: str | None = None
    cpus_per_task: int = 1
    tasks_per_node: int = 1
    nodes: int = 1
    mem_gb: float | None = None
    gpus_per_node: int | None = None
    timeout_min: int | None = None

    @classmethod
    def of(cls, params: dict[str, Any]) -> Request:
        return cls(partition=params.get("partition"), cpus_per_task=int(params.get("cpus_per_task") or 1),
                   tasks_per_node=int(params.get("tasks_per_node") or 1), nodes=int(params.get("nodes") or 1),
                   mem_gb=params.get("mem_gb"), gpus_per_node=params.get("gpus_per_node"),
                   timeout_min=params.get("timeout_min"))

    def describe(self) -> str:
        parts = [counted(self.cpus_per_task * self.tasks_per_node, "CPU")]
        if self.mem_gb:
            parts.append(f"{self.mem_gb:g} GB")
        if self.gpus_per_node:
            parts.append(counted(self.gpus_per_node, "GPU"))
        if self.nodes > 1:
            parts.append(f"on each of {self.nodes} nodes")
        if self.timeout_min:
            parts.append(f"for {self.timeout_min} min")
        return ", ".join(parts)


@dataclass
class Partition:
    """One partition as ``sinfo`` lists it: its largest node, how many nodes, its time limit."""

    name: str
    default: bool = False
    up: bool = True
    cpus: int = 0          # the most CPUs of one node
    mem_mb: int = 0        # the most memory of one node
    gpus: int = 0          # the most GPUs of one node
    nodes: int = 0
    usable_nodes: int = 0  # up: idle, mixed or allocated (not down, drained or failing)
    max_time_min: int | None = None  # None: no limit

    def describe(self) -> str:
        text = f"{counted(self.cpus, 'CPU')}, {self.mem_mb / 1024:.1f} GB"
        return text + (f", {counted(self.gpus, 'GPU')}" if self.gpus else "")


def run_slurm(command: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """A SLURM client command; its failure (no such command, controller down) is a failed process, not a crash."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as err:
        return subprocess.CompletedProcess(command, 1, "", str(err))


def minutes(limit: str) -> int | None:
    """``sinfo``'s time limit (``infinite``, ``30:00``, ``2:00:00``, ``1-00:00:00``) in minutes."""
    if limit in ("infinite", "UNLIMITED", "n/a", ""):
        return None
    days, _, rest = limit.rpartition("-")
    fields = [int(x) for x in rest.split(":")]
    hours, mins, secs = ([0] * (3 - len(fields)) + fields) if len(fields) > 1 else (0, fields[0], 0)
    return (int(days or 0) * 24 + hours) * 60 + mins + math.ceil(secs / 60)


def gpus_in(gres: str) -> int:
    """GPUs in a node's generic resources (``gpu:4``, ``gpu:a100:4(S:0-1)``, ``(null)``)."""
    return sum(int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))


def partitions() -> dict[str, Partition]:
    """Every partition of the cluster, one ``sinfo`` call (one line per node and partition)."""
    proc = run_slurm(["sinfo", "-h", "-N", "-o", "%P|%a|%c|%m|%G|%l|%t"])
    found: dict[str, Partition] = {}
    for line in proc.stdout.splitlines():
        fields = line.split("|")
        if len(fields) != 7:
            continue
        name, avail, cpus, mem, gres, limit, state = fields
        part = found.setdefault(name.rstrip("*"), Partition(name.rstrip("*"), default=name.endswith("*"),
                                                             up=avail == "up", max_time_min=minutes(limit)))
        part.cpus = max(part.cpus, int(re.sub(r"\D", "", cpus) or 0))
        part.mem_mb = max(part.mem_mb, int(re.sub(r"\D", "", mem) or 0))
        part.gpus = max(part.gpus, gpus_in(gres))
        part.nodes += 1
        part.usable_nodes += state.rstrip("*~#!%$@^-") in ("idle", "mix", "alloc", "comp", "resv", "plnd")
    return found


def partition_of(request: Request, parts: dict[str, Partition]) -> Partition | None:
    """The partition the jobs go to: the one asked for, or the cluster's default."""
    if request.partition:
        return parts.get(request.partition)
    return next((p for p in parts.values() if p.default), None)


def resource_fixes(request: Request, part: Partition) -> list[str]:
    """The ``hydra.launcher.*`` overrides that make each job fit one node of ``part``."""
    fixes = []
    if part.cpus and request.cpus_per_task * request.tasks_per_node > part.cpus:
        fixes.append(f"hydra.launcher.cpus_per_task={max(1, part.cpus // request.tasks_per_node)}")
    if part.mem_mb and request.mem_gb and request.mem_gb * 1024 > part.mem_mb:
        fixes.append(f"hydra.launcher.mem_gb={max(1, part.mem_mb // 1024)}")
    if request.gpus_per_node and request.gpus_per_node > part.gpus:
        fixes.append(f"hydra.launcher.gpus_per_node={part.gpus or 'null'}")
    if part.nodes and request.nodes > part.nodes:
        fixes.append(f"hydra.launcher.nodes={part.nodes}")
    if part.max_time_min is not None and request.timeout_min and request.timeout_min > part.max_time_min:
        fixes.append(f"hydra.launcher.timeout_min={part.max_time_min}")
    return fixes


def other_partitions(request: Request, parts: dict[str, Partition], current: str | None) -> list[str]:
    """Up partitions with usable nodes where each job fits, as ``hydra.launcher.partition=`` overrides."""
    return [f"hydra.launcher.partition={p.name}" for p in parts.values()
            if p.name != current and p.up and p.usable_nodes and not resource_fixes(request, p)]


@dataclass
class Diagnosis:
    """Why SLURM will not run the jobs, and the overrides that fix it (``any_of``: each one alone does)."""

    why: str
    fixes: list[str]
    any_of: bool = False


def diagnose(problem: str, request: Request, parts: dict[str, Partition]) -> Diagnosis:
    """``problem``: a pending reason (``PartitionConfig``) or sbatch's error text."""
    part = partition_of(request, parts)
    here = part.name if part else None
    reason = problem.split(",")[0].strip()  # "ReqNodeNotAvail, UnavailableNodes:vm" → ReqNodeNotAvail
    text = problem.lower()
    sizes = f"; each job asks {request.describe()}, the largest node of partition '{part.name}' has " \
            f"{part.describe()}" if part else ""
    per_job = PER_JOB_LIMIT.match(reason)
    if per_job:
        key = {"cpu": "cpus_per_task", "mem": "mem_gb", "memory": "mem_gb", "node": "nodes",
               "gres": "gpus_per_node", "wallduration": "timeout_min"}.get(per_job.group(2).lower(), "<that resource>")
        return Diagnosis(f"each job asks more {per_job.group(2)} than its {per_job.group(1)} allows one job "
                         f"(each asks {request.describe()})", [f"hydra.launcher.{key}=<less>"])
    if reason in ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit") or any(
            s in text for s in ("node configuration is not available", "memory specification", "cpu count",
                                "node count", "time limit")):
        why = STUCK_REASONS.get(reason, "the jobs ask for more than the partition's nodes have or it allows") + sizes
        fixes = resource_fixes(request, part) if part else []
        return Diagnosis(why, fixes) if fixes else Diagnosis(why, other_partitions(request, parts, here), True)
    if reason.startswith("ReqNodeNotAvail") or reason in ("PartitionDown", "PartitionInactive"):
        return Diagnosis(STUCK_REASONS[reason], other_partitions(request, parts, here), True)
    if "invalid partition" in text:  # sbatch: invalid partition specified: <name>
        known = ", ".join(f"'{p.name}'" for p in parts.values()) or "none"
        return Diagnosis(f"the cluster has no partition '{request.partition}' (it has {known})",
                         other_partitions(request, parts, None), True)
    if "account" in text:
        return Diagnosis(STUCK_REASONS["InvalidAccount"],
                         ["hydra.launcher.account=<yours: sacctmgr show assoc user=$USER>"])
    if "qos" in text:
        return Diagnosis(STUCK_REASONS["InvalidQOS"], ["hydra.launcher.qos=<yours: sacctmgr show assoc user=$USER>"])
    if "gres" in text or "generic resource" in text:
        fixes = (resource_fixes(request, part) if part else []) or ["hydra.launcher.gpus_per_node=null"]
        return Diagnosis(f"no node of partition '{here}' has the GPUs (generic resources) the jobs ask for{sizes}",
                         fixes)
    if "feature" in text or reason == "BadConstraints":
        return Diagnosis(STUCK_REASONS["BadConstraints"], ["hydra.launcher.constraint=null"])
    return Diagnosis(STUCK_REASONS.get(reason, "SLURM gives no more detail"), [])


def problem_message(headline: str, problem: str, request: Request, parts: dict[str, Partition] | None = None) -> str:
    """One paragraph: what happened (``headline``), why SLURM says ``problem``, and the override that fixes it."""
    found = diagnose(problem, request, partitions() if parts is None else parts)
    lines = [headline, f"  Why: {found.why}."]
    if not found.fixes:
        lines.append("  No launcher setting fixes this: `sinfo` and `scontrol show job <id>` say more; the cluster's "
                     "admins can fix it.")
    else:
        lines.append(("  Fix: add one of  " if found.any_of and len(found.fixes) > 1 else "  Fix: add  ")
                     + "  ".join(found.fixes))
        lines.append("  to the command (or change the default in conf/hydra/launcher/slurm.yaml).")
    return "\n".join(lines)


def is_stuck(reason: str) -> bool:
    """A pending reason that will not clear while the job waits."""
    return reason.split(",")[0].strip() in STUCK_REASONS or PER_JOB_LIMIT.match(reason) is not None


# -- the queue ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Queued:
    """One array task as ``squeue`` shows it."""

    job_id: str  # 12_0
    state: str   # PENDING, RUNNING, COMPLETED, CANCELLED...
    reason: str  # why it pends (None when it does not)
    node: str    # where it runs (empty while it pends)


def queue(array_ids: Sequence[str]) -> dict[str, Queued] | None:
    """The tasks of the arrays ``array_ids`` still known to the controller (one line each, every
    state); None when ``squeue`` did not answer (the controller is busy: ask again)."""
    proc = run_slurm(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(array_ids), "-o", "%i|%T|%r|%N"])
    if proc.returncode != 0:
        return {} if "invalid job id" in proc.stderr.lower() else None  # all purged: they ended long ago
    rows = (line.split("|") for line in proc.stdout.splitlines())
    return {row[0]: Queued(*row) for row in rows if len(row) == 4}


def cancel(array_ids: Sequence[str], wait_s: float = 45.0) -> bool:
    """``scancel`` the arrays, then wait (up to ``wait_s``) until none of their tasks pends, runs or is
    still being killed (SLURM's KillWait); False when some still are after ``wait_s``."""
    run_slurm(["scancel", *array_ids])
    deadline = time.time() + wait_s
    while time.time() < deadline:
        jobs = queue(array_ids)
        if jobs is not None and all(j.state in ENDED_STATES for j in jobs.values()):
            return True
        time.sleep(0.5)
    return False


def cancelled_line(array_ids: Sequence[str], done: bool) -> str:
    ids = ",".join(array_ids)
    return (f"Cancelled SLURM job {ids} (scancel): no job of this sweep is queued or running." if done else
            f"Cancelled SLURM job {ids} (scancel); some of its jobs are still being stopped: squeue -j {ids}")


@contextmanager
def signals_held() -> Iterator[list[int]]:
    """Ctrl-C and SIGTERM while ``sbatch`` submits are held back and listed (the caller cancels what was
    submitted): a stop that lands between the submission and the first job id would leave the array queued."""
    got: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: got.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def sigterm_stops() -> Iterator[None]:
    """SIGTERM (what ``kdexp sweep`` sends when it is stopped, or when it dies) raises KeyboardInterrupt, as Ctrl-C."""
    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


REQUEUE_REASON = "SLURM's pre-emption or time-limit warning (SIGUSR2)"


@contextmanager
def requeued_when_stopped() -> Iterator[None]:
    """Inside a SLURM job, around kdexp's task: a pre-emption or time-limit warning stops the run
    gracefully and then requeues the job, which resumes the run from ``last.ckpt``.

    submitit's own handler (SIGUSR2: checkpoint the job's call and ``scontrol requeue``) would requeue
    at once, killing the fit mid-batch with its record left ``running``. Here the signal only asks the
    run to stop (:func:`kdexp.run.preemption.request_stop`); the fit ends after its batch, writes
    ``last.ckpt`` and marks the record ``interrupted``; kdexp's task then exits (code 130) and only
    then is submitit's handler called, to requeue. SIGTERM (``scancel``: the user stops the job) goes
    back to its default, so that Lightning and kdexp handle it as a stop: the record says ``interrupted``.
    """
    usr_sig = signal.SIGUSR2
    submitits = signal.getsignal(usr_sig)
    previous_term = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(usr_sig, lambda signum, frame: request_stop(REQUEUE_REASON))
    try:
        yield
    except SystemExit as stop:
        if stop.code == EXIT_INTERRUPTED and stop_requested() and callable(submitits):
            log.warning("kdexp: the run stopped on %s; requeuing the job, it resumes from checkpoints/last.ckpt",
                        REQUEUE_REASON)
            submitits(usr_sig, None)  # checkpoint this call and requeue the job; it exits the process
        raise
    finally:
        clear_stop()
        signal.signal(usr_sig, submitits)
        signal.signal(signal.SIGTERM, previous_term)


# -- the launcher ------------------------------------------------------------------------------------
class WatchedSlurmLauncher(SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher that watches its job array (see the module's docstring)."""

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        """One job of the array, run inside SLURM: pre-emption and time limits end in a requeue and a resume."""
        with requeued_when_stopped():
            return super().__call__(*args, **kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit  # as the plugin does: Hydra's plugin discovery stays fast

        assert self.config is not None and job_overrides
        quiet_submitit(bool(self.config.get("verbose", False)))
        request = Request.of(self.params)
        executor = self._executor(submitit)
        log.info(f"Submitit 'slurm' sweep output dir : {self.config.hydra.sweep.dir}")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        job_params = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))

        with signals_held() as stops:
            try:
                jobs = executor.map_array(self, *zip(*job_params))
            except submitit.core.utils.FailedJobError as err:  # sbatch refused the array
                said = [line.removeprefix("sbatch: error: ") for line in str(err).splitlines()
                        if line.startswith("sbatch: error:")] or [str(err).strip()]
                log.error(problem_message(f"SLURM refused the jobs, nothing was submitted: {'; '.join(said)}",
                                          "; ".join(said), request))
                sys.exit(EXIT_USAGE)
        arrays = sorted({job.job_id.split("_")[0] for job in jobs})
        log.info("Submitted SLURM job %s: %d run(s), each asking %s", ",".join(arrays), len(jobs), request.describe())
        try:
            if stops:
                raise KeyboardInterrupt
            with sigterm_stops():
                ended = self._watch(jobs, arrays, request)
        except KeyboardInterrupt:
            log.warning("Stopped: cancelling SLURM job %s ...", ",".join(arrays))
            log.warning(cancelled_line(arrays, cancel(arrays)) + " Run the same command again to go on "
                        "(finished runs are skipped, interrupted ones resume).")
            sys.exit(EXIT_INTERRUPTED)
        return [self._result(job, overrides, ended.get(job.job_id, "ended"))
                for job, overrides in zip(jobs, job_overrides)]

    def _executor(self, submitit: Any) -> Any:
        """The submitit executor the plugin builds from the launcher's settings (as in its ``launch``)."""
        params = dict(self.params)
        executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                         slurm_max_num_timeout=params.pop("max_num_timeout"))
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in params.items()})
        return executor

    def _watch(self, jobs: Sequence[Any], arrays: list[str], request: Request) -> dict[str, str]:
        """Wait until every task has ended; their last states. A task pending for a reason that never
        clears is reported, the arrays cancelled, and the process exits (code 2)."""
        started, stuck_since, last, ended_since = time.time(), {}, {}, {}
        wanted = {job.job_id for job in jobs}
        while True:
            found = queue(arrays)
            if found is not None:
                for job_id, q in found.items():
                    if job_id in wanted and q.state != last.get(job_id) and q.state != "PENDING":
                        where = f" on {q.node}" if q.node and q.state == "RUNNING" else ""
                        log.info("SLURM job %s %s%s", job_id, q.state.lower(), where)
                    last[job_id] = q.state
                    if q.state in REQUEUE_STATES:
                        ended_since.setdefault(job_id, time.time())
                    else:
                        ended_since.pop(job_id, None)
                live = {job_id: q for job_id, q in found.items() if job_id in wanted and (
                    q.state not in ENDED_STATES or time.time() - ended_since.get(job_id, 0.0) < REQUEUE_GRACE_S)}
                if not live and (found or time.time() - started > 30):  # nothing pends or runs any more
                    return last
                for job_id, q in live.items():
                    if q.state == "PENDING" and is_stuck(q.reason):
                        first = stuck_since.setdefault(job_id, time.time())
                        if time.time() - first >= STUCK_AFTER_S:
                            self._give_up(job_id, q.reason, arrays, request)
                    else:
                        stuck_since.pop(job_id, None)
            time.sleep(min(POLL_S[1], POLL_S[0] + (time.time() - started) / 10))

    def _give_up(self, job_id: str, reason: str, arrays: list[str], request: Request) -> None:
        done = cancel(arrays)
        log.error(problem_message(f"SLURM job {job_id} cannot start: it stays pending with reason {reason}.",
                                  reason, request) + "\n  " + cancelled_line(arrays, done))
        sys.exit(EXIT_USAGE)

    def _result(self, job: Any, overrides: Sequence[str], state: str) -> JobReturn:
        """The job's return (read from its result file; submitit's ``results()`` would poll sacct without one)."""
        deadline = time.time() + 30.0  # a shared file system may show the file a little after the job ended
        while not job.paths.result_pickle.exists() and state == "COMPLETED" and time.time() < deadline:
            time.sleep(0.5)
        if job.paths.result_pickle.exists():
            try:
                return job.results()[0]
            except Exception as err:  # raised in the job around kdexp's task, which records its own failures
                said = (str(err).strip().splitlines() or [type(err).__name__])[-1]
                log.error("SLURM job %s failed: %s (its log: %s)", job.job_id, said, job.paths.stderr)
        else:
            log.error("SLURM job %s ended %s without a result (killed, out of time or memory?): its run's record "
                      "says how far it got; its log: %s", job.job_id, state, job.paths.stderr)
        # Completed *to Hydra*, with no value: Hydra would end the multirun with a traceback for a failed
        # return, before the other jobs' results; kdexp sweep counts this run from its record anyway.
        return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=None)
