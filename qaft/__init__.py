"""qaft: quantization-aware parameter-efficient fine-tuning of LLMs.

QLoRA, LoftQ, QA-LoRA, L4Q and DL-QAT (and the LoRA, PTQ, QAT-LoRA and full-QAT baselines) as drop-in
replacements for ``nn.Linear`` with one shared integer quantizer, exact merges to deployable integer
models, and one training pipeline.
"""
from importlib.metadata import version

from qaft.quiet import quiet_imports

with quiet_imports():  # through qaft.deploy, transformers imports torchao, whose import logs noise (qaft.quiet)
    from qaft import methods, quant
    from qaft.deploy import load_quantized, prepare_for_inference, save_quantized
    from qaft.methods import (
        apply_method,
        available,
        config_for,
        count_parameters,
        merge_model,
        parameter_groups,
        ptq_model,
        set_training_step,
    )

__version__ = version("qaft")
__all__ = [
    "apply_method", "available", "config_for", "count_parameters", "load_quantized", "merge_model", "methods",
    "parameter_groups", "prepare_for_inference", "ptq_model", "quant", "save_quantized", "set_training_step",
]
