"""qaft.methods: one small file per method, each a config dataclass plus its layer, registered by name.

Shared pieces: :mod:`~qaft.methods.layer` (the base :class:`QaftLinear`, phases, roles, the trainable quantizer,
LoRA), :mod:`~qaft.methods.frozen_base` (LoRA over a frozen NF4 or integer base), :mod:`~qaft.methods.lowrank_qat`
(LoRA inside the quantizer), :mod:`~qaft.methods.gptq_model` (GPTQ for the configs that need calibration data) and
:mod:`~qaft.methods.distill` (the logit-distillation loss of methods with a teacher, LLM-QAT).
"""
from qaft.methods import dlqat, l4q, llm_qat, loftq, lora, ptq, qalora, qat, qat_lora, qlora  # noqa: F401  (registration)
from qaft.methods.api import (
    apply_method,
    count_parameters,
    merge_model,
    parameter_groups,
    ptq_model,
    qaft_layers,
    set_training_step,
)
from qaft.methods.config import DEFAULT_TARGETS, MethodConfig, available, config_for
from qaft.methods.gptq_model import gptq_quantize_model
from qaft.methods.layer import QaftLinear
from qaft.quant.gptq import GPTQOptions
from qaft.quant.linear import QuantizedLinear

__all__ = ["DEFAULT_TARGETS", "GPTQOptions", "MethodConfig", "QaftLinear", "QuantizedLinear", "apply_method",
           "available", "config_for", "count_parameters", "gptq_quantize_model", "merge_model", "parameter_groups",
           "ptq_model", "qaft_layers", "set_training_step"]
