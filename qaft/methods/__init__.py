"""qaft.methods: one small file per method, each a config dataclass plus its layer, registered by name."""
from qaft.methods import dlqat, l4q, loftq, lora, ptq, qalora, qat, qat_lora, qlora  # noqa: F401  (registration)
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
from qaft.methods.layer import QaftLinear
from qaft.quant.linear import QuantizedLinear

__all__ = ["DEFAULT_TARGETS", "MethodConfig", "QaftLinear", "QuantizedLinear", "apply_method", "available",
           "config_for", "count_parameters", "merge_model", "parameter_groups", "ptq_model", "qaft_layers",
           "set_training_step"]
