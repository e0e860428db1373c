"""The model a run config names, checked before any weight loads: its shape read from its ``config.json`` (built-in
models known without one; hub models fetch a few KB), the model built from that shape on the meta device, and the
method's targets and group sizes resolved on it (:func:`check_model`, called by
:func:`qaft.training.config.validate`)."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from qaft.methods import MethodConfig
from qaft.methods.api import plan_targets
from qaft.methods.targets import TargetError
from qaft.models import SMOLLM2, TINY_CONFIGS, cache_dir, tiny_config
from qaft.quant.granularity import granularity
from qaft.training.errors import ConfigError

# SmolLM2-135M's shape, so a bad group size or target is caught before the first (slow) GGUF conversion.
_SMOLLM2_SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "head_dim": 64,
                  "num_key_value_heads": 3, "num_hidden_layers": 30, "vocab_size": 49152,
                  "tie_word_embeddings": True, "max_position_embeddings": 8192, "model_type": "llama"}


def _hub_config(repo: str) -> Path:
    """A hub model's ``config.json`` (from the local cache, or fetched: a few KB); one line when it cannot be."""
    from huggingface_hub import constants, hf_hub_download

    try:
        return Path(hf_hub_download(repo, "config.json"))
    except Exception as err:  # noqa: BLE001 - offline, unreachable, gated or missing: all one line
        offline = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if constants.HF_HUB_OFFLINE else ""
        raise ConfigError(f"model {repo!r}: cannot get its config.json from the Hugging Face hub{offline}: "
                          f"{type(err).__name__}") from None


def read_shape(name_or_path: str, fetch: bool = True) -> dict[str, Any] | None:
    """The model's config (widths, positions) without loading its weights; ``None`` where there is none (or,
    with ``fetch=False``, where it would have to come from the hub)."""
    if name_or_path in TINY_CONFIGS:
        return tiny_config(name_or_path).to_dict()
    if name_or_path == SMOLLM2:
        cached = cache_dir() / SMOLLM2 / "config.json"
        return json.loads(cached.read_text()) if cached.is_file() else dict(_SMOLLM2_SHAPE)
    config = Path(name_or_path).expanduser() / "config.json"
    if fetch and not config.is_file() and not Path(name_or_path).expanduser().exists():
        config = _hub_config(name_or_path)
    return json.loads(config.read_text()) if config.is_file() else None


def meta_model(shape: dict[str, Any] | None) -> Any:
    """The model a config describes, built on the meta device (module names and shapes, no memory, no weights);
    ``None`` where transformers cannot build it from the config alone. Read only: cached per config."""
    return None if shape is None else _meta_model(json.dumps(shape, sort_keys=True, default=str))


@functools.lru_cache(maxsize=4)
def _meta_model(shape_json: str) -> Any:
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    shape = json.loads(shape_json)
    try:
        config = CONFIG_MAPPING[shape["model_type"]].from_dict(shape)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - an unknown or unusual config: the load itself will say what is wrong
        return None


def check_model(cfg: DictConfig, method: MethodConfig, group_size: int, shape: dict[str, Any] | None) -> None:
    """The targets resolve on the model (built on the meta device from its config, before any weight loads): every
    name is one of its linear layers, an integer method leaves no block weight float, and the method's and the
    deployment's group sizes divide every target's width."""
    model = meta_model(shape)
    if model is None:
        return
    name = cfg.model.name_or_path
    try:
        plan = plan_targets(model, method)
    except TargetError as err:
        field = "method." if str(err).startswith("target_modules") else ""
        raise ConfigError(f"model {name!r}: {field}{err}") from None
    except ValueError as err:  # a layer's shape does not fit the method (its group size)
        raise ConfigError(f"method.group_size={getattr(method, 'group_size', None)} does not fit model {name!r}: "
                          f"{err}") from None
    for target in plan.quantized:
        layer = model.get_submodule(target)
        width = layer.in_features if isinstance(layer, torch.nn.Linear) else layer.weight.shape[0]
        try:
            granularity(group_size).group_size(width)
        except ValueError as err:
            raise ConfigError(f"method.group_size={group_size} does not fit model {name!r} ({target}): {err}"
                              ) from None
