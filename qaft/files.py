"""Files every stage writes: atomically (beside the target, then renamed into place) and as strict JSON.

A kill leaves the previous version of a file or the new one, never half of one; a killed writer's temporary
file is recognisable (:data:`TMP_MARK`) and removed by :func:`remove_stale_temporaries`. JSON never holds bare
``NaN`` / ``Infinity`` (other parsers reject them): non-finite numbers become ``null``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TMP_MARK = ".tmp-"


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write`` on a temporary file beside ``path``, then rename it into place (removed on any error)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def sha256_file(path: Path | str) -> str:
    """The SHA-256 of a file's contents, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete what :func:`atomic_write` left in ``folder`` when a process was killed mid-write."""
    stale = [p for p in Path(folder).glob(f".*{TMP_MARK}*") if p.is_file()] if Path(folder).is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def finite_json(value: Any, path: str = "", non_finite: dict[str, str] | None = None) -> Any:
    """``value`` with every non-finite float replaced by ``None``; ``non_finite`` collects ``path -> repr``."""
    if isinstance(value, dict):
        return {k: finite_json(v, f"{path}.{k}" if path else str(k), non_finite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v, f"{path}[{i}]", non_finite) for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        if non_finite is not None:
            non_finite[path] = str(value)
        return None
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON (``NaN``/``Infinity`` would make the file unreadable by other JSON parsers)."""
    return json.dumps(finite_json(value), allow_nan=False, **kwargs)


def write_json(path: Path | str, data: dict[str, Any]) -> Path:
    """Atomic strict-JSON write: a record is never half-written and never holds bare ``NaN``."""
    text = dumps(data, indent=2) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))
