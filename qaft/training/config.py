"""Validation of a whole composed run config, before any model or data loads, and the resolvers `conf/` uses.

A typo should cost a second, not the minutes of a model load (or a cluster queue): :func:`validate` checks the
method against its registry, bits, group sizes against the model's widths (known without loading for the
built-in models, read from ``config.json`` for local ones), the model path and the data source, and raises
:class:`ConfigError` with one line that says what to change.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qaft import paths
from qaft.data import validate_data_source
from qaft.evaluation.harness import EvalError, parse_task
from qaft.methods import GPTQOptions, MethodConfig, config_for
from qaft.models import SMOLLM2, TINY_LLAMA, cache_dir, tiny_llama_config, validate_model_source
from qaft.quant.activation import OFF
from qaft.quant.affine import VALID_BITS
from qaft.quant.granularity import granularity
from qaft.training.schemas import method_fields, register_method_schemas
from qaft.training.spec import RunSpec, run_spec

SCHEDULES = {
    "constant": lambda progress: 1.0,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))),
}
DTYPES = ("float32", "bfloat16", "float16")
ROLES = ("lora", "quant", "weight")
# SmolLM2-135M's shape, so a bad group size is caught before the first (slow) GGUF conversion.
_SMOLLM2_SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "head_dim": 64,
                  "max_position_embeddings": 8192}
# Input width of each target projection, from a LLaMA-style config.
_IN_FEATURES = {
    "q_proj": lambda c: c["hidden_size"], "k_proj": lambda c: c["hidden_size"],
    "v_proj": lambda c: c["hidden_size"], "gate_proj": lambda c: c["hidden_size"],
    "up_proj": lambda c: c["hidden_size"], "down_proj": lambda c: c["intermediate_size"],
    "o_proj": lambda c: c["num_attention_heads"] * (c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]),
}


class ConfigError(ValueError):
    """A problem with the composed config, reported as one line before anything heavy runs."""


def _fields(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def method_config(node: Any) -> MethodConfig:
    """The registered method config for a ``method`` node (:func:`qaft.training.schemas.method_fields`)."""
    name, fields = method_fields(_fields(node))
    return config_for(name, **fields)


def _eval_gptq(node: Any) -> GPTQOptions | None:
    switch = node.get("gptq", False)
    if not isinstance(switch, bool):
        raise ValueError(f"eval.gptq must be true or false, got {switch!r}")
    if not switch:
        return None
    try:
        return GPTQOptions(**_fields(node.get("gptq_options") or {}))
    except (TypeError, ValueError) as err:
        raise ValueError(f"eval.gptq_options: {err}") from None


def _hub_config(repo: str) -> Path:
    """A hub model's ``config.json`` (from the local cache, or fetched: a few KB); one line when it cannot be."""
    from huggingface_hub import constants, hf_hub_download

    try:
        return Path(hf_hub_download(repo, "config.json"))
    except Exception as err:  # noqa: BLE001 - offline, unreachable, gated or missing: all one line
        offline = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if constants.HF_HUB_OFFLINE else ""
        raise ConfigError(f"model {repo!r}: cannot get its config.json from the Hugging Face hub{offline}: "
                          f"{type(err).__name__}") from None


def _read_shape(name_or_path: str, fetch: bool = True) -> dict[str, Any] | None:
    """The model's config (widths, positions) without loading its weights; ``None`` where there is none (or,
    with ``fetch=False``, where it would have to come from the hub)."""
    if name_or_path == TINY_LLAMA:
        return tiny_llama_config().to_dict()
    if name_or_path == SMOLLM2:
        cached = cache_dir() / SMOLLM2 / "config.json"
        return json.loads(cached.read_text()) if cached.is_file() else dict(_SMOLLM2_SHAPE)
    config = Path(name_or_path).expanduser() / "config.json"
    if fetch and not config.is_file() and not Path(name_or_path).expanduser().exists():
        config = _hub_config(name_or_path)
    return json.loads(config.read_text()) if config.is_file() else None


def model_widths(shape: dict[str, Any] | None, modules: tuple[str, ...]) -> dict[str, int]:
    """``in_features`` of each target module name that the model's config (``shape``) describes."""
    if shape is None:
        return {}
    shape = shape.get("text_config", shape)  # multimodal configs nest the language model's
    widths = {}
    for module in modules:
        if module in _IN_FEATURES:
            try:
                widths[module] = int(_IN_FEATURES[module](shape))
            except (KeyError, TypeError):
                continue
    return widths


def _check_groups(model: str, group_size: int, widths: dict[str, int]) -> None:
    for module, width in widths.items():
        try:
            granularity(group_size).group_size(width)
        except ValueError as err:
            raise ConfigError(f"method.group_size={group_size} does not fit model {model!r} ({module}): {err}") from None


