"""A GPU check of kdexp's mechanics (bf16, DDP, teacher outputs) on a machine with CUDA.

    scripts/gpu_check.sh                        # after `make setup`, on a CUDA machine, < 10 minutes
    python scripts/gpu_check.py --out outputs/gpu_check.json
    python scripts/gpu_check.py --cpu-smoke     # the same code path on the CPU at tiny sizes (b and d only)

Checks, each a key of the JSON file written to --out (exit status 1 when one fails):

  a. pytest_gpu       the test suite's GPU-marked tests (``pytest -m gpu``); none may be skipped.
  b. kd_gpu           resnet32x4 -> resnet8x4 with the CRD recipe (experiment=cifar100_crd_kd), few epochs,
                      trainer=gpu (bf16-mixed): the run finishes, train/loss falls from the first epoch
                      to the last, and the student's training throughput (images/s) is printed.
  c. kd_ddp           the same run with trainer=ddp on every GPU; skipped, with a note, on one GPU.
  d. teacher_outputs  the teacher-output path under bf16: the cached path (kdexp's compute_split with the
                      teacher held in bfloat16, as teacher.dtype=bfloat16 does) against the online path
                      (a float32 teacher under bf16 autocast, as a bf16-mixed run computes it, on shuffled
                      batches of another size), row for row; tolerance below (TOLERANCE).

The data: CIFAR-100 cannot be downloaded there. The script writes CIFAR-100-format files (torchvision's
pickles) of synthetic images: per class a random 32x32 prototype plus noise, so there is something to
learn and the loss can fall. They are read through the real TorchvisionDataModule with the stand-in
file reader of tests/test_cifar_zoo.py (torchvision's checksums would refuse them, and torchvision is an
optional extra). The numbers test mechanics, not accuracy.

Training runs are ``python -m kdexp.train experiment=cifar100_crd_kd data._target_=gpu_check.SyntheticCIFAR100
...`` with scripts/ on PYTHONPATH (a data module of one's own, plugged in by ``_target_``); under DDP,
Lightning starts the other ranks with the same overrides and environment.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pickle
import platform
import subprocess
import sys
import time
from pathlib import Path

from kdexp.data import TorchvisionDataModule

ROOT = Path(__file__).resolve().parents[1]
NOTE = ("data: synthetic CIFAR-100-format images (class prototypes + noise), not CIFAR-100: "
        "the numbers test mechanics, not accuracy")
# Cached (bf16 teacher) vs online (fp32 teacher under bf16 autocast) logits: both round every layer to
# bf16's 8-bit mantissa, in different places, so rows agree to bf16 precision, not bit for bit.
# Each logit must satisfy |a - b| <= ATOL + RTOL * |b| (kdexp's verify_tolerance(bfloat16) = 5e-2),
# the Hinton KD loss at T = 4 (float32) computed from either must agree within 5 % relative, and the argmax
# within 95 % of the rows (bf16 ties and near-ties may flip).
TOLERANCE = {"atol": 5e-2, "rtol": 5e-2, "kd_loss_rel": 5e-2, "argmax_agreement_min": 0.95}

SIZES = {  # per mode: images, epochs, batch
    "gpu": {"n_train": 10000, "n_test": 2000, "teacher_epochs": 3, "epochs": 3, "batch_size": 64, "width": 1,
            "output_rows": 2000},
    # the CPU here has no fast bf16 kernels (a bf16 resnet32x4 forward takes ~2.5 s per image), hence
    # eighth-width nets and 4 rows for d: the same code path, not the same sizes
    "cpu_smoke": {"n_train": 48, "n_test": 16, "teacher_epochs": 1, "epochs": 2, "batch_size": 16, "width": 0.125,
                  "output_rows": 4},
}


# -- the data ---------------------------------------------------------------------------------------
def write_cifar100(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """``<root>/cifar-100-python/{train,test,meta}`` in torchvision's format; returns ``root``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    prototypes = rng.integers(0, 256, size=(100, 3 * 32 * 32)).astype(np.int16)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 100, size=n)
        noise = rng.integers(-48, 49, size=(n, 3 * 32 * 32))
        data = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
        entry = {"data": data, "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(),
                 "filenames": [f"{split}_{i}.png" for i in range(n)], "batch_label": split}
        with open(folder / split, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)],
                     "coarse_label_names": [f"s{i}" for i in range(20)]}, f)
    return root


