"""Run records read back from Weights & Biases: a project through wandb's API, or the files wandb keeps on disk.

``qaft-train logger=wandb`` gives each wandb run the record's descriptive keys and the resolved config as its
config, and the record's outcome (``status``, ``metrics``, ...) as its summary (:mod:`qaft.training.tracking`), so
config plus summary is the record again, and the tables of :mod:`qaft.reporting.tables` come out the same.

On disk, a run (offline, or online before it is synced) is one ``run-<id>.wandb`` file in
``<run folder>/wandb/<offline-run|run>-<time>-<id>/``: wandb's transaction log, a LevelDB-style log of protobuf
``Record`` messages. It is read here with wandb's own message definitions: a 7-byte header (``:W&B``, magic
``0xBEE1``, version 0), then 32 KiB blocks of chunks, each with a 7-byte header (CRC-32C, 2-byte length,
type: full, first, middle or last piece of a record); a block's tail shorter than a chunk header is padding.
Config and summary records are replayed in order (updates, nested keys, removals). The CRC is not checked:
a file cut short by a kill ends at the last whole record, which is all a reader can use anyway.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from qaft.run_folder import Status
from qaft.training.tracking import SUMMARY_KEYS

HEADER, BLOCK, CHUNK = 7, 32 * 1024, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
INCOMPLETE, FAILED = Status.INCOMPLETE.value, Status.FAILED.value
# wandb's run state -> a record status, for runs whose summary has none (stopped before qaft-train wrote it);
# any other state, running or finished without one, is a run without a record
STATES = {"crashed": FAILED, "failed": FAILED, "killed": Status.INTERRUPTED.value}  # keys: wandb's run states


def _chunks(data: bytes) -> Iterator[bytes]:
    """The records of a transaction log, each the concatenation of its pieces."""
    if data[:4] != b":W&B":
        raise ValueError("not a wandb transaction log")
    pos, pieces = HEADER, b""
    while pos + CHUNK <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK])
        body, pos = data[pos + CHUNK:pos + CHUNK + length], pos + CHUNK + length
        if len(body) < length:
            return
        pieces = body if kind in (FULL, FIRST) else pieces + body
        if kind in (FULL, LAST):
            yield pieces
            pieces = b""


def _apply(tree: dict[str, Any], update: Any) -> None:
    path = list(update.nested_key) or [update.key]
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = json.loads(update.value_json)


def _remove(tree: dict[str, Any], item: Any) -> None:
    path = list(item.nested_key) or [item.key]
    for key in path[:-1]:
        tree = tree.get(key, {})
    tree.pop(path[-1], None)


def read_run_file(path: str | Path) -> dict[str, Any]:
    """``{"config", "summary", "exit_code", "name"}`` of a ``.wandb`` file (``exit_code`` None: no exit record)."""
    from wandb.proto import wandb_internal_pb2 as pb

    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    out: dict[str, Any] = {"config": config, "summary": summary, "exit_code": None, "name": None}
    for chunk in _chunks(Path(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(chunk)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["name"] = record.run.display_name
            for item in record.run.config.update:
                _apply(config, item)
        elif kind in ("config", "summary"):
            target = config if kind == "config" else summary
            for item in getattr(record, kind).update:
                _apply(target, item)
            for item in getattr(record, kind).remove:
                _remove(target, item)
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def _plain(value: Any) -> Any:
    return {str(k): _plain(v) for k, v in value.items()} if isinstance(value, Mapping) else value


def as_record(config: Mapping[str, Any], summary: Mapping[str, Any], fallback_status: str) -> dict[str, Any]:
    """A run record from a wandb run's config and summary (``fallback_status`` where the summary has none)."""
    record = {k: _plain(v) for k, v in config.items() if not str(k).startswith("_")}
    record |= {k: _plain(summary[k]) for k in SUMMARY_KEYS if k in summary}
    record.setdefault("status", fallback_status)
    return record


def local_records(root: str | Path) -> list[dict[str, Any]]:
    """The records of every wandb run file under ``root`` (e.g. a run store whose runs used ``logger=wandb``)."""
    records = []
    for path in sorted(Path(root).rglob("run-*.wandb")):
        run = read_run_file(path)
        ended = INCOMPLETE if run["exit_code"] is None else FAILED
        records.append(as_record(run["config"], run["summary"], ended))
    return records


def project_records(project: str) -> list[dict[str, Any]]:
    """The records of every run of a wandb project (``entity/project``), through wandb's public API."""
    import wandb

    return [as_record(run.config, {k: run.summary[k] for k in run.summary.keys()}, STATES.get(run.state, INCOMPLETE))
            for run in wandb.Api().runs(project)]


__all__ = ["as_record", "local_records", "project_records", "read_run_file"]
