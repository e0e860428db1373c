"""Run identity: what a run computes, as a digest of its whole resolved config and of the local files it reads.

Two commands that compute the same thing map to the same run folder (so a rerun resumes its own run and a
report finds runs by config); two that differ in anything that changes the result never share one. The
identity is the resolved config minus the keys in :data:`IGNORED` (where runs go, how progress is shown,
how often checkpoints are written: resume is exact, so it does not change the result; where generated data is
cached, while the generation settings stay in; the seed of a run it cannot change: :func:`seed_free`), plus,
under :data:`FILES_KEY`, the SHA-256 of every local file or folder that any string of it names
(:func:`named_paths`), whichever key that is: ``data.source``, ``data.datamodule.source`` set apart from it,
``eval.corpus.source``, a local ``model.name_or_path``. An edited
file is other data, and a model folder overwritten in place is another model (its weights are hashed once per
process: :func:`qaft.data.local.content_sha256`). The run folder is the readable name followed by the first
:data:`DIGEST_CHARS` hex digits of the identity's SHA-256.

A checkpoint carries the identity it was trained under; resuming it under any other is refused with the keys
that differ (:func:`differences`). :func:`unmatched_reads` checks the files a data module actually parsed
(its ``data_sha256``) against the identity.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qaft.data.local import content_sha256

# Keys that do not change what a run computes (dotted paths; a key ignores everything below it).
IGNORED = ("hydra", "runs_root", "resume", "save_model", "logger", "callbacks", "checkpoint",
           "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
           "progress", "data.datamodule.cache_dir")
# Where the identity keeps {path as the config names it: sha256, or {file name: sha256} for a folder}.
FILES_KEY = "files_sha256"
DIGEST_CHARS = 10


def _drop(tree: dict[str, Any], dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if head not in tree:
        return
    if not rest:
        del tree[head]
    elif isinstance(tree[head], dict):
        _drop(tree[head], rest)


def _pathlike(value: str) -> bool:
    # A bare word ("austen", "wikitext", "tiny-llama", "test") is a built-in, hub or option name, never a file
    # in the working folder, even when one of that name is there.
    return "/" in value or os.sep in value or value.startswith((".", "~")) or Path(value).suffix != ""


def _exists(value: str) -> bool:
    try:
        return Path(value).expanduser().exists()
    except (OSError, ValueError):  # a long or NUL-holding string is no path
        return False


def named_paths(tree: Any) -> set[str]:
    """The strings anywhere in ``tree`` (dicts and lists) that name an existing local file or folder
    (``_target_`` values are import paths)."""
    if isinstance(tree, dict):
        return set().union(*(named_paths(v) for k, v in tree.items() if k != "_target_"))
    if isinstance(tree, list):
        return set().union(*(named_paths(v) for v in tree))
    return {tree} if isinstance(tree, str) and _pathlike(tree) and _exists(tree) else set()


def identity_config(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The part of ``cfg`` that decides what a run computes, resolved, as plain JSON-ready data."""
    if isinstance(cfg, DictConfig):
        keep = [k for k in cfg.keys() if k != "hydra"]  # its ${hydra:...} values name this very folder
        cfg = OmegaConf.to_container(OmegaConf.masked_copy(cfg, keep), resolve=True, throw_on_missing=False)
    tree = json.loads(json.dumps(cfg, default=str))
    for key in IGNORED:
        _drop(tree, key)
    tree.pop(FILES_KEY, None)  # an identity passed in again is recomputed, not trusted
    if seed_free(tree):
        for key in ("seed", "data.datamodule.seed"):  # the second orders the training stream, which PTQ never reads
            _drop(tree, key)
    if paths := named_paths(tree):
        tree[FILES_KEY] = {path: content_sha256(path) for path in sorted(paths)}
    return tree


def seed_free(tree: dict[str, Any]) -> bool:
    """Whether the seed changes nothing a run computes: nothing trains, no calibration data is read (the seed
    orders the training stream that GPTQ, SmoothQuant and Block-AP calibrate on), no GPTQ baseline: round-to-nearest
    PTQ. Its runs at every seed are one run (one folder), not copies that only look like independent evidence."""
    method, evaluation = tree.get("method"), tree.get("eval") or {}
    if not isinstance(method, dict) or (evaluation.get("gptq") and evaluation.get("baselines")):
        return False
    from qaft.training.config import method_config  # here: identities are also computed while Hydra composes

    try:
        config = method_config(method)
    except (TypeError, ValueError):  # not a valid method: validation refuses it with its own message
        return False
    return not config.traits.trains and config.calibration_options() is None


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
    # Config keys first: a file digest that differs mostly follows from a path that does.
    keys = sorted((k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>")),
                  key=lambda k: (k.startswith(FILES_KEY), k))
    lines = [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys[:limit]]
    return lines + ([f"... and {len(keys) - limit} more"] if len(keys) > limit else [])


def unmatched_reads(identity: dict[str, Any], read: dict[str, str]) -> list[str]:
    """One line per file in ``read`` (``{path: sha256}`` of what a data module parsed: its ``data_sha256``) whose
    bytes are not those ``identity`` names: edited after the identity was computed, or not named by it at all.
    Empty when the run read exactly the data its folder name promises."""
    named: dict[Path, str] = {}
    for path, digest in identity.get(FILES_KEY, {}).items():
        base = Path(path).expanduser().resolve()
        named |= {base / n: d for n, d in digest.items()} if isinstance(digest, dict) else {base: digest}
    lines = []
    for path, digest in sorted(read.items()):
        promised = named.get(Path(path).expanduser().resolve())
        if promised is None:
            lines.append(f"{path}: read, but no config value names it (sha256 {digest[:12]})")
        elif promised != digest:
            lines.append(f"{path}: read with sha256 {digest[:12]}, the run's identity has {promised[:12]} "
                         "(the file changed after the run started)")
    return lines


def digest_resolver(*, _root_: DictConfig) -> str:
    """``${qaft.digest:}``: the identity digest of the config being composed (used in the run folder name)."""
    return config_digest(_root_)