def _check_optim(cfg: DictConfig) -> None:
    optim = cfg.optim
    if optim.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={optim.schedule!r} must be one of {sorted(SCHEDULES)}")
    for key in ("lr", "weight_decay"):
        unknown = sorted(set(optim[key]) - set(ROLES))
        if unknown:
            raise ConfigError(f"optim.{key} has unknown role(s) {unknown}; roles: {list(ROLES)}")
    if int(optim.warmup_steps) < 0:
        raise ConfigError(f"optim.warmup_steps={optim.warmup_steps} must be >= 0")
    limit = OmegaConf.select(cfg, "divergence.loss_vs_uniform")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 1):
        raise ConfigError(f"divergence.loss_vs_uniform={limit!r} must be null or a number above 1 "
                          "(a model at initialisation may sit at the uniform guess's loss)")
    for role, lr in optim.lr.items():
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
            raise ConfigError(f"optim.lr.{role}={lr!r} must be a finite number >= 0")


# Lightning settings that train less than max_steps full batches: a run with them could not be recorded ok.
SHORTENED = {"fast_dev_run": (False, 0, None), "limit_train_batches": (1.0, None), "overfit_batches": (0, 0.0, None),
             "max_time": (None,)}


def _check_trainer(cfg: DictConfig, method: MethodConfig) -> None:
    for key, allowed in SHORTENED.items():
        value = cfg.trainer.get(key)
        if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            raise ConfigError(f"trainer.{key}={value!r} trains less than the config says, and a run record must "
                              f"never claim steps that did not happen; for a short run set trainer.max_steps")
    steps = int(cfg.trainer.get("max_steps", -1))
    if steps <= 0:
        raise ConfigError("trainer.max_steps must be a positive number of optimizer steps (runs are step-based)")
    late = [b for b in method.phase_boundaries() if b >= steps]
    if late:  # e.g. DL-QAT's phase 1 or L4Q's warm-up outlasting the run: its last phase would never train
        raise ConfigError(f"method {method.name!r} changes phase at step {late[0]}, but the run has only "
                          f"trainer.max_steps={steps}: its last phase would never run; shorten the phase "
                          "(method.quant_steps / method.warmup_steps) or train longer")


def _check_lengths(cfg: DictConfig, shape: dict[str, Any] | None) -> None:
    """Every sequence length the run uses fits the model's positions."""
    limit = (shape or {}).get("text_config", shape or {}).get("max_position_embeddings")
    lengths = {"data.datamodule.seq_len": OmegaConf.select(cfg, "data.datamodule.seq_len"),
               "data.datamodule.max_length": OmegaConf.select(cfg, "data.datamodule.max_length"),
               "eval.seq_len": OmegaConf.select(cfg, "eval.seq_len"),
               "eval.corpus.seq_len": OmegaConf.select(cfg, "eval.corpus.seq_len")}
    for key, value in lengths.items():
        if value is None:
            continue
        if int(value) < 2:
            raise ConfigError(f"{key}={value} must be at least 2")
        if limit and int(value) > int(limit):
            raise ConfigError(f"{key}={value} exceeds the model's max_position_embeddings={limit}")


def _check_datamodule(cfg: DictConfig) -> None:
    """A DataModule class with a ``check_config(fields)`` (generated data's settings) checks its node first."""
    node = OmegaConf.select(cfg, "data.datamodule")
    target = node.get("_target_") if node is not None else None
    if not target:
        return
    from hydra.utils import get_class

    try:
        cls = get_class(target)
    except Exception as err:  # noqa: BLE001 - a misspelled class path: one line, not Hydra's traceback
        raise ConfigError(f"data.datamodule._target_={target!r} cannot be imported ({type(err).__name__})") from None
    check = getattr(cls, "check_config", None)
    if check is None:
        return
    try:
        check({k: v for k, v in _fields(node).items() if k != "_target_"})
    except ValueError as err:
        raise ConfigError(f"data.datamodule: {err}") from None


def _check_data_contents(cfg: DictConfig) -> None:
    """Local data files read and checked, hub datasets looked up (see :mod:`qaft.data.checks`)."""
    from qaft.data.checks import check_data
    from qaft.models import load_tokenizer

    data = cfg.data
    length = OmegaConf.select(cfg, "data.datamodule.max_length" if data.kind == "instruct" else "data.datamodule.seq_len")
    try:
        tokenizer = None if data.source in ("quiz", "austen") else load_tokenizer(cfg.model.name_or_path)
        check_data(data.kind, data.source, data.get("config"), tokenizer, int(length or 2))
    except ValueError as err:
        raise ConfigError(f"data: {err}") from None


