"""The run folder: the one owner of what a run leaves on disk, and of reading it back.

``qaft-train`` writes one folder per run (its name: the readable run name and the config's identity digest,
:mod:`qaft.training.identity`); every later stage (``qaft-eval``, ``qaft-export``, ``qaft-report``) reads it
through :class:`RunFolder`, so the file names, the statuses and the rules for reading them live here only:

* ``config.yaml``: the resolved config (reruns and reports read this, not the command line);
* ``metrics.jsonl``: one JSON object per optimizer step, each appended by one ``write`` call (a kill never
  leaves half a row; an unreadable row is corruption, never skipped);
* ``record.json``: the status (:class:`Status`), what ran, its final metrics and timings, the results
  ``qaft-eval`` added (``eval``), and ``sha256``, the digest of all that (a hand edit makes the record corrupt);
* ``merged_model/``: the merged model (safetensors only; :mod:`qaft.deploy.merged`), staged as
  ``.merged_model.pending`` until the run ends ``ok``;
* ``checkpoints/last.ckpt``: Lightning's training checkpoint (tensors only), what a rerun resumes;
* ``item_scores/<metric key>.jsonl``: the per-item scores behind each reported metric (below).

Item scores. Every perplexity and accuracy a record reports comes with the scores of its items, one JSON object
a line: ``{"item", "nll_sum", "tokens"}`` per window for a perplexity (``exp(sum nll_sum / sum tokens)`` is the
recorded value, computed from these very numbers), ``{"item", "correct"}`` per document for an accuracy (their
mean is the recorded value); ``item`` is the window index or lm-eval's document id, the same across runs and
seeds scored on the same data. ``record["item_scores"]`` maps the metric's key as a report reads it
(``metrics.ppl_merged``, ``metrics.deployed``, ``metrics.lm_eval.results.quiz_mc:0.scores.acc``,
``eval.merged.perplexity.value``) to the file's name relative to the run folder, ``record["item_scores_sha256"]``
each file's digest (checked on reading). An archive of records (``qaft-report archive=``) embeds the rows in
each record under ``item_scores_rows`` (file name -> rows; :meth:`RunFolder.archived_record`), outside the
record's own digest and checked against ``item_scores_sha256``: :func:`read_item_scores` reads either.

A record or config that cannot be read, or whose fields have the wrong type, raises :class:`CorruptRun` with one
line naming the file: a report marks such a folder ``corrupt`` and goes on. Paths handed out are never symbolic
links (a ``merged_model`` linked to another run's model would be scored as this run's). Every file is written
beside its target and renamed into place (:mod:`qaft.files`); an ``ok`` record is final: nothing replaces it with
another status (``resume=never`` removes it first, on purpose).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from qaft.files import atomic_write, dumps, remove_stale_temporaries, write_json
from qaft.item_scores import ITEM_SCORES_DIR, BadItemScores, item_scores_name, item_scores_text, parse_item_scores
from qaft.run_lock import EXIT_BUSY, LOCK_FILE, RunBusy, RunLock

RECORD_FILE = "record.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"  # the last qaft-eval of the run (its results also go into the record, under eval)
MERGED_MODEL = "merged_model"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
PENDING = ".pending"  # suffix of a folder staged in the run folder until the run ends ok
ITEM_SCORES = "item_scores"  # record: metric key -> file name relative to the run folder
ITEM_SCORES_SHA256 = "item_scores_sha256"  # record: file name -> SHA-256 of the file's bytes
ITEM_SCORES_ROWS = "item_scores_rows"  # an archived record: file name -> its rows (not in the record's digest)


class Status(str, Enum):
    """A run's status: the first four are what a record says; the last two, what a reader finds instead."""

    OK = "ok"  # trained exactly as configured, to the last step, to finite numbers, on the data it names
    FAILED = "failed"
    DIVERGED = "diverged"
    INTERRUPTED = "interrupted"
    INCOMPLETE = "incomplete"  # a config but no record: a run that never ended (or is still running)
    CORRUPT = "corrupt"  # a record or config that cannot be read, or is ill-typed

    def __str__(self) -> str:
        return self.value


RECORDED = (Status.OK, Status.FAILED, Status.DIVERGED, Status.INTERRUPTED)


DIGEST_KEY = "sha256"  # a record's digest of itself (records written before it existed carry none)


class CorruptRun(ValueError):
    """A run folder's file that cannot be read or holds the wrong types (one line, naming the file)."""


