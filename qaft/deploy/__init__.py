"""qaft.deploy: fast inference layers, fused projections, a compiled greedy decode loop, packed integer
format, Hugging Face (torchao, ``hf_export``) and GGUF export of merged models.

Its names load on first use (:mod:`qaft.lazy`; GGUF export imports the gguf package only then):
``qaft-export --help`` imports this package without torch."""
from qaft.lazy import exports

_PUBLIC = {
    "export_gguf": "qaft.deploy.gguf_export", "greedy_generate": "qaft.deploy.decode",
    **dict.fromkeys(("DequantLinear", "Int4Linear", "Int8Linear", "Int8x8Linear", "backend_counts",
                     "inference_layer", "prepare_for_inference"), "qaft.deploy.kernels"),
    **dict.fromkeys(("load_quantized", "save_quantized"), "qaft.deploy.packed"),
}
__getattr__, __dir__ = exports(__name__, _PUBLIC)
__all__ = ["DequantLinear", "Int4Linear", "Int8Linear", "Int8x8Linear", "backend_counts", "export_gguf",
    "greedy_generate", "inference_layer", "load_quantized", "prepare_for_inference", "save_quantized"]