CORPUS_KEYS = ("name", "source", "split", "seq_len", "batch_size")


def _check_corpus(eval_cfg: DictConfig) -> None:
    corpus = eval_cfg.get("corpus")
    if not corpus:
        return
    missing = [k for k in CORPUS_KEYS if corpus.get(k) in (None, "")]
    if missing:
        raise ConfigError(f"eval.corpus needs {missing} (e.g. name=wikitext2 source=wikitext "
                          "config=wikitext-2-raw-v1 split=test seq_len=2048 batch_size=1)")
    try:
        validate_data_source("lm", corpus.source)
    except ValueError as err:
        raise ConfigError(f"eval.corpus: {err}") from None


def _check_callbacks(cfg: DictConfig) -> None:
    for name, node in (cfg.get("callbacks") or {}).items():
        if node and not OmegaConf.select(node, "_target_"):
            raise ConfigError(f"callbacks.{name} needs a _target_ (a pytorch_lightning.Callback class path)")


def _check_progress(cfg: DictConfig) -> None:
    node = cfg.get("progress") or {}
    steps, seconds = node.get("every_n_steps", 10), node.get("every_s", 30)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"progress.every_n_steps={steps!r} must be a whole number >= 0 (0: no training lines)")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
        raise ConfigError(f"progress.every_s={seconds!r} must be a number of seconds >= 0")


def _check_resume(cfg: DictConfig) -> None:
    choice = str(cfg.get("resume", "auto"))
    if choice not in ("auto", "never") and not Path(choice).expanduser().is_file():
        raise ConfigError(f"resume={choice!r} must be auto, never or an existing .ckpt file")


def validate(cfg: DictConfig, resources: bool = True) -> RunSpec:
    """Check the whole composed config; raise :class:`ConfigError` (one line) on the first problem.

    ``resources=False`` checks the config alone: no hub lookups (a hub model's widths, a hub dataset) and no
    reading of local data files (what ``qaft-train`` checks on top, before it writes anything).
    """
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required value(s) {missing}: set them on the command line, e.g. {missing[0]}=...")
    try:
        method = method_config(cfg.method)
        eval_gptq = _eval_gptq(cfg.eval)
        bits, group_size = int(cfg.method.bits), int(cfg.method.group_size)
        if bits not in VALID_BITS:
            raise ValueError(f"method.bits must be one of {VALID_BITS}, got {bits}")
        granularity(group_size)
        validate_model_source(cfg.model.name_or_path)
        validate_data_source(cfg.data.kind, cfg.data.source)
        for task in cfg.eval.get("tasks") or []:
            parse_task(task)
    except (ValueError, EvalError) as err:
        raise ConfigError(str(err)) from None
    if cfg.model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype={cfg.model.dtype!r} must be one of {list(DTYPES)}")
    shape = _read_shape(cfg.model.name_or_path, fetch=resources)
    _check_groups(cfg.model.name_or_path, group_size, model_widths(shape, method.target_modules))
    _check_lengths(cfg, shape)
    _check_datamodule(cfg)
    _check_optim(cfg)
    _check_trainer(cfg, method)
    _check_resume(cfg)
    _check_progress(cfg)
    _check_corpus(cfg.eval)
    _check_callbacks(cfg)
    if resources:
        _check_data_contents(cfg)
    return run_spec(cfg, method, bits, group_size, eval_gptq)


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
    import torch

    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def experiments_dir() -> str:
    """The ``experiments/`` folder, which Hydra searches for the tables' experiment configs."""
    return str(paths.experiments_dir())


def fraction_of_steps(fraction: float, steps: int) -> int:
    """``${qaft.steps_fraction:0.2,${trainer.max_steps}}``: a phase length as a share of the run (at least 1)."""
    return max(1, int(float(fraction) * int(steps)))


def register_conf() -> None:
    """What ``conf/train.yaml`` needs from Python (idempotent): the method schemas and the GPTQ options' schema
    (:mod:`qaft.training.schemas`), and the resolvers ``${qaft.run_name:...}``, ``${qaft.digest:}``
    (:mod:`qaft.training.identity`), ``${qaft.precision:...}``, ``${qaft.steps_fraction:...}``, ``${qaft.experiments_dir:}``.

    Not done at import (importing qaft changes no global state): whatever composes ``conf/train.yaml`` calls it
    first, as :mod:`qaft.training.cli` does.
    """
    from qaft.training.identity import digest_resolver

    register_method_schemas()
    for name, fn in (("qaft.run_name", run_name), ("qaft.digest", digest_resolver), ("qaft.precision", precision),
                     ("qaft.steps_fraction", fraction_of_steps), ("qaft.experiments_dir", experiments_dir)):
        OmegaConf.register_new_resolver(name, fn, replace=True)
