"""Run identity: what a run computes, as a digest of its whole resolved config.

Two commands that compute the same thing map to the same run folder (so a rerun resumes its own run and a
report finds runs by config); two that differ in anything that changes the result never share one. The
identity is the resolved config minus the keys in :data:`IGNORED` (where runs go, how progress is shown,
how often checkpoints are written: resume is exact, so it does not change the result; where generated data is
cached, while the generation settings stay in), plus the content
digest of every local data file the config names (an edited file is other data). The run folder is the
readable name followed by the first :data:`DIGEST_CHARS` hex digits of its SHA-256.

A checkpoint carries the identity it was trained under; resuming it under any other is refused with the keys
that differ (:func:`differences`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Keys that do not change what a run computes (dotted paths; a key ignores everything below it).
IGNORED = ("hydra", "runs_root", "resume", "save_model", "logger", "callbacks", "checkpoint",
           "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
           "progress", "data.datamodule.cache_dir")
# Config keys that may name a local file or folder whose contents are part of the identity.
DATA_PATHS = ("data.source", "eval.corpus.source")
DIGEST_CHARS = 10


def _drop(tree: dict[str, Any], dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if head not in tree:
        return
    if not rest:
        del tree[head]
    elif isinstance(tree[head], dict):
        _drop(tree[head], rest)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _pathlike(value: str) -> bool:
    return "/" in value or value.startswith((".", "~")) or Path(value).suffix != ""


def _local_files(cfg: dict[str, Any]) -> dict[str, str]:
    found = {}
    for key in DATA_PATHS:
        node: Any = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        # A bare word ("austen", "wikitext") is a built-in or hub name, never a file in the working folder.
        if isinstance(node, str) and _pathlike(node) and (path := Path(node).expanduser()).exists():
            found[key] = _file_digest(path)
    return found


def identity_config(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The part of ``cfg`` that decides what a run computes, resolved, as plain JSON-ready data."""
    if isinstance(cfg, DictConfig):
        keep = [k for k in cfg.keys() if k != "hydra"]  # its ${hydra:...} values name this very folder
        cfg = OmegaConf.to_container(OmegaConf.masked_copy(cfg, keep), resolve=True, throw_on_missing=False)
    tree = json.loads(json.dumps(cfg, default=str))
    for key in IGNORED:
        _drop(tree, key)
    if files := _local_files(tree):
        tree["data_files_sha256"] = files
    return tree


def config_digest(cfg: DictConfig | dict[str, Any]) -> str:
    """The identity's digest: what follows the readable run name in the folder name."""
    text = json.dumps(identity_config(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= _flat(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def differences(saved: dict[str, Any], current: dict[str, Any], limit: int = 4) -> list[str]:
    """``key: saved -> current`` for the keys whose values differ (at most ``limit``, then a count)."""
    a, b = _flat(saved), _flat(current)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))
    lines = [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys[:limit]]
    return lines + ([f"... and {len(keys) - limit} more"] if len(keys) > limit else [])


def digest_resolver(*, _root_: DictConfig) -> str:
    """``${qaft.digest:}``: the identity digest of the config being composed (used in the run folder name)."""
    return config_digest(_root_)
