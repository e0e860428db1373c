"""Validation of a whole composed run config, before any model or data loads, and the resolvers `conf/` uses.

A typo should cost a second, not the minutes of a model load (or a cluster queue). :func:`validate` first checks
that the config resolves and that every field keeps its rule (:mod:`qaft.training.schemas`: types, ranges,
choices), then what relates fields to each other and to the world: the method against its registry, group sizes
against the model's widths (known without loading for the built-in models, read from ``config.json`` for local
ones), sequence lengths against its positions, the classes the config names against the arguments it gives them,
the run folder's place inside ``runs_root``, and the data, record by record (:mod:`qaft.data.checks`). Each problem
is a :class:`ConfigError`: one line that names the field and says what to change.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from qaft import paths
from qaft.data import validate_data_source
from qaft.evaluation.harness import EvalError, parse_task
from qaft.evaluation.perplexity import AUTOCAST
from qaft.methods import GPTQOptions, MethodConfig, available, config_for
from qaft.models import validate_model_source
from qaft.quant.activation import OFF
from qaft.quant.affine import VALID_BITS
from qaft.quant.granularity import granularity
from qaft.training.errors import ConfigError
from qaft.training.model_check import check_model, read_shape
from qaft.training.schemas import (
    ROLES,
    SCHEDULES,  # noqa: F401 - qaft.training.module imports it from here
    Name,
    datamodule_arguments,
    field_problem,
    method_fields,
    missing_keys,
    register_method_schemas,
    resolve_problem,
    target_problem,
)
from qaft.training.spec import RunSpec, run_spec

CORPUS_KEYS = ("name", "source", "split", "seq_len", "batch_size")
# Trainer settings Lightning runs only on a CUDA GPU (gpu_only_settings).
_GPU_ACCELERATORS = ("gpu", "cuda")
_GPU_STRATEGIES = ("fsdp", "deepspeed")
_GPU_PRECISIONS = ("16", "16-mixed")
_EVAL_SPLITS = {"lm": ("train", "validation", "test"), "instruct": ("validation", "test")}


def _fields(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def method_config(node: Any) -> MethodConfig:
    """The registered method config for a ``method`` node (:func:`qaft.training.schemas.method_fields`)."""
    name, fields = method_fields(_fields(node))
    return config_for(name, **fields)


def _eval_gptq(node: Any) -> GPTQOptions | None:
    """The end-of-run GPTQ options, checked whether or not ``eval.gptq`` uses them (a bad one is a typo anyway)."""
    try:
        options = GPTQOptions(**_fields(node.get("gptq_options") or {}))
    except (TypeError, ValueError) as err:
        raise ValueError(f"eval.gptq_options: {err}") from None
    return options if node.get("gptq", False) else None


def _check_run_folder(cfg: DictConfig) -> None:
    """The run folder is one folder inside ``runs_root``, and ``runs_root`` is (or can be made) a writable folder."""
    name = run_name(cfg.method, cfg.model.name_or_path, cfg.data.name, cfg.seed)
    if not Name().accepts(name):
        raise ConfigError(f"the run folder's name {name!r} (from the method, model.name_or_path and data.name) "
                          "must be one folder name, without '/'")
    root = Path(cfg.runs_root).expanduser().absolute()
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"runs_root={cfg.runs_root!r}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"runs_root={cfg.runs_root!r}: cannot create run folders in {existing} (not writable)")


def _check_lengths(cfg: DictConfig, shape: dict[str, Any] | None) -> None:
    """Every sequence length the run uses fits the model's positions."""
    limit = (shape or {}).get("text_config", shape or {}).get("max_position_embeddings")
    for key in ("data.datamodule.seq_len", "data.datamodule.max_length", "eval.seq_len", "eval.corpus.seq_len"):
        value = OmegaConf.select(cfg, key)
        if value is not None and limit and value > int(limit):
            raise ConfigError(f"{key}={value} exceeds the model's max_position_embeddings={limit}")


