"""``kdexp predict``: run a teacher once over a data set and save its outputs to a file.

The saved-predictions workflow of the BERT → DistilBERT recipe: the teacher's
outputs on every split are computed once, then any number of student runs read them
with ``teacher.predictions=PATH`` instead of running the teacher. The file records
what it was computed from (teacher weights hash, data fingerprint and input
settings, tapped layers), so a run with another teacher or data set refuses it.

    kdexp predict --out outputs/predictions/mnist1d-cnn1d.pt
    kdexp train teacher.predictions=outputs/predictions/mnist1d-cnn1d.pt kd.temperature=8

The same overrides as ``kdexp train`` choose the teacher and data (``teacher=...``,
``teacher.checkpoint=...``, ``data=...``); ``kd=...`` matters only for objectives
that tap teacher layers (``kd=fitnets``): their features are saved too.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from kdexp.core.config import compose_run, instantiate, objective_node
from kdexp.core.console import configure_console
from kdexp.core.errors import ConfigError
from kdexp.run.engine import ensure_stages
from kdexp.run.seeding import apply_num_threads
from kdexp.run.teacher import get_teachers
from kdexp.run.validation import validate_config
from kdexp.teachers.outputs import compute_store, save_store
from kdexp.teachers.source import CACHE_MAX_MB, outputs_megabytes, teacher_output_identity

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kdexp predict",
        description="Run the configured teacher once over train/val/test and save its outputs (logits, tapped "
                    "features, ensemble members) for student runs to read with teacher.predictions=PATH.",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for `kdexp train` (teacher=..., data=...)")
    p.add_argument("--out", type=Path, required=True, help="file to write, e.g. outputs/predictions/teacher.pt")
    p.add_argument("--force", action="store_true", help="replace an existing file (otherwise it is never overwritten)")
    p.add_argument("--topk", type=int, default=None,
                   help="keep each position's K largest logits and the log-sum-exp of the rest (language models)")
    return p


def main(argv: list[str]) -> int:

    args = parser().parse_intermixed_args(argv)
    configure_console(verbose=False)
    out = args.out.resolve()
    if out.exists() and not args.force:
        raise ConfigError(f"{out} already exists and is never overwritten; choose another --out or pass --force.")
    cfg = compose_run(args.overrides, out.parent)
    validate_config(cfg)
    apply_num_threads(cfg.get("num_threads"))
    datamodule = instantiate(cfg.data, what="data")
    datamodule.setup()
    if datamodule.train_augmentation() is not None:
        log.warning("data augments its training inputs at random; these predictions are on un-augmented inputs, "
                    "and student runs with this data will refuse them.")
    if args.topk is not None and args.topk < 1:
        raise ConfigError(f"--topk must be >= 1, got {args.topk}.")
    megabytes = outputs_megabytes(datamodule, int(cfg.data.num_classes), args.topk)
    if megabytes > CACHE_MAX_MB and not args.force:
        raise ConfigError(f"the teacher's outputs on this data would take {megabytes:.0f} MB (over {CACHE_MAX_MB} MB): "
                          "a language model's logits at every position. Pass --topk 8 to keep each position's 8 "
                          "largest logits and the rest's total, or --force to write them all anyway.")
    ensure_stages(cfg)  # a chain's assistants, trained as runs when they have not finished
    teacher, members = get_teachers(cfg, datamodule)
    objective = instantiate(objective_node(cfg), what="kd")
    identity = {**teacher_output_identity(cfg, teacher, datamodule.fingerprint(), len(members),
                                          list(objective.teacher_features)), "topk": args.topk}
    store = compute_store(teacher.model, datamodule.eval_batches, identity)
    save_store(out, store, "teacher predictions file")
    rows = ", ".join(f"{name} {len(s.logits)}" for name, s in store.splits.items())
    size_mb = out.stat().st_size / 2**20
    positions = sum(s.logits.shape[0] * (s.logits[0].numel() // s.logits.shape[-1]) for s in store.splits.values())
    print(f"Wrote {out} ({size_mb:.2f} MB, {out.stat().st_size / positions:.1f} bytes per position): teacher {teacher.weights_hash} (test acc {100 * teacher.test_acc:.2f} %), "
          f"data {identity['data_fingerprint']}, rows {rows}, layers {identity['teacher_layers'] or 'none'}, "
          f"in {store.manifest['seconds']:.2f} s.\nUse it with: kdexp train teacher.predictions={out} "
          + " ".join(args.overrides))
    return 0
