"""Run one experiment: ``python -m kdexp.train [overrides]`` (or ``kdexp train``).

    python -m kdexp.train data=mnist1d student=mlp student.width=128 \\
        kd=hinton kd.temperature=4 kd.alpha=0.9 seed=1

Reads top to bottom: protect a finished output folder, open the run record,
run the experiment, close W&B, print where everything landed. ``--help`` and
``--cfg job`` show the composed config as Hydra does.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import kdexp  # noqa: F401  (registers the config resolvers)
from kdexp.errors import KdexpError
from kdexp.pipeline import base_record, check_output_dir, recorded, run_experiment, with_runtime
from kdexp.records import RECORD_NAME, RunRecorder

log = logging.getLogger("kdexp")
# An absolute path, so the console scripts find conf/ from any working directory.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run(cfg: DictConfig) -> dict:
    """Run the experiment ``cfg`` describes and return its record (raises on failure)."""
    cfg = with_runtime(cfg)
    output_dir = Path(cfg.paths.output_dir)
    previous = check_output_dir(output_dir, cfg.if_finished)
    if previous is not None:
        log.info("Skipping %s: it already holds a finished run.", output_dir)
        return previous
    with recorded(RunRecorder(output_dir, base_record(cfg))) as recorder:
        run_experiment(cfg, recorder)
    record = recorder.record
    metrics = record["metrics"]
    log.info(
        "%s finished: test/acc %.4f (last epoch %.4f), teacher %.4f, agreement %s | record: %s",
        record["run_name"], metrics["test/acc"], metrics["test/acc_last"], metrics["teacher/test_acc"],
        f"{metrics['test/agreement']:.4f}" if "test/agreement" in metrics else "n/a",
        output_dir / RECORD_NAME,
    )
    return record


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        record = run(cfg)
    except KdexpError as err:
        # A problem the user can fix: say it plainly, without a traceback.
        log.error("kdexp: %s: %s", type(err).__name__, err)
        if _in_multirun():
            return None  # the record keeps the failure; the other jobs of the sweep go on
        sys.exit(2)
    except Exception:
        if not _in_multirun():
            raise
        # One broken run must not stop a grid: its record says failed, with the error.
        log.exception("kdexp: this run failed; the sweep goes on")
        return None
    return float(record.get("metrics", {}).get("test/acc", float("nan")))


if __name__ == "__main__":
    main()
