"""qaft.methods: one small file per method, each a config dataclass plus its layer, registered by name.

Shared pieces: :mod:`~qaft.methods.layer` (the base :class:`QaftLinear`, phases, roles, the trainable quantizer,
LoRA), :mod:`~qaft.methods.frozen_base` (LoRA over a frozen NF4 or integer base), :mod:`~qaft.methods.lowrank_qat`
(LoRA inside the quantizer), :mod:`~qaft.methods.gptq_model` (GPTQ for the configs that need calibration data) and
:mod:`~qaft.methods.distill` (the logit-distillation loss of methods with a teacher, LLM-QAT).

Every module of the package is imported here, so a method's file registers itself (``@register`` on its config,
with its :class:`MethodTraits`): adding a method is that file plus its preset ``conf/method/<name>.yaml``.
"""
import importlib
import pkgutil

from qaft.methods.api import (
    apply_method,
    count_parameters,
    merge_model,
    parameter_groups,
    ptq_model,
    qaft_layers,
    set_training_step,
)
from qaft.methods.config import (
    DEFAULT_TARGETS,
    FLOAT,
    INTEGER,
    MethodConfig,
    MethodTraits,
    available,
    config_for,
    registered,
    traits,
)
from qaft.methods.gptq_model import gptq_quantize_model
from qaft.methods.layer import QaftLinear
from qaft.quant.gptq import GPTQOptions
from qaft.quant.linear import QuantizedLinear

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
del _module

__all__ = ["DEFAULT_TARGETS", "FLOAT", "INTEGER", "GPTQOptions", "MethodConfig", "MethodTraits", "QaftLinear",
           "QuantizedLinear", "apply_method", "available", "config_for", "count_parameters", "gptq_quantize_model",
           "merge_model", "parameter_groups", "ptq_model", "qaft_layers", "registered", "set_training_step", "traits"]
