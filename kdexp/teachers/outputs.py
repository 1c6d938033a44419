"""Teacher outputs computed once: the on-disk cache and saved-predictions files.

In a T × α × width grid the teacher never changes, yet an online run pays for its
forward pass on every batch of every epoch. Here the teacher runs once over each
split (``train``, ``val``, ``test``) and its logits (plus the intermediate features
an objective taps, plus each member's logits for an ensemble) are stored in one
file that every run of the sweep, and every parallel worker, reads instead.

The file is a ``torch.save`` archive of plain tensors, strings and numbers: it is
read with ``weights_only=True`` (never runs code) and ``mmap=True`` (workers share
the pages instead of each holding a copy). A manifest inside it names what it was
computed from (teacher weights hash, data fingerprint, the data config that shapes
each input, tapped layers) and a SHA-256 of every split's tensors, so a file from
another teacher or data set is refused and a torn or corrupted file is detected.
A checksum stored beside the data detects damage, not edits: a file is therefore also
checked against the teacher itself when it is read (:func:`verify_against_teacher`
recomputes a random sample of rows of every split and compares them).

Outputs are looked up by ``(split, index in that split)``, never by batch position:
the batches of a shuffled epoch carry the indices of their samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import Tensor, nn

from kdexp.core.errors import CheckpointError
from kdexp.core.files import atomic_torch_save, load_weights, storage_error
from kdexp.core.vocabulary import canonical_json
from kdexp.models.ensemble import TeacherEnsemble, average_probability_logits
from kdexp.models.features import FeatureHooks
from kdexp.objectives.base import ModelOutputs, at_least_float32

log = logging.getLogger(__name__)

FORMAT = "kdexp-teacher-outputs"
VERSION = 1
SPLITS = ("train", "val", "test")
CACHE_FILE = "outputs.pt"
# Manifest fields two files must share to hold the same teacher's outputs on the same inputs.
IDENTITY_FIELDS = ("teacher_hash", "data_fingerprint", "data_transform", "teacher_layers", "members", "teacher_dtype",
                   "topk")


def as_teacher_input(teacher: nn.Module, x: Tensor) -> Tensor:
    """``x`` in the teacher's parameter dtype when both are floating point (a bf16 teacher reads bf16 inputs)."""
    param = next(teacher.parameters(), None)
    if param is not None and x.is_floating_point() and x.dtype != param.dtype:
        return x.to(param.dtype)
    return x


@dataclass
class SplitOutputs:
    """One split's teacher outputs, row ``i`` for sample ``i`` of the split."""

    logits: Tensor  # (N, C); or (N, ..., k): the k largest logits when topk_indices is set
    features: dict[str, Tensor] = field(default_factory=dict)  # path → (N, ...)
    members: Tensor | None = None  # (N, K, C) for a teacher ensemble
    # Top-k storage (language models): which classes ``logits`` holds, and the log of the summed
    # exp-logits of all the others, so every probability outside the top k is known in total.
    topk_indices: Tensor | None = None  # (N, ..., k) int32
    rest_lse: Tensor | None = None  # (N, ...)
    vocab: int = 0  # the number of classes a dense row has

    def tensors(self) -> dict[str, Tensor]:
        named = {"logits": self.logits, **{f"features/{k}": v for k, v in sorted(self.features.items())}}
        if self.members is not None:
            named["members"] = self.members
        if self.topk_indices is not None:
            named["topk_indices"], named["rest_lse"] = self.topk_indices, self.rest_lse
        return named

    def checksum(self) -> str:
        digest = hashlib.sha256()
        for name, tensor in self.tensors().items():
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def to(self, device: torch.device) -> SplitOutputs:
        def move(t: Tensor | None) -> Tensor | None:
            return t.to(device) if t is not None else None

        return SplitOutputs(self.logits.to(device), {k: v.to(device) for k, v in self.features.items()},
                            move(self.members), move(self.topk_indices), move(self.rest_lse), self.vocab)

    def take(self, index: Tensor) -> ModelOutputs:
        members = list(self.members[index].unbind(1)) if self.members is not None else None  # K × (B, C)
        return ModelOutputs(self.dense_logits(index), {k: v[index] for k, v in self.features.items()}, members)

    def dense_logits(self, index: Tensor) -> Tensor:
        """Rows ``index`` as full logits. From top-k storage: the k stored logits as they were, and the
        remaining mass spread evenly over the other classes, so at T = 1 every top-k probability and
        the total probability of the rest are exact (only how the rest is shared is lost)."""
        if self.topk_indices is None:
            return self.logits[index]
        values, indices = self.logits[index], self.topk_indices[index].long()  # (B, ..., k)
        k = values.shape[-1]
        fill = (self.rest_lse[index] - math.log(max(self.vocab - k, 1))).unsqueeze(-1)  # (B, ..., 1)
        dense = fill.expand(*values.shape[:-1], self.vocab).clone()
        return dense.scatter_(-1, indices, values)


