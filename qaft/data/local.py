"""Local data files read by qaft itself, once, with the SHA-256 of the very bytes that were parsed.

A run's record must be able to say what it trained on. ``datasets``' loaders keep a parsed copy of a local file
in a cache keyed by its path and modification time, so a file rewritten with its old modification time restored
(``cp -p``, ``rsync -a``, ``os.utime``) is served from the stale copy: a run that names the new contents would
train on the old ones. qaft therefore parses local text, JSON and JSON-lines files itself (they are simple) and
hands ``datasets`` only the parsed rows (:func:`records_dataset`, an in-memory dataset with no cache files).

Every reader takes ``read``, a dict it fills with ``{path: sha256}`` of each file it opened (the path as opened,
the hex digest of exactly the bytes parsed, as ``sha256sum`` prints it), so that hash and data can never come
from two different reads of a file being edited. The data modules keep theirs as ``data_sha256``.

:func:`content_sha256` is the same digest for a path a config names before anything is read (the run identity,
the generated-data cache's model key). It is computed once per process and file version: remembered under the
file's device, inode, size, modification *and change* time. The change time (ctime) is set by the kernel on
every write and on every ``utime`` call, so restoring the modification time does not fool it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qaft.files import sha256_file

# A split's file in a folder source: its stem holds the split's name (or the short form, ``valid``).
if TYPE_CHECKING:  # imported where used: a GPU check imports qaft.data on machines without `datasets`
    from datasets import Dataset

SPLIT_NAMES = {"train": "train", "validation": "valid", "test": "test"}
JSON_SUFFIXES = (".json", ".jsonl")


# (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) -> sha256: this process's digests of unchanged files.
_DIGESTS: dict[tuple[int, ...], str] = {}


def _version(path: Path) -> tuple[int, ...]:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _file_sha256(path: Path) -> str:
    key = _version(path)
    if key in _DIGESTS:
        return _DIGESTS[key]
    digest = sha256_file(path)
    if _version(path) == key:  # a file written while it was read is hashed again next time
        _DIGESTS[key] = digest
    return digest


def content_sha256(path: Path | str) -> str | dict[str, str]:
    """A file's SHA-256 (hex, as ``sha256sum`` prints it), or for a folder ``{name: sha256}`` of every file
    directly in it (qaft's loaders and ``from_pretrained`` read no subfolder)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return {p.name: _file_sha256(p) for p in sorted(path.iterdir()) if p.is_file()}
    return _file_sha256(path)


def read_bytes(path: Path, read: dict[str, str] | None = None) -> bytes:
    """The whole file; its SHA-256 goes into ``read[str(path)]``."""
    data = Path(path).read_bytes()
    if read is not None:
        read[str(path)] = hashlib.sha256(data).hexdigest()
    return data


def read_text(path: Path, read: dict[str, str] | None = None) -> str:
    """The file as UTF-8 text (a file that is not UTF-8 is a one-line ``ValueError``)."""
    data = read_bytes(path, read)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def parse_json_records(path: Path, text: str) -> list[Any]:
    """The values of a JSON file's ``text`` (an array, or one value) or of a JSON-lines file's, in file order
    (a line that is not JSON: a one-line ``ValueError`` naming it)."""
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        pass
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number} is not JSON ({err.msg}); expected a JSON array of "
                             "objects or one JSON object per line") from None
    return records


def json_records(path: Path, read: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The objects of a JSON file (an array of objects, or one object) or a JSON-lines file, in file order.

    Whole-file JSON is tried first, whatever the suffix, as ``datasets``' JSON loader does.
    """
    records = parse_json_records(path, read_text(path, read))
    if not records:
        raise ValueError(f"{path}: holds no records")
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):  # bad input, one line like every data error: ValueError
            raise ValueError(f"{path}: record {number} is a {type(record).__name__}, not a JSON object")  # noqa: TRY004
    return records


def records_dataset(records: list[dict[str, Any]]) -> Dataset:
    """An in-memory ``datasets.Dataset`` of ``records``: every field any record has is a column (missing: None).

    (``Dataset.from_list`` would take the columns of the first record only.)
    """
    fields = list(dict.fromkeys(k for r in records for k in r))
    from datasets import Dataset

    return Dataset.from_dict({k: [r.get(k) for r in records] for k in fields})


def split_files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """A folder source's file per split: the first (by name) with one of ``suffixes`` whose stem holds the
    split's name or short form (``train``, ``valid``/``validation``, ``test``); splits without one are left out."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix in suffixes)
    found = {}
    for split, short in SPLIT_NAMES.items():
        match = [p for p in files if short in p.stem or split in p.stem]
        if match:
            found[split] = match[0]
    return found


__all__ = ["JSON_SUFFIXES", "SPLIT_NAMES", "content_sha256", "json_records", "read_bytes", "read_text",
           "records_dataset", "split_files"]
