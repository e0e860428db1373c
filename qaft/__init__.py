"""qaft: quantization-aware parameter-efficient fine-tuning of LLMs.

QLoRA, LoftQ, QA-LoRA, L4Q and DL-QAT (and the LoRA, PTQ, QAT-LoRA and full-QAT baselines) as drop-in
replacements for ``nn.Linear`` with one shared integer quantizer, exact merges to deployable integer
models, and one training pipeline.

The public names load on first use (:mod:`qaft.lazy`), not at ``import qaft``: every module of qaft imports this
package first, and a command-line tool's ``--help`` must not wait for torch.
"""
from importlib.metadata import version

from qaft.lazy import exports

_PUBLIC = {
    "methods": "qaft.methods", "quant": "qaft.quant",
    **dict.fromkeys(("load_quantized", "prepare_for_inference", "save_quantized"), "qaft.deploy"),
    **dict.fromkeys(("apply_method", "available", "config_for", "count_parameters", "merge_model",
                     "parameter_groups", "ptq_model", "set_training_step"), "qaft.methods"),
}
__getattr__, __dir__ = exports(__name__, _PUBLIC)
__version__ = version("qaft")
__all__ = ["apply_method", "available", "config_for", "count_parameters", "load_quantized", "merge_model", "methods",
    "parameter_groups", "prepare_for_inference", "ptq_model", "quant", "save_quantized", "set_training_step"]
