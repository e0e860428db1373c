"""qaft.deploy: fast inference layers, fused projections, a compiled greedy decode loop, packed integer
format, Hugging Face (torchao, ``hf_export``) and GGUF export of merged models."""
from qaft.deploy.decode import greedy_generate
from qaft.deploy.kernels import (
    DequantLinear,
    Int4Linear,
    Int8Linear,
    Int8x8Linear,
    backend_counts,
    inference_layer,
    prepare_for_inference,
)
from qaft.deploy.packed import load_quantized, save_quantized

__all__ = [
    "DequantLinear", "Int4Linear", "Int8Linear", "Int8x8Linear", "backend_counts", "export_gguf", "greedy_generate",
    "inference_layer", "load_quantized", "prepare_for_inference", "save_quantized",
]


def __getattr__(name: str):
    # GGUF export imports the gguf package; load it only when asked for.
    if name == "export_gguf":
        from qaft.deploy.gguf_export import export_gguf
        return export_gguf
    raise AttributeError(name)
