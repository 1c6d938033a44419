"""``kdexp bench``: what a distillation step and a run cost, measured side by side.

In one process, on the same data, teacher and student, it times training epochs of

    (i)   a CE-only student in kdexp (Lightning loop, the run's own trainer config)
    (ii)  online KD in kdexp (the teacher runs on every batch)
    (iii) cached KD in kdexp (teacher outputs read from the shared cache)
    (iv)  a bare PyTorch loop doing (iii)'s math: gather, forward, loss, backward, Adam
    (v)   the same bare loop for CE only

as medians over interleaved repeats (so drifting machine load hits every variant
alike), and prints (ii)/(i), (iii)/(i), (iii)/(iv) and (i)/(v). An epoch here is the
training batches only (the validation pass and checkpoint writes after it are not
in the window), which is what the bare loops do too.

``--outputs K`` times where a run's teacher outputs come from, for the configured data and
objective (language models included): the teacher online, the full cached logits and a
top-K cache, with the disk bytes per position of each file.

``--pack 1 2 4 8 16`` times the packed engine (:mod:`kdexp.grid.pack`, N students in one
packed step) against the same students trained one at a time by kdexp: students trained per
second of training epochs, at each pack size.

``--pack-sweep 2 4 8 16`` times whole ``kdexp sweep`` processes of ``sweeps/hinton_grid.yaml`` at
each width, one by one and with ``--pack N`` on the same ``--jobs``, and compares every packed
run's numbers with its unpacked run's.

``--runs`` adds whole-run figures: ``kdexp train`` started as a fresh process (W&B
offline), wall time from process start to exit, and the parts its record states
(``timings_s``). ``--sweep`` adds a whole-sweep figure: a 12-run T × α grid of KD
runs against 12 CE-only runs plus one teacher training, in one multirun each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdexp.core.config import compose_run, instantiate, objective_node
from kdexp.core.console import configure_console
from kdexp.data.batches import IndexBatches
from kdexp.grid.pack import StudentPack, train_epoch
from kdexp.objectives import CrossEntropyOnly, HintonKD
from kdexp.run.engine import ensure_stages
from kdexp.run.seeding import apply_num_threads, seed_everything
from kdexp.run.teacher import get_teacher
from kdexp.teachers.outputs import compute_store, read_store, save_store
from kdexp.teachers.source import get_teacher_outputs, teacher_output_identity

HINTON = {"temperature": 4.0, "alpha": 0.9}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdexp bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("overrides", nargs="*", help="Hydra overrides for data/teacher/student (default: MNIST-1D, "
                                                "CNN1D teacher, MLP student)")
    p.add_argument("--widths", type=int, nargs="+", default=[128, 512], help="student widths (default 128 512)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats per variant (default 5)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per repeat; the first is warm-up (default 4)")
    p.add_argument("--runs", type=int, default=0, help="also time N whole `kdexp train` processes per width")
    p.add_argument("--sweep", action="store_true", help="also time a 12-run T x alpha grid vs 12 CE-only runs")
    p.add_argument("--outputs", type=int, default=None, metavar="K",
                   help="also time online vs full-cache vs top-K-cache epochs of the configured kd objective, "
                        "with bytes per position (e.g. --outputs 8 experiment=stdlib_lm data.max_train_bytes=200000)")
    p.add_argument("--pack", type=int, nargs="+", default=None, metavar="N",
                   help="also time packed training (N Hinton students in one packed step) for these pack sizes "
                        "against one-at-a-time kdexp epochs (e.g. --pack 1 2 4 8 16)")
    p.add_argument("--pack-sweep", type=int, nargs="+", default=None, metavar="N",
                   help="time whole `kdexp sweep` runs of hinton_grid at each width, one by one and with --pack N "
                        "(e.g. 2 4 8 16), and compare their numbers")
    p.add_argument("--seeds", type=int, default=4, help="--pack-sweep: seeds per grid (4 T x alpha points each)")
    p.add_argument("--jobs", type=int, default=2, help="--pack-sweep: the sweeps' --jobs (default 2)")
    p.add_argument("--sweep-epochs", type=int, default=None, help="--pack-sweep: trainer.max_epochs (default: 100)")
    p.add_argument("--json", type=Path, default=None, help="also write every measurement to this JSON file")
    return p


# -- epochs -------------------------------------------------------------------------------
def kdexp_epoch_seconds(cfg, datamodule, teacher, store, objective, width: int, epochs: int) -> list[float]:
    """Training-batch time of each epoch of a real kdexp fit (the run's trainer config, no logger)."""
    import pytorch_lightning as pl  # Lightning loads only for the epochs it times (4 s of start-up otherwise)

    from kdexp.data.lightning import for_trainer
    from kdexp.run.fit import build_trainer
    from kdexp.run.modules import DistillationModule

    class EpochClock(pl.Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == trainer.num_training_batches - 1:
                self.seconds.append(time.perf_counter() - self._start)

    seed_everything(1)
    student = instantiate(cfg.student, width=width)
    module = DistillationModule(model=student, teacher=teacher.model, objective=objective,
                                optimizer=instantiate(cfg.optimizer), num_classes=int(cfg.data.num_classes),
                                teacher_store=store)
    with tempfile.TemporaryDirectory() as folder:
        trainer = build_trainer(cfg, Path(folder), None, max_epochs=epochs)
        clock = EpochClock()
        trainer.callbacks.insert(0, clock)
        trainer.fit(module, datamodule=for_trainer(datamodule))
    return clock.seconds


def bare_epoch_seconds(cfg, datamodule, store, width: int, epochs: int, kd: bool) -> list[float]:
    """The same math with no framework: index gather, forward, loss, backward, Adam step."""
    import torch
    import torch.nn.functional as F


    torch.manual_seed(1)
    student = instantiate(cfg.student, width=width)
    optimizer = instantiate(cfg.optimizer)(student.parameters())
    split = datamodule.splits["train"]
    teacher_logits = store.splits["train"].logits
    T, alpha = HINTON["temperature"], HINTON["alpha"]
    seconds = []
    for epoch in range(epochs):
        batches = IndexBatches(split.x, split.y, datamodule.batch_size, shuffle=True, seed=epoch,
                               transform=datamodule.batch_transform)
        start = time.perf_counter()
        for x, y, index in batches:
            logits = student(x)
            loss = F.cross_entropy(logits, y)
            if kd:
                kl = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(teacher_logits[index] / T, -1),
                              reduction="batchmean", log_target=True)
                loss = (1 - alpha) * loss + alpha * T * T * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    return seconds


def bench_setup(overrides: list[str]):
    """The composed config (no logger), its data (set up, threads pinned) and its teacher."""

    cfg = compose_run([*overrides, "logger=none"], Path(tempfile.gettempdir()) / "kdexp-bench")
    apply_num_threads(cfg.get("num_threads"))
    datamodule = instantiate(cfg.data, what="data")
    datamodule.setup()
    ensure_stages(cfg)
    return cfg, datamodule, get_teacher(cfg, datamodule)


def epoch_table(overrides: list[str], widths: list[int], repeats: int, epochs: int) -> list[dict[str, Any]]:
    """Median epoch seconds of (i)–(v) per width, over interleaved repeats."""
    import torch


    cfg, datamodule, teacher = bench_setup(overrides)
    store, _ = get_teacher_outputs(cfg, datamodule, teacher, 0, HintonKD(**HINTON))
    if store is None:
        raise SystemExit("kdexp bench: this data set is augmented, so there is no cached KD to time.")
    rows = []
    for width in widths:
        variants: dict[str, Callable[[], list[float]]] = {
            "ce": lambda: kdexp_epoch_seconds(cfg, datamodule, teacher, store, CrossEntropyOnly(), width, epochs),
            "kd_online": lambda: kdexp_epoch_seconds(cfg, datamodule, teacher, None, HintonKD(**HINTON), width, epochs),
            "kd_cached": lambda: kdexp_epoch_seconds(cfg, datamodule, teacher, store, HintonKD(**HINTON), width, epochs),
            "bare_kd_cached": lambda: bare_epoch_seconds(cfg, datamodule, store, width, epochs, kd=True),
            "bare_ce": lambda: bare_epoch_seconds(cfg, datamodule, store, width, epochs, kd=False),
        }
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(repeats):
            for name, measure in variants.items():
                samples[name].extend(measure()[1:])  # the first epoch warms caches and allocators up
        median = {name: statistics.median(values) for name, values in samples.items()}
        rows.append({"width": width, "threads": torch.get_num_threads(), "batches": len(datamodule.train_dataloader()),
                     "median_epoch_s": median, "samples": len(samples["ce"]),
                     "ratios": {"(ii)/(i) online KD / CE": median["kd_online"] / median["ce"],
                                "(iii)/(i) cached KD / CE": median["kd_cached"] / median["ce"],
                                "(iii)/(iv) cached KD / bare KD": median["kd_cached"] / median["bare_kd_cached"],
                                "(i)/(v) CE / bare CE": median["ce"] / median["bare_ce"]}})
    return rows


def outputs_table(overrides: list[str], width: int, repeats: int, epochs: int, topk: int) -> dict[str, Any]:
    """Epoch time of the configured objective with the teacher online, from full cached logits and from
    a top-``topk`` cache (medians of interleaved repeats), and the disk bytes per position of each file."""

    cfg, datamodule, teacher = bench_setup(overrides)
    objective = lambda: instantiate(objective_node(cfg), what="kd")  # noqa: E731 (a fresh one per fit)
    positions = sum(split.y.numel() for split in datamodule.splits.values())
    stores, sizes = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for name, k in (("full", None), (f"top{topk}", topk)):
            identity = {**teacher_output_identity(cfg, teacher, datamodule.fingerprint(), 0,
                                                  list(objective().teacher_features)), "topk": k}
            path = save_store(Path(folder) / f"{name}.pt", compute_store(teacher.model, datamodule.eval_batches, identity))
            sizes[name] = path.stat().st_size
            stores[name] = read_store(path)  # memory-mapped, as runs read it
        variants = {"online": None, **stores}
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(repeats):
            for name, store in variants.items():
                samples[name].extend(kdexp_epoch_seconds(cfg, datamodule, teacher, store, objective(), width,
                                                         epochs)[1:])
    median = {name: statistics.median(values) for name, values in samples.items()}
    return {"width": width, "objective": objective().describe(), "positions": positions, "median_epoch_s": median,
            "bytes_per_position": {name: size / positions for name, size in sizes.items()},
            "file_mb": {name: size / 2**20 for name, size in sizes.items()},
            "speed-up over online": {name: median["online"] / median[name] for name in stores}}


def pack_table(overrides: list[str], widths: list[int], sizes: list[int], repeats: int, epochs: int
               ) -> list[dict[str, Any]]:
    """Median epoch time of N students trained together (packed) and of one kdexp student (cached KD)."""

    cfg, datamodule, teacher = bench_setup(overrides)
    store, _ = get_teacher_outputs(cfg, datamodule, teacher, 0, HintonKD(**HINTON))
    train = datamodule.splits["train"]

    def packed(width: int, size: int) -> list[float]:
        students = []
        for seed in range(1, size + 1):
            seed_everything(seed)
            students.append(instantiate(cfg.student, width=width))
        pack = StudentPack(students)
        optimizer = instantiate(cfg.optimizer)(pack.optimizer_parameters())
        objectives = [HintonKD(**HINTON) for _ in range(size)]
        seconds = []
        for epoch in range(epochs):
            start = time.perf_counter()
            train_epoch(pack, optimizer, train.x, train.y, store.splits["train"].logits, list(range(1, size + 1)),
                        epoch, datamodule.batch_size, objectives, datamodule.batch_transform)
            seconds.append(time.perf_counter() - start)
        return seconds

    rows = []
    for width in widths:
        samples: dict[str, list[float]] = {"single": [], **{f"pack{n}": [] for n in sizes}}
        for _ in range(repeats):
            samples["single"].extend(kdexp_epoch_seconds(cfg, datamodule, teacher, store, HintonKD(**HINTON), width,
                                                         epochs)[1:])
            for n in sizes:
                samples[f"pack{n}"].extend(packed(width, n)[1:])
        median = {name: statistics.median(values) for name, values in samples.items()}
        rows.append({"width": width, "median_epoch_s": median,
                     "students_per_epoch_second": {name: (int(name[4:]) if name != "single" else 1) / seconds
                                                   for name, seconds in median.items()},
                     "speed-up over single runs": {f"pack{n}": n * median["single"] / median[f"pack{n}"]
                                                   for n in sizes}})
    return rows


def format_pack(rows: list[dict[str, Any]]) -> str:
    sizes = list(rows[0]["speed-up over single runs"])
    lines = ["| width | one kdexp student | " + " | ".join(f"{name[4:]} packed" for name in sizes) + " |",
             "|---:|---:|" + "---:|" * len(sizes)]
    for row in rows:
        cells = [f"{1000 * row['median_epoch_s']['single']:.1f} ms"]
        cells += [f"{1000 * row['median_epoch_s'][name]:.1f} ms ({row['speed-up over single runs'][name]:.2f}×)"
                  for name in sizes]
        lines.append(f"| {row['width']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_outputs(row: dict[str, Any]) -> str:
    lines = ["| teacher outputs | epoch | speed-up over online | file | bytes per position |", "|---|---:|---:|---:|---:|"]
    for name, seconds in row["median_epoch_s"].items():
        if name == "online":
            lines.append(f"| online | {seconds:.2f} s | 1.00× | – | – |")
            continue
        lines.append(f"| {name} cache | {seconds:.2f} s | {row['speed-up over online'][name]:.2f}× | "
                     f"{row['file_mb'][name]:.1f} MB | {row['bytes_per_position'][name]:.0f} |")
    return "\n".join(lines)


# -- whole runs and sweeps -------------------------------------------------------------------
def whole_runs(overrides: list[str], widths: list[int], runs: int) -> list[dict[str, Any]]:
    """Fresh ``kdexp train`` processes (W&B offline): wall time and the parts their records state."""
    rows = []
    env = {**os.environ, "WANDB_MODE": "offline"}
    for width in widths:
        for kd in ("hinton", "none"):
            for i in range(runs):
                with tempfile.TemporaryDirectory() as folder:
                    args = [*overrides, f"student.width={width}", f"kd={kd}", f"hydra.run.dir={folder}/run",
                            "logger=wandb"]
                    start = time.perf_counter()
                    done = subprocess.run([sys.executable, "-m", "kdexp.train", *args], env=env,
                                          capture_output=True, text=True)
                    wall = time.perf_counter() - start
                    if done.returncode != 0:
                        raise SystemExit(f"kdexp bench: the run failed:\n{done.stderr[-2000:]}")
                    record = json.loads((Path(folder) / "run" / "run_record.json").read_text())
                parts = record.get("timings_s", {})
                rows.append({"width": width, "kd": kd, "repeat": i, "process_s": wall,
                             "in_run_s": record["wall_time_s"], "parts_s": parts,
                             "outside_fit_s": wall - parts.get("fit", 0.0)})
    return rows


def whole_sweep(overrides: list[str]) -> dict[str, float]:
    """A 12-run T × alpha KD grid against 12 CE-only runs plus one teacher training (fresh caches)."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    with tempfile.TemporaryDirectory() as folder:
        env["KDEXP_CACHE_DIR"] = f"{folder}/cache"

        def multirun(*args: str) -> float:
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "kdexp.train", "--multirun", *overrides, *args,
                                   f"hydra.sweep.dir={folder}/sweep-{time.time_ns()}", "logger=wandb"],
                                  env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"kdexp bench: the sweep failed:\n{done.stderr[-2000:]}")
            return time.perf_counter() - start

        teacher_and_one = multirun("kd=none", "seed=0")  # trains and caches the teacher, plus one CE run
        ce_only = multirun("kd=none", "seed=range(1,13)")
        grid = multirun("kd=hinton", "kd.temperature=1,2,4,8", "kd.alpha=0.1,0.5,0.9")
    teacher = teacher_and_one - ce_only / 12
    return {"teacher_training_s": teacher, "ce_12_runs_s": ce_only, "kd_grid_12_runs_s": grid,
            "kd grid / CE runs": grid / ce_only,
            "kd grid / (1.15 x CE runs + teacher)": grid / (1.15 * ce_only + teacher)}


def packed_sweeps(widths: list[int], sizes: list[int], seeds: int, jobs: int, epochs: int | None
                  ) -> list[dict[str, Any]]:
    """Whole ``kdexp sweep`` processes of ``sweeps/hinton_grid.yaml`` at one width (T ∈ {2, 4} × α ∈
    {0.5, 0.9} × ``seeds`` seeds), one by one and with ``--pack N``, on the same ``--jobs``; the teacher
    is trained and its outputs cached before the clock starts. Every packed run's metrics are compared
    with its unpacked run's."""
    grid_file = Path(__file__).resolve().parent.parent / "sweeps" / "hinton_grid.yaml"
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "KDEXP_CACHE_DIR": f"{folder}/cache"}
        extra = [f"trainer.max_epochs={epochs}"] if epochs else []
        warm = subprocess.run([sys.executable, "-m", "kdexp.train", "data=mnist1d", "teacher=cnn1d", "student=mlp",
                               "trainer.max_epochs=1", "logger=none", f"hydra.run.dir={folder}/warm"],
                              env=env, capture_output=True, text=True)
        if warm.returncode != 0:
            raise SystemExit(f"kdexp bench: the warm-up run failed:\n{warm.stderr[-2000:]}")
        for width in widths:
            axes = [f"student.width={width}", "kd.temperature=2,4", "kd.alpha=0.5,0.9",
                    "seed=" + ",".join(str(s) for s in range(1, seeds + 1)), *extra]
            runs = 4 * seeds
            row: dict[str, Any] = {"width": width, "runs": runs, "jobs": jobs, "epochs": epochs or 100, "wall_s": {},
                                   "max_abs_diff": {}}
            reference: dict[str, dict[str, float]] = {}
            for size in [1, *sizes]:
                out = Path(folder) / f"w{width}-p{size}"
                command = [sys.executable, "-m", "kdexp.cli", "sweep", str(grid_file), *axes, "--jobs", str(jobs),
                           "--dir", str(out), *(["--pack", str(size)] if size > 1 else [])]
                print(f"  width {width}, {'one by one' if size == 1 else f'--pack {size}'} ...", file=sys.stderr)
                start = time.perf_counter()
                done = subprocess.run(command, env=env, capture_output=True, text=True)
                row["wall_s"][size] = time.perf_counter() - start
                if done.returncode != 0:
                    raise SystemExit(f"kdexp bench: the sweep failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
                metrics = {p.parent.name: json.loads(p.read_text())["metrics"] for p in out.glob("*/run_record.json")}
                if size == 1:
                    reference = metrics
                else:
                    row["max_abs_diff"][size] = {key: max(abs(metrics[run][key] - reference[run][key])
                                                          for run in reference)
                                                 for key in ("test/acc", "test/acc_last", "val/acc_best", "test/nll")}
            row["runs_per_minute"] = {size: 60 * runs / wall for size, wall in row["wall_s"].items()}
            row["speed-up"] = {size: row["wall_s"][1] / wall for size, wall in row["wall_s"].items()}
            rows.append(row)
    return rows


def format_packed_sweeps(rows: list[dict[str, Any]]) -> str:
    sizes = list(rows[0]["wall_s"])
    head = "| width | runs | " + " | ".join("one by one" if n == 1 else f"--pack {n}" for n in sizes) + \
           " | largest difference (test/acc, val/acc_best, test/nll) |"
    lines = [head, "|---:|---:|" + "---:|" * len(sizes) + "---|"]
    for row in rows:
        cells = [f"{row['wall_s'][n]:.0f} s, {row['runs_per_minute'][n]:.1f} runs/min"
                 + (f" ({row['speed-up'][n]:.2f}×)" if n != 1 else "") for n in sizes]
        worst = {key: max(d[key] for d in row["max_abs_diff"].values()) for key in ("test/acc", "val/acc_best",
                                                                                     "test/nll")} \
            if row["max_abs_diff"] else {}
        diff = ", ".join(f"{v:.2g}" for v in worst.values()) or "–"
        lines.append(f"| {row['width']} | {row['runs']} | " + " | ".join(cells) + f" | {diff} |")
    return "\n".join(lines)


# -- output --------------------------------------------------------------------------------
def format_epochs(rows: list[dict[str, Any]]) -> str:
    names = [("ce", "(i) kdexp CE"), ("kd_online", "(ii) kdexp KD online"), ("kd_cached", "(iii) kdexp KD cached"),
             ("bare_kd_cached", "(iv) bare KD cached"), ("bare_ce", "(v) bare CE")]
    lines = ["| width | " + " | ".join(title for _, title in names) + " | " + " | ".join(rows[0]["ratios"]) + " |",
             "|---:|" + "---:|" * (len(names) + len(rows[0]["ratios"]))]
    for row in rows:
        cells = [f"{1000 * row['median_epoch_s'][n]:.1f} ms" for n, _ in names]
        ratios = [f"{v:.2f}" for v in row["ratios"].values()]
        lines.append(f"| {row['width']} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def format_runs(rows: list[dict[str, Any]]) -> str:
    parts = sorted({p for row in rows for p in row["parts_s"]})
    lines = ["| width | kd | process | outside fit | " + " | ".join(parts) + " |", "|---:|---|" + "---:|" * (2 + len(parts))]
    keyed: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        keyed.setdefault((row["width"], row["kd"]), []).append(row)
    for (width, kd), group in keyed.items():
        med = lambda f: statistics.median(f(r) for r in group)  # noqa: E731
        cells = [f"{med(lambda r: r['process_s']):.2f} s", f"{med(lambda r: r['outside_fit_s']):.2f} s"]
        cells += [f"{med(lambda r, p=p: r['parts_s'].get(p, 0.0)):.2f}" for p in parts]
        lines.append(f"| {width} | {kd} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parser().parse_intermixed_args(argv)
    configure_console(verbose=False)  # the tables, not Lightning's per-fit banners
    results: dict[str, Any] = {"command": "kdexp bench " + " ".join(argv)}
    if args.pack_sweep:
        print(f"Timing whole sweeps one by one and packed ({args.pack_sweep}), widths {args.widths} ...",
              file=sys.stderr)
        results["packed_sweeps"] = packed_sweeps(args.widths, args.pack_sweep, args.seeds, args.jobs,
                                                 args.sweep_epochs)
        print("\nWhole sweeps of hinton_grid (wall time of `kdexp sweep`, runs per minute, speed-up over one by "
              "one):\n" + format_packed_sweeps(results["packed_sweeps"]))
    elif args.pack:
        print(f"Timing packed training (pack sizes {args.pack}, widths {args.widths}) against one student at a "
              "time ...", file=sys.stderr)
        results["pack"] = pack_table(args.overrides, args.widths, args.pack, args.repeats, args.epochs)
        print("\nMedian training-epoch time of N students trained together (speed-up over N single kdexp "
              "epochs):\n" + format_pack(results["pack"]))
    elif args.outputs is not None:
        if args.outputs < 1:
            raise SystemExit("kdexp bench: --outputs K needs K >= 1.")
        print(f"Timing epochs with the teacher online, from full cached outputs and from a top-{args.outputs} "
              f"cache (width {args.widths[0]}, {args.repeats} interleaved repeats) ...", file=sys.stderr)
        results["outputs"] = outputs_table(args.overrides, args.widths[0], args.repeats, args.epochs, args.outputs)
        print(f"\nTeacher outputs ({results['outputs']['objective']}, {results['outputs']['positions']} positions; "
              "median training-epoch time):\n" + format_outputs(results["outputs"]))
    else:
        print(f"Timing training epochs (widths {args.widths}, {args.repeats} interleaved repeats × "
              f"{args.epochs - 1} epochs after warm-up) ...", file=sys.stderr)
        results["epochs"] = epoch_table(args.overrides, args.widths, args.repeats, args.epochs)
        print("\nMedian training-epoch time and ratios:\n" + format_epochs(results["epochs"]))
    if args.runs:
        print(f"\nTiming {args.runs} whole `kdexp train` process(es) per width and objective ...", file=sys.stderr)
        results["runs"] = whole_runs(args.overrides, args.widths, args.runs)
        print("\nWhole runs (medians; parts from the run records' timings_s, seconds):\n" + format_runs(results["runs"]))
    if args.sweep:
        print("\nTiming a 12-run T × α grid against 12 CE-only runs and a teacher ...", file=sys.stderr)
        results["sweep"] = whole_sweep(args.overrides)
        print("\nWhole sweep: " + ", ".join(f"{k} {v:.2f}" for k, v in results["sweep"].items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0