class TeacherOutputStore:
    """Precomputed teacher outputs for some splits, and the manifest saying what they came from."""

    def __init__(self, splits: Mapping[str, SplitOutputs], manifest: Mapping[str, Any], path: Path | None = None):
        self.splits = dict(splits)
        self.manifest = dict(manifest)
        self.path = path
        self.verification: dict[str, Any] | None = None  # set by verify_against_teacher
        self._on_device: dict[tuple[str, torch.device], SplitOutputs] = {}

    def outputs(self, split: str, index: Tensor) -> ModelOutputs:
        """The teacher's outputs for samples ``index`` of ``split``, on ``index``'s device."""
        if split not in self.splits:
            raise KeyError(f"no teacher outputs stored for split '{split}' (stored: {sorted(self.splits)})")
        stored = self.splits[split]
        if index.device != stored.logits.device:  # moved once per device, then indexed there
            key = (split, index.device)
            if key not in self._on_device:
                self._on_device[key] = stored.to(index.device)
            stored = self._on_device[key]
        return stored.take(index)

    @property
    def teacher_layers(self) -> list[str]:
        return list(self.manifest.get("teacher_layers") or [])


# -- computing ----------------------------------------------------------------------
@torch.no_grad()
def compute_split(teacher: nn.Module, batches: Any, teacher_layers: Sequence[str] = (),
                  topk: int | None = None) -> SplitOutputs:
    """Run the frozen ``teacher`` over unshuffled ``(x, y, index)`` batches; rows in sample order.

    ``topk``: keep only each row's k largest logits and the log-sum-exp of the rest.
    """
    modes = {module: module.training for module in teacher.modules()}  # restored exactly, submodules included
    teacher.eval()
    hooks = FeatureHooks(teacher, list(teacher_layers)) if teacher_layers else None
    logits, members, features = [], [], {name: [] for name in teacher_layers}
    indices, rests, vocab = [], [], 0
    try:
        for x, _, index in batches:
            x = as_teacher_input(teacher, x)
            if isinstance(teacher, TeacherEnsemble):
                member_logits = teacher.member_logits(x)
                logits.append(at_least_float32(average_probability_logits(member_logits)))
                members.append(at_least_float32(torch.stack(member_logits, dim=1)))  # (B, K, C)
            elif topk:
                z = at_least_float32(teacher(x))
                vocab = z.shape[-1]
                values, top = z.topk(min(topk, vocab), dim=-1)
                logits.append(values)
                indices.append(top.int())
                rests.append(z.scatter(-1, top, float("-inf")).logsumexp(-1))
            else:
                logits.append(at_least_float32(teacher(x)))  # 16-bit teachers stored in float32, float64 kept
            for name, value in (hooks.pop() if hooks else {}).items():
                features[name].append(at_least_float32(value))
            if int(index[0]) != sum(len(z) for z in logits[:-1]):
                raise ValueError("teacher outputs must be computed over unshuffled batches in sample order")
    finally:
        if hooks:
            hooks.remove()
        for module, training in modes.items():
            module.training = training
    return SplitOutputs(torch.cat(logits).cpu(), {k: torch.cat(v).cpu() for k, v in features.items()},
                        torch.cat(members).cpu() if members else None,
                        torch.cat(indices).cpu() if indices else None, torch.cat(rests).cpu() if rests else None, vocab)