class SyntheticCIFAR100(TorchvisionDataModule):
    """The real CIFAR-100 data module (layout, splits, batching, augmentation, normalisation), with the
    file reader of tests/test_cifar_zoo.py: it reads torchvision's pickles as torchvision does, without
    torchvision's checksums (these are not the published files) and without needing torchvision.
    Selected with ``data._target_=gpu_check.SyntheticCIFAR100`` (scripts/ on PYTHONPATH), so every DDP
    rank, which Lightning starts as ``python -m kdexp.train <the same overrides>``, reads the same files."""

    def _torchvision_class(self):
        sys.path.insert(0, str(ROOT / "tests"))
        from test_cifar_zoo import (
            _StandInCIFAR100,  # the project's stand-in reader, reused
        )

        return _StandInCIFAR100


# -- (a) the GPU-marked tests -----------------------------------------------------------------------
def check_pytest(timeout: int) -> dict:
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-n", "0", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    summary = tail[-1] if tail else ""
    ok = proc.returncode == 0 and "skipped" not in summary  # on a GPU machine nothing may skip
    return {"ok": ok, "command": " ".join(cmd[1:]), "returncode": proc.returncode, "summary": summary,
            "tail": tail, "seconds": round(time.perf_counter() - started, 1)}


# -- (b), (c) a KD run ------------------------------------------------------------------------------
def kd_overrides(trainer: str, data_dir: Path, run_dir: Path, sizes: dict, smoke: bool) -> list[str]:
    epochs = sizes["epochs"]
    overrides = [
        "experiment=cifar100_crd_kd", f"trainer={trainer}", "logger=csv", "seed=0",
        "data._target_=gpu_check.SyntheticCIFAR100",
        f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}",
        f"trainer.max_epochs={epochs}", f"teacher.max_epochs={sizes['teacher_epochs']}",
        f"data.batch_size={sizes['batch_size']}", f"data.eval_batch_size={4 * sizes['batch_size']}",
        # the recipe's lr steps fall after the last epoch here; the teacher has one short go
        f"scheduler.milestones=[{epochs + 1}]", f"teacher.scheduler.milestones=[{sizes['teacher_epochs'] + 1}]",
    ]
    if sizes["width"] != 1:
        overrides += [f"teacher.model.width={sizes['width']}", f"student.width={sizes['width']}"]
    if smoke:  # one epoch of a quarter-width teacher need not beat chance
        overrides += ["num_threads=2", "++teacher.allow_untrained=true"]
    return overrides


def epoch_losses(run_dir: Path) -> list[float]:
    """``train/loss`` per epoch from the CSV logger's file (epoch-level rows)."""
    files = sorted(run_dir.rglob("metrics.csv"))
    if not files:
        return []
    per_epoch: dict[int, float] = {}
    with open(files[-1]) as f:
        for row in csv.DictReader(f):
            value = row.get("train/loss_epoch") or row.get("train/loss")
            if value and row.get("epoch") not in (None, ""):
                per_epoch[int(float(row["epoch"]))] = float(value)  # the epoch's last value: its mean
    return [per_epoch[e] for e in sorted(per_epoch)]


