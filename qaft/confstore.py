"""Structured configs from dataclasses, for Hydra's ConfigStore (the one source of a config's defaults).

A config dataclass (a method's, GPTQ's options) is the definition of its fields, types and defaults; Hydra gets a
mutable copy of it (:func:`node_of`: a frozen dataclass would make its config node read-only, so command-line
overrides would fail) and the YAML files only override.
"""
from __future__ import annotations

import dataclasses
from typing import Any, get_type_hints


def _field(f: dataclasses.Field) -> dataclasses.Field:
    if f.default is not dataclasses.MISSING:
        return dataclasses.field(default=f.default)
    return dataclasses.field(default_factory=f.default_factory)


def node_of(cls: type, first: list[tuple[str, Any, Any]] = (), extra: list[tuple[str, Any, Any]] = ()) -> type:
    """A mutable dataclass with ``cls``'s fields and defaults (a frozen one would make its config node read-only),
    after ``first`` and before ``extra`` (``(name, type, default)`` each, skipping names ``cls`` has)."""
    hints = get_type_hints(cls)
    own = {f.name for f in dataclasses.fields(cls)}
    specs = [(k, t, dataclasses.field(default=d)) for k, t, d in first if k not in own]
    specs += [(f.name, hints[f.name], _field(f)) for f in dataclasses.fields(cls)]
    specs += [(k, t, dataclasses.field(default=d)) for k, t, d in extra if k not in own]
    return dataclasses.make_dataclass(f"{cls.__name__}Node", specs)


def store_schema(group: str, name: str, cls: type, first: list[tuple[str, Any, Any]] = (),
                 extra: list[tuple[str, Any, Any]] = ()) -> None:
    """Store ``node_of(cls, first, extra)`` as ``<group>/<name>`` in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group=group, name=name, node=node_of(cls, first, extra))
