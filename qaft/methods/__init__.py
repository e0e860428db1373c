"""qaft.methods: one small file per method, each a config dataclass plus its layer, registered by name."""
from qaft.methods import dlqat, l4q, loftq, lora, ptq, qalora, qat, qat_lora, qlora  # noqa: F401  (registration)
from qaft.methods.config import DEFAULT_TARGETS, MethodConfig, available, config_for
from qaft.methods.deploy import QuantizedLinear
from qaft.methods.layer import QaftLinear

__all__ = ["DEFAULT_TARGETS", "MethodConfig", "QaftLinear", "QuantizedLinear", "available", "config_for"]
