"""The run config's schema: method dataclasses in Hydra's ConfigStore, and a rule for every other field.

``conf/method/<name>.yaml`` extends ``schema/method/<name>`` (the method config's own fields and defaults, plus
``name``, plus the deployment ``bits`` / ``group_size`` of methods that merge to a float model and are deployed
by PTQ), so a YAML preset states only what differs from the dataclass, a mistyped
key in a preset or on the command line is an error, and a value of the wrong type is refused at composition.
``qaft.config_for(name)`` and ``qaft-train method=<name>`` therefore start from the same defaults.

The other fields (``seed``, ``trainer.max_steps``, ``optim.betas``, ...) are plain YAML, where ``seed=abc`` composes
fine; :data:`RUN_FIELDS` gives each a rule (:class:`Whole`, :class:`Real`, :class:`OneOf`, ...) and
:func:`field_problem` checks them all before anything reads a value, so a bad one is a line that names it, not a
traceback (or a ``failed`` run) minutes later. Rules that relate two fields (``eval.split`` and the data's kind, a
sequence length and the model's positions) are in :mod:`qaft.training.config`.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Protocol

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qaft.confstore import store_schema
from qaft.data import DATA_KINDS
from qaft.methods.config import available, registered
from qaft.quant.gptq import GPTQOptions

# Float-merged methods are deployed by round-to-nearest PTQ at these (a field of the node, not of the method).
DEPLOY_FIELDS: dict[str, tuple[type, Any]] = {"bits": (int, 4), "group_size": (int, 64)}
SCHEMA_GROUP = "schema/method"
# Learning-rate schedules (a factor of the base lr, from training progress in [0, 1]) after the linear warm-up.
SCHEDULES = {
    "constant": lambda progress: 1.0,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))),
}
DTYPES = ("float32", "bfloat16", "float16")
ROLES = ("lora", "quant", "weight")
SPLITS = ("train", "validation", "test")
# Lightning 2's accepted precisions (lightning_fabric.connector._PRECISION_INPUT) and accelerator names.
PRECISIONS = ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true", "bf16-mixed",
              "32-true", "64-true", "64", "32", "16", "bf16", 64, 32, 16)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
SEEDS = 2**32 - 1  # numpy's (and so Lightning's seed_everything's) largest seed


class Rule(Protocol):
    """What a field's value must be."""

    def accepts(self, value: Any) -> bool: ...

    def describe(self) -> str: ...


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's true is no step count


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Whole:
    """An integer (not a bool) in ``[low, high]``."""

    low: int
    high: int | None = None

    def accepts(self, value: Any) -> bool:
        return _is_int(value) and value >= self.low and (self.high is None or value <= self.high)

    def describe(self) -> str:
        return f"a whole number >= {self.low}" if self.high is None else f"a whole number in [{self.low}, {self.high}]"


@dataclass(frozen=True)
class Real:
    """A finite number between ``low`` and ``high`` (each bound open or closed)."""

    low: float
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def accepts(self, value: Any) -> bool:
        if not _is_real(value):
            return False
        above = value > self.low if self.open_low else value >= self.low
        below = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return above and below

    def describe(self) -> str:
        if self.high is None:
            return f"a finite number {'>' if self.open_low else '>='} {self.low}"
        return f"a number in {'(' if self.open_low else '['}{self.low}, {self.high}{')' if self.open_high else ']'}"


@dataclass(frozen=True)
class OneOf:
    """One of ``values`` (of the same type: YAML's ``true`` is not ``1``)."""

    values: tuple[Any, ...]

    def accepts(self, value: Any) -> bool:
        return any(value == v and type(value) is type(v) for v in self.values)

    def describe(self) -> str:
        return "null" if self.values == (None,) else f"one of {list(self.values)}"


class Flag:
    """A YAML boolean (not 0 / 1, not "yes")."""

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)

    def describe(self) -> str:
        return "true or false"


class Text:
    """A string with something in it."""

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and bool(value.strip())

    def describe(self) -> str:
        return "a non-empty string"


