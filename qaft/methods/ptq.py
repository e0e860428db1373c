"""Post-training quantization baseline: round-to-nearest per group (``minmax``, ``mse`` or ``l4q`` ranges),
or GPTQ (``algorithm="gptq"``, from calibration data; see :mod:`qaft.methods.gptq_model`).

Nothing trains; the layer is already the deployable :class:`~qaft.quant.linear.QuantizedLinear`.
``zero_point="int"`` quantizes on the integer-zero grid of GPTQ / AutoGPTQ (``b = s (2^(n-1) - z)``), RTN and
GPTQ alike. With GPTQ the config asks for calibration data (:meth:`PTQConfig.calibration`) and
``qaft.apply_method(model, config, calib_batches=...)`` quantizes the whole model from it.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from qaft.methods.config import GPTQFields, QuantMethodConfig, choice, register
from qaft.methods.gptq_model import gptq_quantize_with
from qaft.quant.gptq import GPTQOptions
from qaft.quant.linear import QuantizedLinear, rtn_quantize_linear


@register
@dataclass(kw_only=True)
class PTQConfig(QuantMethodConfig, GPTQFields):
    """PTQ; ``calib_batches``, ``act_order`` and ``percdamp`` apply with ``algorithm='gptq'``."""

    name = "ptq"
    algorithm: str = "rtn"       # rtn | gptq

    def validate(self) -> None:
        super().validate()
        choice("algorithm", self.algorithm, ("rtn", "gptq"))
        self.gptq_options()

    def calibration(self) -> GPTQOptions | None:
        return self.gptq_options() if self.algorithm == "gptq" else None

    def apply_calibrated(self, model: nn.Module, calib_batches: Iterable[Any]) -> None:
        """Sequential GPTQ of the whole model: its target linears become :class:`QuantizedLinear`."""
        gptq_quantize_with(model, calib_batches, self)

    def make_layer(self, linear: nn.Linear) -> QuantizedLinear:
        if self.algorithm == "gptq":
            raise ValueError("ptq with algorithm='gptq' needs calibration data: use "
                             "qaft.apply_method(model, config, calib_batches=batches)")
        return rtn_quantize_linear(linear, self.bits, self.group_size, self.init, self.symmetric, self.zero_point)