# Record fields a reader relies on, with the types they must have where present (None allowed).
_RECORD_TYPES: dict[str, tuple[type, ...]] = {
    "metrics": (dict,), "eval": (dict,), "timings": (dict,), "method_config": (dict,), "method": (str,),
    "preset": (str,), "model": (str,), "data": (str,), "experiment": (str,), "scale": (str,), "identity": (str,),
    "bits": (int,), "group_size": (int,), "seed": (int,), "steps": (int,), "finished": (str,),
    "item_scores": (dict,), "item_scores_sha256": (dict,),
}


def record_digest(record: dict[str, Any]) -> str:
    """SHA-256 of a record's canonical JSON without its own digest: written into the record, checked on reading."""
    body = {k: v for k, v in record.items() if k not in (DIGEST_KEY, ITEM_SCORES_ROWS)}
    return hashlib.sha256(dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_record(record: Any, where: str = RECORD_FILE) -> dict[str, Any]:
    """``record`` if it is a well-typed run record (see :data:`_RECORD_TYPES`) whose digest, where it carries one,
    matches its contents; else :class:`CorruptRun`."""
    if not isinstance(record, dict):
        raise CorruptRun(f"{where}: not a JSON object ({type(record).__name__})")
    if DIGEST_KEY in record and record[DIGEST_KEY] != record_digest(record):
        raise CorruptRun(f"{where}: its contents do not match the digest qaft wrote with them (edited since?)")
    if record.get("status") not in {s.value for s in RECORDED}:
        raise CorruptRun(f"{where}: status {record.get('status')!r} is not one of {[s.value for s in RECORDED]}")
    for key, types in _RECORD_TYPES.items():
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            raise CorruptRun(f"{where}: {key!r} is a {type(value).__name__}, not a {types[0].__name__}")
    return record


def _field(record: dict[str, Any], key: str) -> dict[str, Any]:
    """A record's item-score map, empty where absent (a report frame's row holds NaN for a field other rows have)."""
    value = record.get(key)
    return value if isinstance(value, dict) else {}


def read_item_scores(record: dict[str, Any], key: str, run_dir: Path | str | None = None) -> list[dict[str, Any]]:
    """The item scores of metric ``key`` (e.g. ``metrics.ppl_merged``): from the rows an archived record embeds,
    else from the run folder (``run_dir``, else the record's ``run_dir`` as its reader set it: a store's reader sets
    the folder's path, since ``record.json`` holds only the folder's name); ``KeyError`` where the record names none
    for ``key``."""
    name = _field(record, ITEM_SCORES)[key]
    sha256 = _field(record, ITEM_SCORES_SHA256).get(name)
    embedded = _field(record, ITEM_SCORES_ROWS)
    if name in embedded:
        try:
            return parse_item_scores(item_scores_text(embedded[name]), f"{ITEM_SCORES_ROWS}[{name!r}]", sha256)
        except BadItemScores as err:
            raise CorruptRun(str(err)) from None
    return RunFolder(run_dir or record["run_dir"]).read_item_scores(key, record)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptRun(f"{path}: unreadable record ({type(err).__name__}: {err})") from None


class RunFolder:
    """One run folder: its paths, and reading / writing its record, config and per-step metrics."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # --- paths ------------------------------------------------------------------------------------------
    def _inside(self, name: str) -> Path:
        path = self.path / name
        if path.is_symlink():
            raise CorruptRun(f"{path} is a symbolic link: a run folder holds its own files, never links to others")
        return path

    @property
    def record_path(self) -> Path:
        return self._inside(RECORD_FILE)

    @property
    def config_path(self) -> Path:
        return self._inside(CONFIG_FILE)

    @property
    def metrics_path(self) -> Path:
        return self._inside(METRICS_FILE)

    @property
    def eval_path(self) -> Path:
        return self._inside(EVAL_FILE)

    @property
    def merged_path(self) -> Path:
        return self._inside(MERGED_MODEL)

    @property
    def pending_merged_path(self) -> Path:
        """Where the merged model is written during a run, renamed to :attr:`merged_path` once it ends ok."""
        return self._inside(f".{MERGED_MODEL}{PENDING}")

    @property
    def checkpoints(self) -> Path:
        return self._inside(CHECKPOINTS)

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / LAST_CHECKPOINT

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE

    def remove_debris(self) -> list[Path]:
        """Delete what killed writers left (temporary files and folders, the staged merged model of a run that did
        not end ok); call it only while holding the folder's lock, when no writer of this folder is alive."""
        found = [p for folder in (self.path, self.path / CHECKPOINTS, self.path / ITEM_SCORES_DIR)
                 for p in remove_stale_temporaries(folder, owned=True)]
        pending = self.path / f".{MERGED_MODEL}{PENDING}"
        if pending.is_dir() and not pending.is_symlink():
            shutil.rmtree(pending)
            found.append(pending)
        return found

    def lock(self) -> RunLock:
        """The folder's lock (not yet acquired; ``with folder.lock():``)."""
        return RunLock(self.path)

    def has_record(self) -> bool:
        return self.record_path.is_file()

    def has_config(self) -> bool:
        return self.config_path.is_file()

    # --- record -----------------------------------------------------------------------------------------
    def read_record(self) -> dict[str, Any] | None:
        """The record, ``None`` where there is none; :class:`CorruptRun` where it is unreadable or ill-typed."""
        path = self.record_path
        if not path.is_file():
            return None
        return check_record(_read_json(path), str(path))

    def record(self) -> dict[str, Any]:
        """The record of a folder that must be a run folder (``FileNotFoundError`` otherwise)."""
        record = self.read_record()
        if record is None:
            raise FileNotFoundError(f"{self.path / RECORD_FILE} not found: the folder must be a qaft-train run folder")
        return record

    def status(self) -> Status:
        """The folder's status as a reader finds it (``incomplete`` without a record, ``corrupt`` if unreadable)."""
        try:
            record = self.read_record()
        except CorruptRun:
            return Status.CORRUPT
        return Status.INCOMPLETE if record is None else Status(record["status"])

    def write_record(self, record: dict[str, Any]) -> Path:
        """Write ``record`` atomically; an ``ok`` record already there is final (``PermissionError``)."""
        record = json.loads(dumps(record))  # as it will read back (non-finite numbers as null)
        record[DIGEST_KEY] = record_digest(record)
        check_record(record, "the record to write")
        if record["status"] != Status.OK and self.status() == Status.OK:
            raise PermissionError(f"{self.record_path} already says ok: a finished run's record is not replaced "
                                  f"by {record['status']!r}")
        return write_json(self.record_path, record)

    def remove_record(self) -> None:
        self.record_path.unlink(missing_ok=True)

    def add_eval(self, key: str, results: dict[str, Any], items: dict[str, list[dict[str, Any]]] | None = None) -> Path:
        """Put ``results`` under ``record["eval"][key]`` and name their item scores (``items``: metric key -> rows,
        written first), keeping everything else in the record."""
        record = self.record()
        record.setdefault("eval", {})[key] = results
        if items:
            record |= self.store_item_scores(items, record=record)
        return self.write_record(record)

    # --- item scores ------------------------------------------------------------------------------------
    def write_item_scores(self, key: str, rows: list[dict[str, Any]]) -> tuple[str, str]:
        """Write metric ``key``'s item scores (atomically); returns the file's name relative to the run folder and
        its SHA-256, the record's ``item_scores[key]`` and ``item_scores_sha256[name]``."""
        name, data = item_scores_name(key), item_scores_text(rows).encode()
        atomic_write(self._inside(ITEM_SCORES_DIR) / Path(name).name, lambda f: f.write(data))
        return name, hashlib.sha256(data).hexdigest()

    def read_item_scores(self, key: str, record: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Metric ``key``'s item scores from this folder, checked against the record's digest; ``KeyError`` where the
        record names none for ``key``, :class:`CorruptRun` where the file is missing, edited or ill-formed."""
        record = self.record() if record is None else record
        name = _field(record, ITEM_SCORES)[key]
        if Path(name).parent != Path(ITEM_SCORES_DIR) or name != item_scores_name(Path(name).stem):
            raise CorruptRun(f"{self.record_path}: item scores of {key!r} at {name!r}, outside {ITEM_SCORES_DIR}/")
        path = self._inside(ITEM_SCORES_DIR) / Path(name).name
        if path.is_symlink() or not path.is_file():
            raise CorruptRun(f"{path}: the item scores the record names are missing")
        try:
            return parse_item_scores(path.read_text(), str(path), _field(record, ITEM_SCORES_SHA256).get(name))
        except BadItemScores as err:
            raise CorruptRun(str(err)) from None

    def store_item_scores(self, items: dict[str, list[dict[str, Any]]], aliases: dict[str, str] | None = None,
                          record: dict[str, Any] | None = None) -> dict[str, dict[str, str]]:
        """Write each metric's item scores (``items``: metric key -> rows) and return the record's two fields,
        ``item_scores`` and ``item_scores_sha256``, with those of ``record`` (if given) kept; ``aliases`` name
        another key's file under a second key (``metrics.deployed`` -> ``metrics.ppl_merged``) without a copy."""
        names, digests = dict(_field(record or {}, ITEM_SCORES)), dict(_field(record or {}, ITEM_SCORES_SHA256))
        for key, rows in items.items():
            names[key], digests[item_scores_name(key)] = self.write_item_scores(key, rows)
        for alias, key in (aliases or {}).items():
            names[alias] = names[key]
        return {ITEM_SCORES: names, ITEM_SCORES_SHA256: digests}

    def archived_record(self, record: dict[str, Any] | None = None) -> dict[str, Any]:
        """The record with its item scores' rows embedded (``item_scores_rows``: file name -> rows), for an archive
        that must stand without the run folder."""
        record = self.record() if record is None else record
        names = _field(record, ITEM_SCORES)
        rows = {n: self.read_item_scores(k, record) for k, n in sorted(names.items(), key=lambda kv: kv[1])}
        return {**record, ITEM_SCORES_ROWS: rows} if rows else dict(record)

    # --- config -----------------------------------------------------------------------------------------
    def write_config(self, text: str) -> Path:
        return atomic_write(self.config_path, lambda f: f.write(text.encode()))

    def read_config(self) -> dict[str, Any] | None:
        """The resolved config as plain data (``None`` without one; :class:`CorruptRun` if not a YAML mapping)."""
        path = self.config_path
        if not path.is_file():
            return None
        try:
            cfg = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise CorruptRun(f"{path}: unreadable ({type(err).__name__})") from None
        if not isinstance(cfg, dict):
            raise CorruptRun(f"{path}: not a YAML mapping ({type(cfg).__name__})")
        return cfg

    # --- per-step metrics -------------------------------------------------------------------------------
    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one row in a single ``write``: a kill leaves the row whole or absent."""
        line = (dumps(row) + "\n").encode()
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl``; :class:`CorruptRun` names the first row that is not a JSON object with
        a whole-number ``step`` (a row is never dropped silently)."""
        path = self.metrics_path
        rows = []
        for number, line in enumerate(path.read_text().splitlines() if path.is_file() else [], 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            step = row.get("step") if isinstance(row, dict) else None
            if isinstance(step, bool) or not isinstance(step, int):
                raise CorruptRun(f"{path} line {number}: not a metrics row with a whole-number step: {line[:80]!r}")
            rows.append(row)
        return rows

    def trim_metrics(self, step: int) -> None:
        """Keep rows up to ``step``: a killed run logged steps its last checkpoint does not hold."""
        if self.metrics_path.is_file():
            text = "".join(dumps(r) + "\n" for r in self.read_metrics() if r["step"] <= step)
            atomic_write(self.metrics_path, lambda f: f.write(text.encode()))

    # --- the merged model -------------------------------------------------------------------------------
    def merged_model(self, record: dict[str, Any] | None = None) -> Path:
        """The run's merged model folder (its own, whatever path the record holds); ``ValueError`` where the run
        did not end ok or saved none."""
        record = self.record() if record is None else record
        saved = record.get("metrics", {}).get("merged_model_path")
        if record.get("status") != Status.OK or not saved:
            raise ValueError(f"run {self.path} has no saved merged model (status={record.get('status')!r}; "
                             "train with save_model=true)")
        name = Path(saved).name  # older records hold absolute paths: only the name counts
        if name.endswith(".pt"):
            raise ValueError(f"{self.path / name}: a pickled model from an older qaft; it is not loaded (a pickle "
                             "can run code): rerun the training with save_model=true")
        path = self._inside(name)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: the run's merged model is missing")
        return path


__all__ = [
    "CHECKPOINTS", "CONFIG_FILE", "CorruptRun", "EVAL_FILE", "EXIT_BUSY", "ITEM_SCORES", "ITEM_SCORES_DIR",
    "ITEM_SCORES_ROWS", "ITEM_SCORES_SHA256", "LAST_CHECKPOINT", "LOCK_FILE", "MERGED_MODEL", "METRICS_FILE",
    "RECORDED", "RECORD_FILE", "RunBusy", "RunFolder", "RunLock", "Status", "check_record", "item_scores_name",
    "item_scores_text", "parse_item_scores", "read_item_scores",
]
