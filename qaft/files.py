"""Files every stage writes: atomically (beside the target, then renamed into place) and as strict JSON.

A kill leaves the previous version of a file or folder or the new one, never half of one: :func:`atomic_write`
and :func:`atomic_file` write a file, :func:`atomic_folder` a folder (an export, a merged model), beside the
target under a temporary name, and rename it into place only once it is whole and on disk. The temporary name
says whose it is: ``.<name>.tmp-<pid>@<host>`` (:data:`TMP_MARK`). A writer killed mid-write (even by SIGKILL,
which no ``finally`` survives) leaves that name behind; :func:`remove_stale_temporaries` removes it at the next
start, and never the temporary of a writer still running: one of this host whose process is alive, or one of
another host (whose processes cannot be asked) unless the caller owns the folder (holds its lock).
JSON never holds bare ``NaN`` / ``Infinity`` (other parsers reject them): non-finite numbers become ``null``.

What is renamed into place gets the mode the user's umask gives a new file or folder (0644 / 0755 under umask
022; :func:`umask_modes`), whatever mode its writer chose: ``safetensors`` and :mod:`tempfile` create theirs 0600
/ 0700, which would hide a model in a shared cluster folder from everyone else.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TMP_MARK = ".tmp-"
OLD_TAG = "~old"  # a folder's previous version, moved aside for the instant its replacement is renamed in
HOST = re.sub(r"[^\w.-]", "_", socket.gethostname()) or "localhost"
# ".<target>[~old].tmp-<pid>[@<host>]": names from before the host was added have none (taken as this host's)
_TEMPORARY = re.compile(rf"^\.(?P<target>.+?)(?:{OLD_TAG})?{re.escape(TMP_MARK)}(?P<pid>\d+)(?:@(?P<host>[\w.-]+))?$")
_ACTIVE: set[Path] = set()  # this process's temporaries still being written (its own pid does not say that)


def temporary_path(path: Path | str, tag: str = "") -> Path:
    """The name this process writes ``path`` under before renaming it into place."""
    path = Path(path)
    return path.with_name(f".{path.name}{tag}{TMP_MARK}{os.getpid()}@{HOST}")


def _key(path: Path) -> Path:
    return path.parent.resolve() / path.name


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink(missing_ok=True)


@contextmanager
def _claimed(tmp: Path) -> Iterator[Path]:
    """``tmp``, marked as in use by this process while the block runs and removed after it (if still there)."""
    key = _key(tmp)
    _ACTIVE.add(key)
    try:
        _remove(tmp)  # left by an earlier process that had this pid
        yield tmp
    finally:
        _remove(tmp)
        _ACTIVE.discard(key)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(path: Path) -> None:
    """Flush ``path`` (a file, or a folder and everything in it) to disk before it is renamed into place: else
    a power cut could leave the new name pointing at blocks never written."""
    if path.is_dir():
        for folder, _, files in os.walk(path):
            for name in files:
                _fsync(Path(folder) / name)
            _fsync(Path(folder))
    else:
        _fsync(path)


def umask_modes() -> tuple[int, int]:
    """``(file mode, folder mode)`` that this process's umask gives a newly created file and folder."""
    try:  # Linux reports it without changing it; os.umask can only read it by setting it
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("Umask:"))
        mask = int(line.split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask, 0o777 & ~mask


def apply_umask(path: Path | str) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes the umask gives new ones
    (:func:`umask_modes`); symbolic links are left alone."""
    path = Path(path)
    file_mode, folder_mode = umask_modes()
    if path.is_symlink():
        return
    if not path.is_dir():
        os.chmod(path, file_mode)
        return
    os.chmod(path, folder_mode)
    for folder, dirs, files in os.walk(path):
        for name in dirs:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), folder_mode)
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), file_mode)


def _install(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``. A file replaces in one atomic rename; a folder (or a file where a folder is)
    cannot, so the old one is first moved aside under a temporary name: a kill in between leaves no ``path``
    (the previous version is then stale debris), never a mixture of two."""
    apply_umask(tmp)
    if not os.path.lexists(path) or not (tmp.is_dir() or (path.is_dir() and not path.is_symlink())):
        os.replace(tmp, path)
    else:
        with _claimed(temporary_path(path, OLD_TAG)) as old:
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
    _fsync(path.parent)


@contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """A temporary path beside ``path`` for any writer to create a file at; on success the file is flushed and
    renamed to ``path`` (replacing what was there), on any error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _claimed(temporary_path(path)) as tmp:
        yield tmp
        _sync_tree(tmp)
        _install(tmp, path)


@contextmanager
def atomic_folder(path: Path | str) -> Iterator[Path]:
    """An empty temporary folder beside ``path`` to write into; on success flushed and renamed to ``path``
    (replacing what was there), on any error removed with everything in it.

    >>> with atomic_folder(run_dir / "export_qaft") as tmp:  # doctest: +SKIP
    ...     save_quantized(model, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _claimed(temporary_path(path)) as tmp:
        tmp.mkdir()
        yield tmp
        _sync_tree(tmp)
        _install(tmp, path)


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write`` on a temporary file beside ``path``, then rename it into place (removed on any error)."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sha256_file(path: Path | str) -> str:
    """The SHA-256 of a file's contents, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_stale(path: Path, targets: set[str] | None, owned: bool) -> bool:
    match = _TEMPORARY.match(path.name)
    if match is None or (targets is not None and match["target"] not in targets) or _key(path) in _ACTIVE:
        return False
    if owned:
        return True
    if (match["host"] or HOST) != HOST:
        return False  # its writer may be running on that host
    pid = int(match["pid"])
    return pid == os.getpid() or not _alive(pid)  # this pid, not active: an earlier process's that had it


def remove_stale_temporaries(folder: Path | str, targets: Iterable[str] | None = None,
                             owned: bool = False) -> list[Path]:
    """Delete what killed writers left in ``folder`` (temporary files and folders); returns what was deleted.

    A temporary is stale when the process that wrote it is gone: on this host, its pid is not alive (a killed
    child that is not yet reaped still counts as alive). A temporary of another host is left alone unless
    ``owned`` (the caller holds the folder exclusively, e.g. its run lock: every temporary not being written by
    this process is stale). ``targets`` limits the sweep to the temporaries of those names (``export.gguf``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = None if targets is None else set(targets)
    stale = [p for p in folder.glob(f".*{TMP_MARK}*") if _is_stale(p, names, owned)]
    for p in stale:
        _remove(p)
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