def _check_datamodule(cfg: DictConfig) -> None:
    """The data module reads the data the run is evaluated on (its source is ``data.source``), has room for a
    training block, and passes its class's own check (``check_config``: generated data's settings)."""
    args, data = datamodule_arguments(cfg), cfg.data
    for key, mirror in (("source", "source"), ("config", "config"), ("eval_source", "source"),
                        ("eval_config", "config")):
        if key in args and args[key] != data.get(mirror):
            raise ConfigError(f"data.datamodule.{key}={args[key]!r} differs from data.{mirror}={data.get(mirror)!r}, "
                              f"which the run is evaluated (and recorded) on: set data.{mirror} instead")
    tokens, block = args.get("max_train_tokens"), args.get("seq_len")
    if tokens is not None and block is not None and tokens < block:
        raise ConfigError(f"data.datamodule.max_train_tokens={tokens} is below seq_len={block}: no training block")
    check = getattr(get_object(cfg.data.datamodule._target_), "check_config", None)
    try:
        if check is not None:
            check({k: v for k, v in _fields(cfg.data.datamodule).items() if k != "_target_"})
    except ValueError as err:
        raise ConfigError(f"data.datamodule: {err}") from None


# Lightning settings that train less than max_steps full batches: a run with them could not be recorded ok.
SHORTENED = {"fast_dev_run": (False, 0, None), "limit_train_batches": (1.0, None), "overfit_batches": (0, 0.0, None),
             "max_time": (None,)}


def gpu_only_settings(trainer: DictConfig) -> list[str]:
    """``key=value`` of each trainer setting that Lightning runs only on a CUDA GPU: a GPU accelerator, a sharded
    strategy (FSDP, DeepSpeed: "No supported gpu backend found!" on a CPU), fp16 mixed precision."""
    found = []
    if str(trainer.get("accelerator")) in _GPU_ACCELERATORS:
        found.append(f"trainer.accelerator={trainer.accelerator}")
    strategy = trainer.get("strategy")
    name = str(strategy.get("_target_", "")).rsplit(".", 1)[-1] if OmegaConf.is_dict(strategy) else str(strategy)
    if name.lower().startswith(_GPU_STRATEGIES):
        found.append(f"trainer.strategy={name}")
    if str(trainer.get("precision")) in _GPU_PRECISIONS:
        found.append(f"trainer.precision={trainer.precision}")
    return found


def _check_trainer(cfg: DictConfig, method: MethodConfig, resources: bool) -> None:
    """A GPU where the trainer needs one (``resources``), and every phase of the method inside the run."""
    trainer = cfg.trainer
    if resources and (needs_gpu := gpu_only_settings(trainer)):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{needs_gpu[0]} needs a CUDA GPU, and this machine has none (on a CPU: "
                              "trainer=default, or trainer=ddp trainer.accelerator=cpu trainer.devices=N)")
    for key, allowed in SHORTENED.items():
        value = trainer.get(key)
        if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            raise ConfigError(f"trainer.{key}={value!r} trains less than the config says, and a run record must "
                              "never claim steps that did not happen; for a short run set trainer.max_steps")
    steps = trainer.max_steps
    late = [b for b in method.phase_boundaries() if b >= steps]
    if late:  # e.g. DL-QAT's phase 1 or L4Q's warm-up outlasting the run: its last phase would never train
        raise ConfigError(f"method {method.name!r} changes phase at step {late[0]}, but the run has only "
                          f"trainer.max_steps={steps}: its last phase would never run; shorten the phase "
                          "(method.quant_steps / method.warmup_steps) or train longer")


def _check_roles(cfg: DictConfig) -> None:
    for key in ("lr", "weight_decay"):
        unknown = sorted(set(cfg.optim[key]) - set(ROLES))
        if unknown:
            raise ConfigError(f"optim.{key} has unknown role(s) {unknown}; roles: {list(ROLES)}")


def _check_eval(cfg: DictConfig) -> None:
    """The evaluated split exists for the data's kind, and a second corpus has what it needs."""
    allowed = _EVAL_SPLITS[cfg.data.kind]
    if cfg.eval.split not in allowed:
        raise ConfigError(f"eval.split={cfg.eval.split!r} must be one of {list(allowed)} for {cfg.data.kind} data")
    if cfg.eval.get("autocast") not in (None, *AUTOCAST):
        raise ConfigError(f"eval.autocast={cfg.eval.autocast!r} must be null (float32) or one of {list(AUTOCAST)}")
    corpus = cfg.eval.get("corpus")
    if corpus is None:
        return
    if not OmegaConf.is_dict(corpus):
        raise ConfigError(f"eval.corpus={corpus!r} must be null or a node {{name, source, split, seq_len, batch_size}}")
    missing = [k for k in CORPUS_KEYS if corpus.get(k) in (None, "")]
    unknown = sorted(set(corpus) - {*CORPUS_KEYS, "config", "max_tokens"})
    if missing or unknown:
        raise ConfigError(f"eval.corpus needs {missing} and takes no {unknown} (e.g. name=wikitext2 source=wikitext "
                          "config=wikitext-2-raw-v1 split=test seq_len=2048 batch_size=1)")
    try:
        validate_data_source("lm", corpus.source)
    except ValueError as err:
        raise ConfigError(f"eval.corpus: {err}") from None