def compute_store(teacher: nn.Module, batches_for: Callable[[str], Any], identity: Mapping[str, Any],
                  splits: Sequence[str] = SPLITS) -> TeacherOutputStore:
    """The teacher's outputs on every split, with a manifest holding ``identity`` and the checksums."""
    started = time.perf_counter()
    outputs = {split: compute_split(teacher, batches_for(split), identity.get("teacher_layers") or (),
                                    identity.get("topk")) for split in splits}
    manifest = {
        **identity,
        "format": FORMAT, "version": VERSION,
        "splits": {name: {"rows": len(s.logits), "checksum": s.checksum(), "vocab": s.vocab}
                   for name, s in outputs.items()},
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return TeacherOutputStore(outputs, manifest)


# -- files --------------------------------------------------------------------------
def save_store(path: str | Path, store: TeacherOutputStore, what: str = "teacher outputs") -> Path:
    """Write ``store`` atomically (temporary file, then rename): a reader never sees half of it."""
    blob = {
        "format": FORMAT,
        "manifest_json": json.dumps(store.manifest, sort_keys=True, default=str),
        "splits": {name: {"logits": s.logits, "features": dict(s.features),
                          **({"members": s.members} if s.members is not None else {}),
                          **({"topk_indices": s.topk_indices, "rest_lse": s.rest_lse}
                             if s.topk_indices is not None else {})}
                   for name, s in store.splits.items()},
    }
    return atomic_torch_save(path, blob, what=what)


class DamagedOutputsError(CheckpointError):
    """A teacher-outputs file is truncated, corrupted or not a teacher-outputs file."""


def read_store(path: str | Path, what: str = "teacher outputs file") -> TeacherOutputStore:
    """Read and verify a teacher-outputs file (weights only, memory-mapped; checksums checked)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path.resolve()}. Write one with `kdexp predict` "
                              "(see `kdexp predict --help`), or fix the path.")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a torn zip archive fails in many ways; load_weights names the cause
        try:
            blob = load_weights(path, what=what)
        except CheckpointError as err:
            raise DamagedOutputsError(str(err)) from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise DamagedOutputsError(f"{what} {path} is not a kdexp teacher-outputs file (written by `kdexp predict` "
                                  "or the teacher-output cache).")
    try:
        manifest = json.loads(blob["manifest_json"])
        splits = {name: SplitOutputs(entry["logits"], dict(entry.get("features") or {}), entry.get("members"),
                                     entry.get("topk_indices"), entry.get("rest_lse"),
                                     int(((manifest.get("splits") or {}).get(name) or {}).get("vocab") or 0))
                  for name, entry in blob["splits"].items()}
    except (KeyError, TypeError, ValueError) as err:
        raise DamagedOutputsError(f"{what} {path} is damaged: {type(err).__name__}: {err}") from None
    if manifest.get("version") != VERSION:
        raise DamagedOutputsError(f"{what} {path} has format version {manifest.get('version')}; this kdexp reads "
                                  f"version {VERSION}. Write it again with `kdexp predict`.")
    for name, outputs in splits.items():
        expected = (manifest.get("splits") or {}).get(name) or {}
        if outputs.checksum() != expected.get("checksum"):
            raise DamagedOutputsError(f"{what} {path}: the '{name}' split does not match its checksum (the file was "
                                      "changed or damaged after it was written).")
    return TeacherOutputStore(splits, manifest, path)


def identity_mismatch(store: TeacherOutputStore, expected: Mapping[str, Any]) -> list[str]:
    """The identity fields in which ``store`` differs from ``expected`` (``field: file X, run Y``)."""
    problems = []
    for name in IDENTITY_FIELDS:
        if name in expected and store.manifest.get(name) != expected[name]:
            problems.append(f"{name}: file {store.manifest.get(name)!r}, this run {expected[name]!r}")
    return problems


# -- checking a file against its teacher ----------------------------------------------
# Rows recomputed per split when a file is read: the teacher's forward pass on 3 × 64 inputs
# (see README "Fast distillation" for the measured cost). A file edited in a fraction f of a
# split's rows escapes with probability (1 − f)^64: 3.7 % at f = 5 %, 1e-6 at f = 20 %.
VERIFY_ROWS = 64


class OutputsMismatchError(DamagedOutputsError):
    """A teacher-outputs file whose rows are not what the teacher computes on the same inputs."""


def verify_tolerance(dtype: torch.dtype) -> float:
    """How far a recomputed row may differ from the stored one (absolute and relative, as in ``isclose``).

    A batch of other rows sums in another order: float32 rows differ by ~3e-5 (DESIGN.md),
    while a 16-bit teacher rounds every layer's output to 8 (bf16) or 11 (fp16) bits."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


def verify_against_teacher(store: TeacherOutputStore, teacher: nn.Module, inputs: Callable[[str, Tensor], Tensor],
                           rows: int = VERIFY_ROWS, seed: int | None = None) -> dict[str, Any]:
    """Recompute ``rows`` rows of every split with ``teacher`` and compare them with ``store``.

    ``inputs(split, index)`` gives the inputs of samples ``index`` as the teacher reads them.
    The rows are drawn afresh on every read (``seed`` recorded, so a check can be repeated):
    a file edited in a fixed set of rows cannot be made to pass by avoiding a known sample.
    Logits (full or top-k), tapped features and ensemble members are all compared. Raises
    :class:`OutputsMismatchError` naming the split, the rows and the largest difference;
    returns what the record states about the check (also kept as ``store.verification``).
    """
    started = time.perf_counter()
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    generator = torch.Generator().manual_seed(seed)
    param = next(teacher.parameters(), None)
    tolerance = verify_tolerance(param.dtype if param is not None else torch.float32)
    layers, topk = store.teacher_layers, store.manifest.get("topk")
    worst, checked = 0.0, 0
    for split, stored in store.splits.items():
        total = len(stored.logits)
        if total == 0:
            continue
        index = torch.randperm(total, generator=generator)[: min(rows, total)].sort().values
        local = torch.arange(len(index))
        fresh = compute_split(teacher, [(inputs(split, index), None, local)], layers, topk)
        pairs = [("logits", stored.dense_logits(index), fresh.dense_logits(local))]
        pairs += [(f"features/{k}", v[index], fresh.features[k]) for k, v in sorted(stored.features.items())]
        if stored.members is not None and fresh.members is not None:
            pairs.append(("members", stored.members[index], fresh.members))
        for name, kept, now in pairs:
            kept, now = kept.float(), now.float()
            if kept.shape != now.shape:
                raise OutputsMismatchError(f"the '{split}' split's {name} have shape {tuple(kept.shape)[1:]} per row, "
                                           f"but the teacher gives {tuple(now.shape)[1:]}")
            bad = ~torch.isclose(kept, now, rtol=tolerance, atol=tolerance)  # NaN against a number: a mismatch
            gap = (kept - now).abs()  # NaN where both are the same infinity (isclose: equal) or one is NaN
            difference = torch.where(bad, gap.nan_to_num(float("inf")), gap.nan_to_num(0.0))
            bad_rows = bad.reshape(len(index), -1).any(dim=1)
            if bool(bad_rows.any()):
                shown = ", ".join(str(int(i)) for i in index[bad_rows][:5])
                raise OutputsMismatchError(
                    f"{int(bad_rows.sum())} of {len(index)} rows of the '{split}' split checked against the teacher "
                    f"differ from what it computes ({name}, rows {shown}{' ...' if int(bad_rows.sum()) > 5 else ''}; "
                    f"largest difference {float(difference.max()):.3g}, tolerance "
                    f"{tolerance:g}): the file was edited after it was written (its checksums rewritten to match) "
                    "or computed by another teacher")
            worst = max(worst, float(difference.max()) if difference.numel() else 0.0)
        checked += len(index)
    store.verification = {"rows": checked, "seed": seed, "max_abs_diff": worst, "tolerance": tolerance,
                          "seconds": round(time.perf_counter() - started, 4)}
    return store.verification


# -- the shared cache ---------------------------------------------------------------
def cache_key(identity: Mapping[str, Any]) -> str:
    """Cache entry name: a hash of the identity (teacher hash, data fingerprint, transform, layers)."""
    payload = {name: identity.get(name) for name in IDENTITY_FIELDS}
    payload["version"] = VERSION
    payload["torch"] = torch.__version__  # another build may round the teacher's forward differently
    payload["num_threads"] = identity.get("num_threads")
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]  # 4 and 4.0: one entry


