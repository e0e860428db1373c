"""The run store as a frame: one row per run, from run folders, an archive or wandb.

Runs are found by their records, not their dates: every folder under the run store that holds a
``record.json`` (or only a ``config.yaml``: a run that never finished) is one row; a wandb project can be
read the same way.

An archive (``archive=``) holds each record with the rows of its item scores embedded (``item_scores_rows``,
:meth:`qaft.run_folder.RunFolder.archived_record`), so tables and verdicts over items regenerate from it without
the run folders; :func:`qaft.run_folder.read_item_scores` reads them from a record of either kind. A folder whose
record or config cannot be read is a ``corrupt`` row, named on stderr: a report never stops on one.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from qaft.evaluation.deployed import deployed_perplexity
from qaft.run_folder import (
    CONFIG_FILE,
    ITEM_SCORES,
    ITEM_SCORES_ROWS,
    ITEM_SCORES_SHA256,
    RECORD_FILE,
    CorruptRun,
    RunFolder,
    Status,
    check_record,
    read_item_scores,
)

WANDB_FOLDER = "wandb"  # logger=wandb's files inside a run folder (an online run's files/config.yaml is no run)


def warn(message: str) -> None:
    """Reports go on past a bad record, but say so (stderr, one line each)."""
    print(f"qaft-report: {message}", file=sys.stderr)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = value


def _row(record: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    _flatten("", {k: v for k, v in record.items() if k not in ("traceback", "environment", ITEM_SCORES_ROWS)}, row)
    # whole, beside their flattened keys: read_item_scores(row, key) reads a frame's row as it reads a record
    row |= {k: record[k] for k in (ITEM_SCORES, ITEM_SCORES_SHA256, ITEM_SCORES_ROWS) if k in record}
    deployed = deployed_perplexity(record.get("metrics") or {})
    if deployed is not None:
        row["metrics.deployed"] = deployed
    row["wakv"] = wakv(row)
    return row


def wakv(row: dict[str, Any]) -> str:
    """The W-A-KV bits of a run, e.g. ``4-8-8`` (16: not quantized); records written before activation and KV
    quantization existed have no ``act_bits`` / ``kv_bits`` and were weight-only."""
    act, kv = (row.get(f"method_config.{k}", 16) for k in ("act_bits", "kv_bits"))
    return f"{row.get('bits')}-{act}-{kv}"


def _incomplete(folder: RunFolder, status: Status = Status.INCOMPLETE) -> dict[str, Any]:
    """A run with a config but no (readable) record: the keys a report selects on, from its ``config.yaml``."""
    row: dict[str, Any] = {"status": status.value, "run_dir": str(folder.path)}
    try:
        cfg = folder.read_config()
    except CorruptRun as err:
        warn(f"{err}; its cell is marked {Status.CORRUPT.value!r}")
        return {**row, "status": Status.CORRUPT.value}
    if cfg is None:
        return row
    nodes = {k: cfg.get(k) if isinstance(cfg.get(k), dict) else {} for k in ("method", "scale", "model", "data")}
    method = nodes["method"]
    row |= {"method": method.get("name"), "bits": method.get("bits"), "group_size": method.get("group_size"),
            "seed": cfg.get("seed"), "experiment": cfg.get("experiment_name"), "scale": nodes["scale"].get("name"),
            "model": nodes["model"].get("name_or_path"), "data": nodes["data"].get("name")}
    _flatten("method_config", {k: v for k, v in method.items() if k != "name"}, row)
    row["wakv"] = wakv(row)
    return row


def _folder_row(folder: RunFolder) -> dict[str, Any]:
    """A run folder's row: its record (read from here, not where it was written: run folders may be moved), or
    ``incomplete`` / ``corrupt`` with what its config says."""
    try:
        record = folder.read_record()
    except CorruptRun as err:
        warn(f"{err}; its cell is marked {Status.CORRUPT.value!r}")
        return _incomplete(folder, Status.CORRUPT)
    return _incomplete(folder) if record is None else _row({**record, "run_dir": str(folder.path)})


def load_runs(root: str | Path) -> pd.DataFrame:
    """One row per run folder under ``root``: its flattened ``record.json``, or ``status='incomplete'`` with
    the keys of its ``config.yaml`` when it has no record (``corrupt`` where either cannot be read). ``root`` may
    also be an archive written by :func:`archive_runs` (a ``.jsonl`` file, one record per line)."""
    if Path(root).is_file():
        return pd.DataFrame([_row(r) for r in _archived(Path(root))])
    found = {p.parent for name in (CONFIG_FILE, RECORD_FILE) for p in Path(root).rglob(name)}
    folders = sorted(f for f in found if WANDB_FOLDER not in f.relative_to(root).parts and f.name != ".hydra")
    return pd.DataFrame([_folder_row(RunFolder(f)) for f in folders])


def _archived(path: Path) -> list[dict[str, Any]]:
    """The records of an archive (a line that is not a well-typed record, or whose embedded item scores do not
    match their digests, is named on stderr and skipped)."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        where = f"{path} line {number}"
        try:
            if line:
                record = check_record(json.loads(line), where)
                for key in (record.get(ITEM_SCORES) or {}) if ITEM_SCORES_ROWS in record else ():
                    read_item_scores(record, key)  # the embedded rows, checked against item_scores_sha256
                records.append(record)
        except (json.JSONDecodeError, CorruptRun, KeyError, TypeError) as err:
            warn(f"{where}: {err}: skipped" if isinstance(err, (KeyError, TypeError)) else f"{err}: skipped")
    return records


def _read(path: Path) -> dict[str, Any] | None:
    """A record, or None (with a warning naming the file) where it is not a readable, well-typed record."""
    try:
        return RunFolder(path.parent).read_record()
    except CorruptRun as err:
        warn(f"{err}; its cell is marked {Status.CORRUPT.value!r}")
        return None


def _with_items(folder: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The record with its item scores' rows embedded; without them (and a warning) where they cannot be read."""
    try:
        return RunFolder(folder).archived_record(record)
    except (CorruptRun, KeyError, OSError) as err:
        warn(f"{folder}: item scores not archived: {err}")
        return record


def archive_runs(root: str | Path, path: str | Path, where: list[dict[str, Any]] | None = None) -> Path:
    """Every ``record.json`` under ``root`` (those matching any of ``where``, flattened-key filters) as one
    JSON-lines file, sorted, so that a report can be rerun from it without the run folders; each record carries
    the rows of its item scores (``item_scores_rows``, outside its digest), checked when the archive is read."""
    root = Path(root)
    records = (_archived(root) if root.is_file()
               else [_with_items(p.parent, r) for p in sorted(root.rglob(RECORD_FILE)) if (r := _read(p)) is not None])
    if where:
        records = [r for r in records if any(all(_row(r).get(k) in (v if isinstance(v, list) else [v])
                                                 for k, v in w.items()) for w in where)]
    records.sort(key=lambda r: json.dumps({k: r.get(k) for k in ("experiment", "scale", "method", "bits",
                                                                  "group_size", "seed", "run_dir")}))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return path


def load_wandb_runs(source: str | Path) -> pd.DataFrame:
    """The same frame from wandb: a project (``entity/project``) through wandb's API, or, where ``source`` is a
    folder, the wandb run files under it (offline runs, unsynced; :mod:`qaft.reporting.wandb_runs`)."""
    from qaft.reporting.wandb_runs import local_records, project_records

    records = local_records(source) if Path(source).is_dir() else project_records(str(source))
    return pd.DataFrame([_row(record) for record in records])
