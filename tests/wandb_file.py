"""Read an offline W&B run file (``run-*.wandb``) in tests, without a server.

W&B writes its run records in the LevelDB log format: a 7-byte file header (``:W&B``,
a magic number, a version), then 32 KiB blocks of chunks, each with a 7-byte header
(CRC32, length, type: 1 full, 2 first, 3 middle, 4 last); a record is a serialised
``wandb_internal_pb2.Record``. wandb 0.31 ships no Python reader of its own.
"""

from __future__ import annotations

import glob
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7


def records(path: str | Path) -> Iterator[Any]:
    """Every record of the run file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = 7, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        pos += HEADER
        chunk = data[pos:pos + length]
        pos += length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(folder: str | Path) -> dict[str, Any]:
    """The offline W&B run under ``folder`` (a kdexp run folder): its name, group, job type, tags,
    config keys, history rows (``_``-keys dropped) and exit code."""
    files = glob.glob(str(Path(folder) / "wandb" / "offline-run-*" / "*.wandb"))
    assert len(files) == 1, f"expected one offline W&B run under {folder}, found {files}"
    run: dict[str, Any] = {"history": [], "config_keys": set()}
    for record in records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.update(name=r.display_name, group=r.run_group, job_type=r.job_type, tags=list(r.tags))
            run["config_keys"] |= {item_key(i) for i in r.config.update}
        elif kind == "config":
            run["config_keys"] |= {item_key(i) for i in record.config.update}
        elif kind == "history":
            run["history"].append({item_key(i): i.value_json for i in record.history.item
                                   if not item_key(i).startswith("_")})
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run
