"""A stop asked for from outside the training loop: a scheduler's warning that the job is about to be
pre-empted or to reach its time limit (SLURM sends SIGUSR2 through submitit).

The signal handler only raises a flag (:func:`request_stop`); the fit sees it after the current batch
and stops the way it stops on SIGTERM (``last.ckpt`` written, the record ``interrupted``), so whoever
asked can requeue the job and the run resumes from that checkpoint. A flag, not a call into the
trainer, because the handler is installed by the launcher (``kdexp.grid.slurm``), which knows no trainer.
"""

from __future__ import annotations

_reason: str | None = None


def request_stop(reason: str) -> None:
    """Ask the running fit (or the run about to fit) to stop after its current batch; ``reason`` is told."""
    global _reason
    _reason = reason


def stop_requested() -> str | None:
    """Why a stop was asked for, or None."""
    return _reason


def clear_stop() -> None:
    global _reason
    _reason = None
