"""Post-training quantization baseline: round-to-nearest per group (``minmax``, ``mse`` or ``l4q`` ranges),
or GPTQ (``algorithm="gptq"``, from calibration data; see :mod:`qaft.methods.gptq_model`).

Nothing trains; the layer is already the deployable :class:`~qaft.quant.linear.QuantizedLinear`.
``zero_point="int"`` quantizes on the integer-zero grid of GPTQ / AutoGPTQ (``b = s (2^(n-1) - z)``), RTN and
GPTQ alike.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qaft.methods.config import QuantMethodConfig, choice, register
from qaft.quant.linear import QuantizedLinear, rtn_quantize_linear


@register
@dataclass(kw_only=True)
class PTQConfig(QuantMethodConfig):
    name = "ptq"
    algorithm: str = "rtn"       # rtn | gptq
    act_order: bool = False      # GPTQ: visit columns by descending Hessian diagonal
    percdamp: float = 0.01       # GPTQ: dampening, a fraction of the Hessian's mean diagonal
    calib_batches: int = 16      # GPTQ: calibration batches taken from the run's training data

    def validate(self) -> None:
        super().validate()
        choice("algorithm", self.algorithm, ("rtn", "gptq"))
        if self.percdamp < 0 or self.calib_batches < 1:
            raise ValueError(f"percdamp must be >= 0 and calib_batches >= 1, got {self.percdamp}, {self.calib_batches}")

    def make_layer(self, linear: nn.Linear) -> QuantizedLinear:
        if self.algorithm == "gptq":
            raise ValueError("ptq with algorithm='gptq' needs calibration data: use "
                             "qaft.methods.gptq_model.apply_method_calibrated(model, config, batches)")
        return rtn_quantize_linear(linear, self.bits, self.group_size, self.init, self.symmetric, self.zero_point)
