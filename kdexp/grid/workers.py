"""The pack workers a ``kdexp sweep FILE --pack N`` starts: ``python -m kdexp.grid.workers QUEUE``.

The sweep writes one JSON file per pack into a queue folder (:func:`write_queue`) and starts
``--jobs`` workers (forked, where the sweep can fork, with the packs' configs composed ahead);
each takes pack after pack (:func:`take`: exactly one worker wins a pack) and trains it with
:func:`kdexp.grid.members.run_pack`. A pack that fails is recorded in its members' records and the
worker goes on; SIGTERM (the sweep stopping) records its members as interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kdexp.core.console import ConsoleFormatter, configure_console
from kdexp.core.errors import KdexpError, RunInterrupted
from kdexp.core.files import atomic_write_text
from kdexp.core.tracking import import_wandb
from kdexp.grid.compose import job_configs, pack_jobs
from kdexp.grid.members import run_pack

log = logging.getLogger("kdexp")


def import_for_workers(wandb: bool) -> None:
    """Import what every pack worker would otherwise import for itself, once, in the sweep that forks
    them: ``torch._dynamo`` (building a torch optimiser imports it: 1.3 s) and, when runs log to W&B,
    wandb (0.7 s). The sweep does it while its helper composes the grid (:mod:`kdexp.grid.compose`)."""
    import torch._dynamo  # noqa: F401

    if wandb:
        import_wandb()


PACK_GLOB = "pack-*.json"


def write_queue(queue: Path, packs: list[dict[str, Any]]) -> list[Path]:
    """One JSON file per pack (``sweep_dir``, ``jobs``: each member's overrides, ``if_finished``,
    ``hydra_overrides``), taken by workers in name order."""
    return [atomic_write_text(queue / f"pack-{i:04d}.json", json.dumps(pack, indent=1), what="pack")
            for i, pack in enumerate(packs)]


def take(path: Path) -> bool:
    """Claim a queued pack for this worker (exactly one worker wins)."""
    try:
        os.close(os.open(path.with_suffix(".taken"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def work(queue: Path, composed: dict[str, list[DictConfig]] | None = None) -> int:
    """Take packs from ``queue`` until none is left; a pack that fails is recorded in its members'
    records and the worker goes on to the next one.

    ``composed``: the members' Hydra configs (:func:`load_sweep_jobs`) by pack file name, composed
    ahead by the sweep that forked this worker; a pack not in it is composed here.
    """
    handler = logging.StreamHandler(sys.stderr)  # the same short lines a multirun job prints
    handler.setFormatter(ConsoleFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)  # force: a forked worker
    configure_console(False, lightning=False)  # packs train without Lightning
    signal.signal(signal.SIGTERM, _interrupt)  # the sweep stops its workers with SIGTERM: record "interrupted"
    exit_code = 0
    for path in sorted(queue.glob(PACK_GLOB)):
        if not take(path):
            continue
        spec = json.loads(path.read_text())
        ahead = (composed or {}).get(path.name)
        jobs = pack_jobs(ahead) if ahead is not None else \
            job_configs(Path(spec["sweep_dir"]), spec["jobs"], spec.get("hydra_overrides"))
        configure_console(bool(jobs[0].task.get("verbose", False)) if jobs else False, lightning=False)
        log.info("Training a pack of %d students: %s", len(jobs), ", ".join(j.output_dir.name for j in jobs))
        try:
            run_pack(jobs, spec.get("if_finished", "skip"))
        except (KeyboardInterrupt, RunInterrupted):
            log.error("kdexp: interrupted: the pack's members are recorded as interrupted")
            return 130
        except KdexpError as err:
            log.error("kdexp: this pack failed (its members' records say why): %s: %s", type(err).__name__, err)
            exit_code = 1
        except Exception:
            log.exception("kdexp: this pack failed (its members' records say why); the sweep goes on")
            exit_code = 1
    return exit_code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m kdexp.grid.workers QUEUE_DIR  (started by kdexp sweep --pack)", file=sys.stderr)
        return 2
    return work(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