def cached_store(cache_dir: Path, identity: Mapping[str, Any], compute: Callable[[], TeacherOutputStore],
                 verify: Callable[[TeacherOutputStore], Any] | None = None) -> tuple[TeacherOutputStore, str]:
    """The cached store for ``identity``, computed now by exactly one process if missing or damaged.

    Returns the store and what happened: ``"read"`` or ``"computed"``. ``verify`` checks a file
    that was read against the teacher (:func:`verify_against_teacher`). A file that fails its
    checks, checksums or teacher, is moved aside (kept for inspection, never used) and computed
    again: the outputs this run needs are the teacher's, and it is at hand to compute them.
    """
    folder = cache_dir / cache_key(identity)
    path = folder / CACHE_FILE

    def read() -> TeacherOutputStore:
        store = _checked(read_store(path, "cached teacher outputs"), identity, path)
        if verify is not None:
            try:
                verify(store)
            except OutputsMismatchError as err:
                raise OutputsMismatchError(f"cached teacher outputs {path}: {err}.") from None
        return store

    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / ".lock"))
        lock.acquire()
    except OSError as err:
        if path.is_file():  # a read-only shared cache still serves what it holds, once it passes its checks
            try:
                return read(), "read"
            except DamagedOutputsError as damaged:
                raise DamagedOutputsError(f"{damaged} This cache folder is not writable, so it cannot be computed "
                                          f"again here: delete {folder} (its owner can), or point KDEXP_CACHE_DIR "
                                          "at a writable cache.") from None
        raise storage_error(err, folder, "teacher-output cache folder") from err
    try:  # one writer; the others wait here, then read
        if path.is_file():
            try:
                return read(), "read"
            except DamagedOutputsError as err:
                aside = path.with_name(f"damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.pt")
                os.replace(path, aside)
                log.warning("%s Moved it to %s; computing the teacher outputs again.", err, aside)
        store = compute()
        save_store(path, store, "teacher-output cache")
        log.info("Teacher outputs computed in %.1f s and cached in %s", store.manifest.get("seconds", 0.0), path)
        return read_store(path, "cached teacher outputs"), "computed"  # the memory-mapped copy every run shares
    finally:
        lock.release()


def _checked(store: TeacherOutputStore, identity: Mapping[str, Any], path: Path) -> TeacherOutputStore:
    problems = identity_mismatch(store, identity)
    if problems:  # the key is a hash of these fields, so this means a file was put under the wrong name
        raise DamagedOutputsError(f"cached teacher outputs {path} belong to another teacher or data set "
                                  f"({'; '.join(problems)}).")
    return store
