"""qaft.models: loading causal LMs, the offline built-ins (SmolLM2-135M from its GGUF, the tiny random LLaMA)
and any Hugging Face hub id or local folder."""
from qaft.quiet import quiet_imports

with quiet_imports():  # transformers imports torchao, whose import logs noise (qaft.quiet)
    from qaft.models.loading import (
        BUILTIN_MODELS,
        load_causal_lm,
        load_tokenizer,
        resolve_model_source,
        validate_model_source,
    )
    from qaft.models.smollm2 import SMOLLM2, cache_dir, ensure_smollm2_cache, smollm2_gguf_path
    from qaft.models.tiny import (
        TINY_CONFIGS,
        TINY_GPT2,
        TINY_LLAMA,
        build_tiny,
        build_tiny_llama,
        tiny_config,
        tiny_llama_config,
    )

__all__ = ["BUILTIN_MODELS", "SMOLLM2", "TINY_CONFIGS", "TINY_GPT2", "TINY_LLAMA", "build_tiny", "build_tiny_llama",
           "cache_dir", "ensure_smollm2_cache", "load_causal_lm", "load_tokenizer", "resolve_model_source",
           "smollm2_gguf_path", "tiny_config", "tiny_llama_config", "validate_model_source"]