class Name:
    """A name that becomes part of a file or folder name: nothing that could leave the folder it is put in."""

    def accepts(self, value: Any) -> bool:
        return Text().accepts(value) and not any(c in value for c in "/\\\0") and value not in (".", "..")

    def describe(self) -> str:
        return "a plain name (no '/' or '\\': it is part of the run folder's name)"


@dataclass(frozen=True)
class ListOf:
    """A list of ``length`` values (any length where ``None``), each accepted by ``item``."""

    item: Rule
    length: int | None = None

    def accepts(self, value: Any) -> bool:
        return (isinstance(value, list) and (self.length is None or len(value) == self.length)
                and all(self.item.accepts(v) for v in value))

    def describe(self) -> str:
        return f"a list of {self.length or 'any number of'} values, each {self.item.describe()}"


@dataclass(frozen=True)
class Either:
    """What any of ``rules`` accepts."""

    rules: tuple[Rule, ...]

    def accepts(self, value: Any) -> bool:
        return any(r.accepts(value) for r in self.rules)

    def describe(self) -> str:
        return " or ".join(r.describe() for r in self.rules)


NULL = OneOf((None,))


def nullable(rule: Rule) -> Rule:
    return Either((rule, NULL))


# Fields every run config has (``*``: every key of that node). The method's and eval.gptq_options' fields are
# their dataclasses' (checked by constructing them); data.datamodule's, trainer's and logger's other keys are their
# classes' arguments, and logger, callbacks and eval.corpus are checked as nodes (target_problem below;
# qaft.training.config's _check_eval).
RUN_FIELDS: dict[str, Rule] = {
    "seed": Whole(0, SEEDS), "experiment_name": nullable(Text()), "runs_root": Text(), "resume": Text(),
    "save_model": Flag(), "model.name_or_path": Text(), "model.dtype": OneOf(DTYPES),
    "data.name": Name(), "data.kind": OneOf(DATA_KINDS), "data.source": Text(), "data.datamodule._target_": Text(),
    "trainer._target_": Text(), "trainer.max_steps": Whole(1),
    "eval.split": OneOf(SPLITS), "eval.seq_len": Whole(2), "eval.max_tokens": nullable(Whole(2)),
    "eval.max_batches": nullable(Whole(1)), "eval.batch_size": Whole(1), "eval.baselines": Flag(),
    "eval.gptq": Flag(), "eval.tasks": ListOf(Text()), "eval.lm_eval.batch_size": Whole(1),
    "eval.lm_eval.max_length": Whole(2), "eval.lm_eval.limit": nullable(Either((Whole(1), Real(0, 1, True, True)))),
    "optim.lr.*": Real(0), "optim.weight_decay.*": Real(0), "optim.betas": ListOf(Real(0, 1, open_high=True), 2),
    "optim.eps": Real(0, open_low=True), "optim.schedule": OneOf(tuple(SCHEDULES)), "optim.warmup_steps": Whole(0),
    "optim.gradient_checkpointing": Flag(), "divergence.loss_vs_uniform": nullable(Real(1, open_low=True)),
    "checkpoint.every_n_steps": Whole(0), "progress.every_n_steps": Whole(0), "progress.every_s": Real(0),
}
# Fields a run config may have: a data module's or the Trainer's usual arguments, a second corpus' keys.
OPTIONAL_FIELDS: dict[str, Rule] = {
    "data.config": nullable(Text()),
    "data.datamodule.seq_len": Whole(2), "data.datamodule.max_length": Whole(2), "data.datamodule.batch_size": Whole(1),
    "data.datamodule.eval_batch_size": nullable(Whole(1)), "data.datamodule.max_train_tokens": nullable(Whole(2)),
    "data.datamodule.max_eval_tokens": nullable(Whole(2)), "data.datamodule.max_train_samples": nullable(Whole(1)),
    "data.datamodule.max_eval_samples": nullable(Whole(1)), "data.datamodule.num_workers": Whole(0),
    "data.datamodule.val_fraction": Real(0, 1, True, True), "data.datamodule.seed": Whole(0, SEEDS),
    "trainer.accelerator": OneOf(ACCELERATORS), "trainer.num_nodes": Whole(1), "trainer.precision": OneOf(PRECISIONS),
    "trainer.devices": Either((Whole(1), OneOf((-1, "auto")), ListOf(Whole(0)))),
    "trainer.max_epochs": Either((Whole(1), OneOf((-1, None)))), "trainer.accumulate_grad_batches": Whole(1),
    "trainer.gradient_clip_val": nullable(Real(0)), "trainer.gradient_clip_algorithm": OneOf(("norm", "value", None)),
    "trainer.log_every_n_steps": Whole(1), "trainer.limit_val_batches": Either((Whole(0), Real(0, 1))),
    "trainer.num_sanity_val_steps": Whole(-1), "trainer.enable_progress_bar": Flag(),
    "trainer.enable_model_summary": Flag(), "trainer.use_distributed_sampler": Flag(),
    "trainer.fast_dev_run": Either((Flag(), Whole(0))),
    "eval.corpus.name": Name(), "eval.corpus.source": Text(), "eval.corpus.config": nullable(Text()),
    "eval.corpus.split": OneOf(SPLITS), "eval.corpus.seq_len": Whole(2), "eval.corpus.max_tokens": nullable(Whole(2)),
    "eval.corpus.batch_size": Whole(1),
}
_ABSENT = object()