def _check_tasks(tasks: list[str]) -> None:
    """lm-eval knows every task: qaft's own are known at once; others need lm-eval's index (~20 s, the same
    cached index the run's end uses)."""
    from qaft.evaluation.harness import task_manager
    from qaft.evaluation.tasks import LOCAL_TASKS

    unknown = [n for n in (parse_task(t)[0] for t in tasks) if n not in LOCAL_TASKS]
    unknown = [n for n in unknown if n not in task_manager(include_defaults=True).all_tasks] if unknown else []
    if unknown:
        raise ConfigError(f"eval.tasks: lm-eval has no task(s) {unknown} (qaft's own: {list(LOCAL_TASKS)}; "
                          "`lm-eval ls tasks` lists the others)")


def _check_data_contents(cfg: DictConfig) -> None:
    """Local data files read and checked, hub datasets looked up (see :mod:`qaft.data.checks`)."""
    from qaft.data.checks import check_data, check_text_split
    from qaft.models import load_tokenizer

    data, args, corpus = cfg.data, datamodule_arguments(cfg), cfg.eval.get("corpus")
    local_corpus = corpus is not None and Path(corpus.source).expanduser().exists()
    if data.source in ("quiz", "austen") and not local_corpus:
        return
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    split: dict[str, Any] = {"eval_split": cfg.eval.split}
    if data.kind == "instruct":
        split |= {"seed": args.get("seed", 0), "val_fraction": args.get("val_fraction", 0.05),
                  "limits": (args.get("max_train_samples"), args.get("max_eval_samples"))}
    try:
        length = args.get("max_length" if data.kind == "instruct" else "seq_len") or 2
        check_data(data.kind, data.source, data.get("config"), tokenizer, length, **split)
        if local_corpus:
            check_text_split(corpus.source, tokenizer, corpus.split)
    except ValueError as err:
        raise ConfigError(f"data: {err}") from None


def _check_resume(cfg: DictConfig) -> None:
    choice = str(cfg.get("resume", "auto"))
    if choice not in ("auto", "never") and not Path(choice).expanduser().is_file():
        raise ConfigError(f"resume={choice!r} must be auto, never or an existing .ckpt file")


def _deployment(cfg: DictConfig) -> tuple[MethodConfig, int, int, GPTQOptions | None]:
    """The method and deployment settings (``ValueError`` / ``EvalError`` where one is refused)."""
    if cfg.method.name not in available():
        raise ValueError(f"method.name={cfg.method.name!r}: unknown method; available: {available()}")
    method = method_config(cfg.method)
    eval_gptq = _eval_gptq(cfg.eval)
    bits, group_size = int(cfg.method.bits), int(cfg.method.group_size)
    if bits not in VALID_BITS:
        raise ValueError(f"method.bits must be one of {VALID_BITS}, got {bits}")
    granularity(group_size)
    try:
        validate_model_source(cfg.model.name_or_path)
    except ValueError as err:
        raise ValueError(f"model.name_or_path: {err}") from None
    validate_data_source(cfg.data.kind, cfg.data.source)
    for task in cfg.eval.tasks:
        try:
            parse_task(task)
        except EvalError as err:
            raise ValueError(f"eval.tasks: {err}") from None
    return method, bits, group_size, eval_gptq


