"""The run folder's name: what the run computes, readable in a listing, then the digest of its identity.

``l4q-w4g64-r16-s0-tiny-llama-austen-init@minmax-a1b2c3d4e5`` is :func:`qaft.training.config.run_name` (method
preset, bits and group size, rank, seed, model, data), then one ``key@value`` per command-line override that the
name does not already say (``method.init=minmax`` gives ``init@minmax``), then the digest of everything that
changes the result (:mod:`qaft.training.identity`). So the folders of ``qaft-train -m method.init=minmax,l4q,mse``
say which is which; reports still find runs by their config, never by the name.

The overrides are Hydra's ``hydra.overrides.task`` of the job. Left out: the keys the name already shows, and those
that do not change what a run computes (:data:`qaft.training.identity.IGNORED`: ``runs_root``, ``progress``, ...).
A key is shown by its last part (``init``), or more of it where two overrides share one (``datamodule.seq_len``,
``eval.seq_len``); ``method.*`` keys come first, then config options (``experiment@groupwise``), then the
others, each in order of their keys, so the order on the command line does not matter. A value is shown as YAML
spells it (``false``, whether typed so or rebuilt by a sweep as ``False``), a list as its items joined by ``+``, a
value that names a file by its file name.

``=`` and ``,`` are what a Hydra command line splits on: a folder named with them could not be given unquoted to
``qaft-eval run_dir=`` or ``qaft-export run_dir=``, hence ``@``. Values keep only ``[A-Za-z0-9._+-]`` (others
become ``_``), each at most :data:`VALUE_CHARS` characters, and the overrides at most :data:`TAG_CHARS` in all
(``+N`` says how many more were left out): the name stays one portable folder name, well under 255 bytes.

A run already in ``runs_root`` under another readable name with the same digest (the same config, spelled with other
overrides: ``trainer.max_steps=32`` where 32 is the preset's value) is that run's folder: a rerun resumes it.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig

from qaft.training.config import run_name
from qaft.training.identity import IGNORED, config_digest

VALUE_CHARS = 32
TAG_CHARS = 120
# What the readable run name already shows (qaft.training.config.run_name), as override keys.
SHOWN = frozenset({"method", "method.name", "method.bits", "method.group_size", "method.rank", "method.act_bits",
                   "method.kv_bits", "quant", "model", "model.name_or_path", "data", "data.name", "seed"})
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
_PARSER = OverridesParser.create()


def _text(value: Any) -> str:
    """A parsed override value as YAML spells it: a sweep job's overrides are rebuilt from parsed values (``False``),
    a single run's are as typed (``false``); the same config must get the same name either way."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, list):
        return "+".join(_text(v) for v in value)
    if isinstance(value, dict):
        return "+".join(f"{k}_{_text(v)}" for k, v in value.items())
    return str(value)


def _parsed(override: str) -> tuple[str, str]:
    """``(key, value)`` of one override as Hydra spells it (``+key=v``, ``++key=v``, ``~key``, ``group@pkg=v``)."""
    try:
        parsed = _PARSER.parse_override(override)
    except HydraException:  # not an override Hydra reads; it never got this far
        key, _, value = override.lstrip("+~").partition("=")
        return key.split("@", 1)[0], value
    key = parsed.key_or_group.split("@", 1)[0]
    return key, "deleted" if parsed.is_delete() else _text(parsed.value())


def _ignored(key: str) -> bool:
    return key in SHOWN or key.startswith("hydra") or any(key == k or key.startswith(f"{k}.") for k in IGNORED)


def _shown_value(value: str) -> str:
    if "/" in value and not value.startswith(("{", "[")):
        value = Path(value).name or value
    return _UNSAFE.sub("_", value)[:VALUE_CHARS]


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Each key by its shortest dotted tail that no other key in ``keys`` shares."""
    short = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if not any(other != key and (other == tail or other.endswith(f".{tail}")) for other in keys):
                break
        short[key] = tail
    return short


def override_tag(overrides: Iterable[str]) -> str:
    """``init@minmax-max_steps@2``: the overrides the readable name does not show (see the module doc); ``""``
    where there are none."""
    pairs = dict(_parsed(str(o)) for o in overrides)
    # method.* first, then config options (experiment=..., trainer=...), then the other keys
    keys = sorted((k for k in pairs if not _ignored(k)), key=lambda k: (not k.startswith("method."), "." in k, k))
    short = _short_keys(keys)
    items = [f"{short[k]}@{_shown_value(pairs[k])}" for k in keys]
    kept: list[str] = []
    for item in items:
        if len("-".join([*kept, item])) > TAG_CHARS:
            break
        kept.append(item)
    if len(kept) < len(items):
        kept.append(f"+{len(items) - len(kept)}")
    return "-".join(kept)


def _existing(runs_root: Path, digest: str, wanted: str) -> str:
    """``wanted``, or the one folder in ``runs_root`` that already holds a run of this digest under another name."""
    if (runs_root / wanted).exists() or not runs_root.is_dir():
        return wanted
    same = sorted(p.name for p in runs_root.glob(f"*-{digest}") if p.is_dir())
    return same[0] if len(same) == 1 else wanted


def run_folder_name(method: DictConfig, model: str, data: str, seed: int, preset: str | None,
                    overrides: Iterable[str], runs_root: str, *, _root_: DictConfig) -> str:
    """``${qaft.run_folder:...}`` (``conf/train.yaml``'s ``hydra.run.dir`` and ``hydra.sweep.subdir``): the run
    folder's name (see the module doc)."""
    digest = config_digest(_root_)
    name = "-".join(filter(None, [run_name(method, model, data, seed, preset), override_tag(overrides or []),
                                  digest]))
    return _existing(Path(str(runs_root)).expanduser(), digest, name)


__all__ = ["TAG_CHARS", "VALUE_CHARS", "override_tag", "run_folder_name"]