def check_kd_run(name: str, trainer: str, data_dir: Path, work: Path, cache: Path, sizes: dict,
                 smoke: bool, timeout: int) -> dict:
    run_dir = work / name
    path = os.pathsep.join(filter(None, [str(ROOT / "scripts"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "KDEXP_CACHE_DIR": str(cache), "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "WANDB_DIR": str(work)}
    cmd = [sys.executable, "-m", "kdexp.train", *kd_overrides(trainer, data_dir, run_dir, sizes, smoke)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        returncode, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        returncode, output = None, f"timed out after {timeout} s: {err}"
    seconds = time.perf_counter() - started
    result: dict = {"trainer": trainer, "command": "PYTHONPATH=scripts python -m kdexp.train " + " ".join(cmd[3:]),
                    "returncode": returncode, "seconds": round(seconds, 1), "run_dir": str(run_dir)}
    record_file = run_dir / "run_record.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    losses = epoch_losses(run_dir)
    steps = int(record.get("global_steps") or 0)
    world = int((record.get("distributed") or {}).get("world_size") or 1)
    fit_seconds = (record.get("timings_s") or {}).get("fit")  # the student's fit, per-epoch validation included
    # trained images: each epoch's training split, less what DDP leaves out (the last incomplete round)
    images = min(int((record.get("data_sizes") or {}).get("train_labelled") or 0) * int(record.get("epochs") or 0),
                 steps * sizes["batch_size"] * world)
    result.update({
        "status": record.get("status"), "precision": (record.get("config") or {}).get("trainer", {}).get("precision"),
        "world_size": world, "epochs": record.get("epochs"), "global_steps": steps,
        "train_loss_per_epoch": losses, "loss_decreased": len(losses) >= 2 and losses[-1] < losses[0],
        "student_fit_seconds": fit_seconds, "train_images": images,
        "timings_s": record.get("timings_s"), "wall_time_s": record.get("wall_time_s"),
        "images_per_s": round(images / fit_seconds, 1) if fit_seconds else None,
        "test_acc": (record.get("metrics") or {}).get("test/acc"),
        "teacher_test_acc": (record.get("teacher") or {}).get("test_acc"),
        "teacher_better_than_chance": (record.get("teacher") or {}).get("better_than_chance"),
    })
    result["ok"] = returncode == 0 and result["status"] == "finished" and result["loss_decreased"]
    if not result["ok"]:
        result["output_tail"] = output.strip().splitlines()[-30:]
    return result


# -- (d) teacher outputs under bf16 -----------------------------------------------------------------
def check_teacher_outputs(data_dir: Path, cache: Path, sizes: dict, device: str) -> dict:
    import torch

    from kdexp.models import cifar
    from kdexp.objectives.base import ModelOutputs
    from kdexp.objectives.hinton import HintonKD
    from kdexp.run.modules import DistillationModule
    from kdexp.teachers.outputs import (
        TeacherOutputStore,
        compute_split,
        verify_tolerance,
    )
    from kdexp.teachers.provision import load_teacher_weights

    dm = SyntheticCIFAR100("cifar100", num_classes=100, input_shape=(3, 32, 32), data_dir=str(data_dir),
                               batch_size=sizes["batch_size"], eval_batch_size=4 * sizes["batch_size"],
                               shuffle_seed=0, augment=False)
    dm.setup()
    teacher = cifar.resnet32x4(in_shape=(3, 32, 32), num_classes=100, width=sizes["width"])
    trained = sorted(cache.glob("teachers/*/teacher.pt"))
    source = "random init"
    if trained:  # the teacher check (b) trained: outputs of a trained net are sharper, a harder test
        load_teacher_weights(teacher, trained[0], num_classes=100)
        source = str(trained[0])
    teacher.eval().requires_grad_(False)

    # cached: kdexp's compute_split with the teacher held in bfloat16 (teacher.dtype=bfloat16) over
    # unshuffled eval-size batches, stored in float32; a module with that store looks rows up by index
    rows, eval_batch = sizes["output_rows"], 4 * sizes["batch_size"]
    x_all = torch.cat([x for x, _, _ in dm.test_dataloader()])[:rows].to(device)  # (N, 3, 32, 32), sample order
    y_all = torch.cat([y for _, y, _ in dm.test_dataloader()])[:rows].to(device)
    batches = [(x, None, torch.arange(start, start + len(x)))
               for start, x in zip(range(0, rows, eval_batch), x_all.split(eval_batch))]
    split = compute_split(_copy(teacher).to(device=device, dtype=torch.bfloat16), batches)
    objective = HintonKD(temperature=4.0, alpha=0.9)
    student = cifar.resnet8x4(in_shape=(3, 32, 32), num_classes=100, width=sizes["width"]).to(device)
    cached_module = DistillationModule(model=student, teacher=None, optimizer=torch.optim.SGD, num_classes=100,
                                       objective=objective, teacher_store=TeacherOutputStore({"train": split}, {}))
    # online: the module's own teacher forward, a float32 teacher under bf16 autocast (what a
    # bf16-mixed training step runs), on shuffled training-size batches
    online_module = DistillationModule(model=student, teacher=_copy(teacher).to(device), optimizer=torch.optim.SGD,
                                       num_classes=100, objective=objective)
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(0))
    cached = torch.empty(rows, 100)
    online = torch.empty(rows, 100)
    kd = {"cached": 0.0, "online": 0.0}
    student.eval()
    for index in order.split(sizes["batch_size"]):
        x, y = x_all[index.to(device)], y_all[index.to(device)]
        with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16):
            s_out = cached_module.student_outputs(x)
            outs = {name: module.teacher_outputs(x, index.to(device), "train")  # a batch carries its indices
                    for name, module in (("cached", cached_module), ("online", online_module))}
        s_out = ModelOutputs(s_out.logits.float())  # the loss in float32: only the teacher rows differ
        for name, t_out in outs.items():
            (cached if name == "cached" else online)[index] = t_out.logits.float().cpu()
            with torch.no_grad():
                kd[name] += float(objective(s_out, ModelOutputs(t_out.logits.float()), y)["loss_kd"]) * len(index) / rows

    diff = (cached - online).abs()
    close = diff <= TOLERANCE["atol"] + TOLERANCE["rtol"] * online.abs()
    loss_cached, loss_online = kd["cached"], kd["online"]
    kd_rel = abs(loss_cached - loss_online) / max(abs(loss_online), 1e-12)
    agreement = (cached.argmax(1) == online.argmax(1)).float().mean().item()
    result = {
        "device": device, "teacher": source, "rows": len(cached),
        "cached": f"compute_split, teacher in bfloat16, unshuffled batches of {eval_batch}; "
                  "DistillationModule.teacher_outputs reads the store",
        "online": "DistillationModule.teacher_outputs, float32 teacher under torch.autocast(bfloat16), "
                  f"shuffled batches of {sizes['batch_size']}",
        "tolerance": {**TOLERANCE, "kdexp_verify_tolerance_bf16": verify_tolerance(torch.bfloat16)},
        "max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
        "max_abs_logit": online.abs().max().item(), "fraction_within_tolerance": close.float().mean().item(),
        "kd_loss": "HintonKD(T=4, alpha=0.9) loss_kd of one student on both",
        "kd_loss_cached": loss_cached, "kd_loss_online": loss_online, "kd_loss_rel_diff": kd_rel,
        "argmax_agreement": agreement,
    }
    result["ok"] = bool(close.all()) and kd_rel <= TOLERANCE["kd_loss_rel"] \
        and agreement >= TOLERANCE["argmax_agreement_min"]
    return result


def _copy(module):
    import copy

    return copy.deepcopy(module)


# -- main -------------------------------------------------------------------------------------------
def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
            "gpus": torch.cuda.device_count(), "host": platform.node()}
    if info["gpus"]:
        info["gpu_names"] = [torch.cuda.get_device_name(i) for i in range(info["gpus"])]
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/gpu_check.json", help="the JSON results file")
    parser.add_argument("--work", default=None, help="data, runs and cache (default: <out>'s folder/gpu_check)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="checks b and d on the CPU at tiny sizes (tests the script, not a GPU)")
    parser.add_argument("--ddp-cpu", action="store_true",
                        help="with --cpu-smoke: check c too, with trainer=ddp_cpu (2 gloo ranks)")
    parser.add_argument("--timeout", type=int, default=240, help="seconds allowed to each step")
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else out.parent / "gpu_check"
    mode = "cpu_smoke" if args.cpu_smoke else "gpu"
    sizes = SIZES[mode]
    env = environment()
    results: dict = {"mode": mode, "note": NOTE, "environment": env, "sizes": sizes, "checks": {}}
    print(f"gpu_check ({mode}): {NOTE}", flush=True)
    if mode == "gpu" and not env["cuda_available"]:
        results["checks"]["cuda"] = {"ok": False, "reason": "no CUDA device visible; --cpu-smoke tests the script"}
        return _finish(results, out)

    started = time.perf_counter()
    data_dir = write_cifar100(work / "data", sizes["n_train"], sizes["n_test"])
    cache = work / "cache"
    checks = results["checks"]
    if mode == "gpu":
        checks["pytest_gpu"] = _announce("a. pytest -m gpu", check_pytest(args.timeout))
    else:
        checks["pytest_gpu"] = {"ok": None, "skipped": "cpu-smoke: the GPU-marked tests need CUDA"}
    trainer = "gpu" if mode == "gpu" else "cpu"
    checks["kd_gpu"] = _announce(f"b. KD trainer={trainer}",
                                 check_kd_run("kd_single", trainer, data_dir, work, cache, sizes, mode != "gpu",
                                              args.timeout))
    if mode == "gpu" and env["gpus"] >= 2:
        checks["kd_ddp"] = _announce(f"c. KD trainer=ddp ({env['gpus']} GPUs)",
                                     check_kd_run("kd_ddp", "ddp", data_dir, work, cache, sizes, False, args.timeout))
    elif mode != "gpu" and args.ddp_cpu:
        checks["kd_ddp"] = _announce("c. KD trainer=ddp_cpu (2 gloo ranks)",
                                     check_kd_run("kd_ddp", "ddp_cpu", data_dir, work, cache, sizes, True, args.timeout))
    else:
        why = "cpu-smoke (--ddp-cpu runs it over 2 CPU ranks)" if mode != "gpu" \
            else f"only {env['gpus']} GPU: DDP needs two or more"
        checks["kd_ddp"] = {"ok": None, "skipped": why}
        print(f"c. KD trainer=ddp: skipped ({why})", flush=True)
    checks["teacher_outputs"] = _announce("d. teacher outputs bf16, cached vs online",
                                          check_teacher_outputs(data_dir, cache, sizes,
                                                                "cuda" if mode == "gpu" else "cpu"))
    results["seconds"] = round(time.perf_counter() - started, 1)
    return _finish(results, out)


def _announce(title: str, result: dict) -> dict:
    verdict = {True: "ok", False: "FAILED", None: "skipped"}[result.get("ok")]
    extra = ""
    if "images_per_s" in result:
        extra = (f" loss/epoch {[round(v, 3) for v in result['train_loss_per_epoch']]},"
                 f" {result['images_per_s']} images/s (student fit), {result['seconds']} s")
    elif "max_abs_diff" in result:
        extra = (f" max |diff| {result['max_abs_diff']:.3g} (|logit| up to {result['max_abs_logit']:.3g}),"
                 f" KD loss rel diff {result['kd_loss_rel_diff']:.2e}, argmax agreement {result['argmax_agreement']:.3f}")
    elif "summary" in result:
        extra = f" {result['summary']}"
    print(f"{title}: {verdict}{extra}", flush=True)
    for line in result.get("output_tail", [])[-10:]:
        print(f"    {line}", flush=True)
    return result


def _finish(results: dict, out: Path) -> int:
    failed = [name for name, check in results["checks"].items() if check.get("ok") is False]
    results["ok"] = not failed
    results["failed"] = failed
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"{'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)}; results in {out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