def validate(cfg: DictConfig, resources: bool = True) -> RunSpec:
    """Check the whole composed config; raise :class:`ConfigError` (one line) on the first problem.

    ``resources=False`` checks the config alone: no hub lookups (a hub model's widths, a hub dataset), no
    reading of local data files and no lm-eval task index (what ``qaft-train`` checks on top, before it writes
    anything).
    """
    missing = missing_keys(cfg)
    if missing:
        raise ConfigError(f"missing required value(s) {missing}: set them on the command line, e.g. {missing[0]}=...")
    problem = resolve_problem(cfg) or field_problem(cfg) or target_problem(cfg)
    if problem:
        raise ConfigError(problem)
    try:
        method, bits, group_size, eval_gptq = _deployment(cfg)
    except (ValueError, EvalError) as err:
        raise ConfigError(str(err)) from None
    shape = read_shape(cfg.model.name_or_path, fetch=resources)
    check_model(cfg, method, group_size, shape)
    _check_lengths(cfg, shape)
    _check_run_folder(cfg)
    _check_datamodule(cfg)
    _check_trainer(cfg, method, resources)
    _check_roles(cfg)
    _check_resume(cfg)
    _check_eval(cfg)
    if resources:
        if cfg.eval.tasks:
            _check_tasks(list(cfg.eval.tasks))
        _check_data_contents(cfg)
    return run_spec(cfg, method, bits, group_size, eval_gptq)  # read once every value is checked


# --- resolvers used by conf/train.yaml -------------------------------------------------------------------

def run_name(method: DictConfig, model: str, data: str, seed: int, preset: str | None = None) -> str:
    """``l4q-w4g64-r16-s0-smollm2-135m-austen`` (``...-w4pc-a8kv8-...`` with activation / KV bits): what a run
    computes, readable in a folder listing.

    ``preset``: the ``method`` config option when it is not the method's own name (``loftq_int`` is LoftQ
    with another base), so that two presets of one method never share a run folder.
    """
    parts = [preset if preset and preset != method.get("name") else str(method.get("name"))]
    if method.get("bits") is not None:
        group = "pc" if method.get("group_size") == -1 else f"g{method.get('group_size')}"
        parts.append(f"w{method.get('bits')}{group}")
    act_kv = (method.get("act_bits", OFF), method.get("kv_bits", OFF))
    if act_kv != (OFF, OFF):  # W-A-KV runs read as such (l4q-w4pc-a8kv8-...); weight-only names are unchanged
        parts.append("a{}kv{}".format(*act_kv))
    if method.get("rank") is not None:
        parts.append(f"r{method.get('rank')}")
    parts += [f"s{seed}", Path(str(model)).name or str(model), str(data)]
    return "-".join(parts)


def precision(choice: str = "auto") -> str:
    """``auto``: bf16-mixed on a GPU with bf16, full fp32 elsewhere (CPU bf16 autocast is slower)."""
    if choice != "auto":
        return choice

    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def experiments_dir() -> str:
    """The ``experiments/`` folder, which Hydra searches for the tables' experiment configs."""
    return str(paths.experiments_dir())


def fraction_of_steps(fraction: float, steps: int) -> int:
    """``${qaft.steps_fraction:0.2,${trainer.max_steps}}``: a phase length as a share of the run (at least 1)."""
    return max(1, int(float(fraction) * int(steps)))


def register_conf() -> None:
    """What ``conf/train.yaml`` needs from Python (idempotent): the method schemas and the GPTQ options' schema
    (:mod:`qaft.training.schemas`), and the resolvers ``${qaft.run_folder:...}`` (:mod:`qaft.training.naming`),
    ``${qaft.run_name:...}``, ``${qaft.digest:}``
    (:mod:`qaft.training.identity`), ``${qaft.precision:...}``, ``${qaft.steps_fraction:...}``,
    ``${qaft.sequences_used:...}``, ``${qaft.experiments_dir:}``.

    Not done at import (importing qaft changes no global state): whatever composes ``conf/train.yaml`` calls it
    first, as :mod:`qaft.training.app` does.
    """
    from qaft.data.generated import sequences_used
    from qaft.training.identity import digest_resolver
    from qaft.training.naming import run_folder_name

    register_method_schemas()
    for name, fn in (("qaft.run_name", run_name), ("qaft.digest", digest_resolver), ("qaft.precision", precision),
                     ("qaft.run_folder", run_folder_name), ("qaft.sequences_used", sequences_used),
                     ("qaft.steps_fraction", fraction_of_steps), ("qaft.experiments_dir", experiments_dir)):
        OmegaConf.register_new_resolver(name, fn, replace=True)
