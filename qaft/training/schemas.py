"""Structured configs: every method's dataclass registered with Hydra's ConfigStore, one source for defaults.

``conf/method/<name>.yaml`` extends ``schema/method/<name>`` (the method config's own fields and defaults, plus
``name``, plus the deployment ``bits`` / ``group_size`` of methods that merge to a float model and are deployed
by PTQ), so a YAML preset states only what differs from the dataclass, a mistyped
key in a preset or on the command line is an error, and a value of the wrong type is refused at composition.
``qaft.config_for(name)`` and ``qaft-train method=<name>`` therefore start from the same defaults.
"""
from __future__ import annotations

from typing import Any

from qaft.confstore import store_schema
from qaft.methods.config import available, registered
from qaft.quant.gptq import GPTQOptions

# Float-merged methods are deployed by round-to-nearest PTQ at these (a field of the node, not of the method).
DEPLOY_FIELDS: dict[str, tuple[type, Any]] = {"bits": (int, 4), "group_size": (int, 64)}
SCHEMA_GROUP = "schema/method"


def register_method_schemas() -> None:
    """Store ``schema/method/<name>`` for every registered method and ``schema/gptq`` (the GPTQ options of
    ``eval.gptq_options``), idempotently."""
    for name in available():
        cls = registered(name)
        store_schema(SCHEMA_GROUP, name, cls, [("name", str, cls.name)], [(k, t, d) for k, (t, d) in DEPLOY_FIELDS.items()])
    store_schema("schema", "gptq", GPTQOptions)


def method_fields(node: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(name, fields for config_for)`` of a composed ``method`` node: the deployment fields the method does
    not have itself are the run's business (:class:`qaft.training.config.RunSpec`), not the method's."""
    fields = dict(node)
    name = fields.pop("name", None)
    own = set(registered(name).field_names())
    for key in DEPLOY_FIELDS:
        if key not in own:
            fields.pop(key, None)
    return name, fields


__all__ = ["DEPLOY_FIELDS", "method_fields", "register_method_schemas"]