def _values(cfg: DictConfig, path: str) -> list[tuple[str, Any]]:
    """``(path, value)`` of a field, or of every key of a ``node.*`` (``_ABSENT`` where it is not there)."""
    if not path.endswith(".*"):
        value = OmegaConf.select(cfg, path, default=_ABSENT)
        return [(path, OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig))
                 else value)]
    node = OmegaConf.select(cfg, path[:-2])
    return [pair for key in (node or {}) for pair in _values(cfg, f"{path[:-2]}.{key}")]


def missing_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """The ``???`` values, found without resolving anything (``OmegaConf.missing_keys`` resolves interpolations,
    and raises at the first one that points to a ``???``, naming the wrong key)."""
    keys = []
    for key in node:
        if OmegaConf.is_missing(node, key):
            keys.append(f"{prefix}{key}")
        elif not OmegaConf.is_interpolation(node, key) and OmegaConf.is_dict(node[key]):
            keys += missing_keys(node[key], f"{prefix}{key}.")
    return keys


def resolve_problem(cfg: DictConfig) -> str | None:
    """The first interpolation that does not resolve (``${oc.env:...}`` of an unset variable, a resolver given a
    bad argument, a key removed with ``~``), as one line."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        return f"{getattr(err, 'full_key', None) or 'a value'} cannot be resolved: {str(err).splitlines()[0]}"
    return None


def field_problem(cfg: DictConfig) -> str | None:
    """The first field of ``cfg`` that breaks its rule in :data:`RUN_FIELDS` / :data:`OPTIONAL_FIELDS`, as one
    line (``None``: all keep them). ``cfg`` must resolve (``OmegaConf.to_container(cfg, resolve=True)``)."""
    for fields, required in ((RUN_FIELDS, True), (OPTIONAL_FIELDS, False)):
        for pattern, rule in fields.items():
            for path, value in _values(cfg, pattern):
                if value is _ABSENT:
                    if required:
                        return f"{path} is missing: it must be {rule.describe()}"
                elif not rule.accepts(value):
                    return f"{path}={value!r} must be {rule.describe()}"
    return None


_HYDRA_KEYS = {"_target_", "_recursive_", "_convert_", "_partial_", "_args_"}


def class_problem(key: str, node: Any, given: tuple[str, ...] = ()) -> tuple[str | None, Any]:
    """``(problem, class)`` of a ``{_target_: ...}`` node (``problem`` is ``None`` where there is none): the class
    must import and take every key of the node as an argument. ``given``: the arguments qaft passes itself, left
    out of the list of what the node may set."""
    from hydra.utils import get_object

    target = node.get("_target_")
    try:
        cls = get_object(str(target))
    except Exception as err:  # noqa: BLE001 - a misspelled class path: one line, not Hydra's traceback
        return f"{key}._target_={target!r} cannot be imported ({type(err).__name__})", None
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # a builtin without a signature: what it takes is its business
        return None, cls
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None, cls
    unknown = sorted(set(node) - _HYDRA_KEYS - set(params))
    if unknown:
        takes = sorted(set(params) - set(given) - {"self"})
        return f"{key} has {unknown}, which {target} does not take; it takes {takes}", cls
    return None, cls


# Arguments qaft passes to the classes a config names, besides the config's own keys.
_GIVEN = {"trainer": ("callbacks", "logger", "default_root_dir", "plugins"), "logger": ("save_dir", "name"),
          "data.datamodule": ("tokenizer",)}


def _nodes(cfg: DictConfig) -> tuple[list[tuple[str, Any]], str | None]:
    """``(key, node)`` of every node that names a class, or the problem with a node that should but does not."""
    from pytorch_lightning.strategies import StrategyRegistry

    nodes = [("data.datamodule", cfg.data.datamodule), ("trainer", cfg.trainer)]
    strategy, logger, callbacks = cfg.trainer.get("strategy", "auto"), cfg.get("logger"), cfg.get("callbacks")
    if OmegaConf.is_dict(strategy):
        nodes.append(("trainer.strategy", strategy))
    elif strategy not in ("auto", *StrategyRegistry.available_strategies()):
        return nodes, (f"trainer.strategy={strategy!r} must be auto, a Lightning strategy name (ddp, fsdp, ...) or a "
                       "{_target_: ...} node")
    if not OmegaConf.is_dict(logger) or (len(logger) and not logger.get("_target_")):
        shown = OmegaConf.to_container(logger) if OmegaConf.is_config(logger) else logger
        return nodes, (f"logger={shown!r} must be {{}} (the run folder's own record only) or a "
                       "{_target_: <Lightning logger class>, ...} node")
    nodes += [("logger", logger)] if len(logger) else []
    if not OmegaConf.is_dict(callbacks):
        return nodes, f"callbacks={callbacks!r} must be a mapping {{name: {{_target_: <Callback class>, ...}}}}"
    for name, node in callbacks.items():
        if node and not OmegaConf.select(node, "_target_"):
            return nodes, f"callbacks.{name} needs a _target_ (a pytorch_lightning.Callback class path)"
        nodes += [(f"callbacks.{name}", node)] if node else []
    return nodes, None


def target_problem(cfg: DictConfig) -> str | None:
    """The first node naming a class (``data.datamodule``, ``trainer``, its ``strategy``, ``logger``,
    ``callbacks.*``) that cannot build it, as one line (:func:`class_problem`)."""
    nodes, problem = _nodes(cfg)
    for key, node in nodes:
        problem = problem or class_problem(key, node, _GIVEN.get(key, ()))[0]
    return problem


def datamodule_arguments(cfg: DictConfig) -> dict[str, Any]:
    """The data module's arguments as it will be built: the node's keys over its class's defaults (its class
    imports: :func:`target_problem` has said so)."""
    node = OmegaConf.to_container(cfg.data.datamodule, resolve=True)
    target = node.pop("_target_")
    from hydra.utils import get_object

    params = inspect.signature(get_object(target)).parameters.items()
    return {k: p.default for k, p in params if p.default is not inspect.Parameter.empty} | node


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


__all__ = ["DEPLOY_FIELDS", "OPTIONAL_FIELDS", "RUN_FIELDS", "SCHEDULES", "class_problem", "datamodule_arguments",
           "field_problem", "method_fields", "missing_keys", "register_method_schemas", "resolve_problem",
           "target_problem"]
