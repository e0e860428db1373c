"""Post-training quantization baseline: round-to-nearest per group (``minmax``, ``mse`` or ``l4q`` ranges),
GPTQ (``algorithm="gptq"``, from calibration data; see :mod:`qaft.methods.gptq_model`), or SmoothQuant
(``algorithm="smoothquant"``: smoothing with ``smooth_alpha`` from calibration data, then RTN; see
:mod:`qaft.methods.smoothquant`; the W-A-KV 4-8-8 rows use it with ``group_size=-1``, ``act_bits=kv_bits=8``).

Nothing trains; the layer is already the deployable :class:`~qaft.quant.linear.QuantizedLinear`.
``zero_point="int"`` quantizes on the integer-zero grid of GPTQ / AutoGPTQ (``b = s (2^(n-1) - z)``), RTN and
GPTQ alike. With GPTQ or SmoothQuant the config asks for calibration data (:meth:`PTQConfig.calibration_options`) and
``qaft.apply_method(model, config, calib_batches=...)`` quantizes the whole model from it.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from qaft.methods.config import INTEGER, GPTQFields, MethodTraits, QuantMethodConfig, choice, register, rtn_only_init
from qaft.methods.gptq_model import gptq_quantize_with
from qaft.methods.smoothquant import check_alpha, smoothquant_quantize_model
from qaft.quant.gptq import GPTQOptions
from qaft.quant.linear import QuantizedLinear, rtn_quantize_linear


@register
@dataclass(kw_only=True)
class PTQConfig(QuantMethodConfig, GPTQFields):
    """PTQ; ``calib_batches`` applies with ``algorithm='gptq'`` or ``'smoothquant'``, ``act_order`` and
    ``percdamp`` with ``'gptq'``, ``smooth_alpha`` (SmoothQuant's migration strength α in (0, 1]) with
    ``'smoothquant'``."""

    name = "ptq"
    traits = MethodTraits(merges_to=INTEGER, bit_exact=True)  # nothing trains: the layer is the deployed one
    example_fields: ClassVar = {"group_size": 32}
    calibrated_fields: ClassVar = ({"algorithm": "gptq"}, {"algorithm": "smoothquant"})
    algorithm: str = "rtn"       # rtn | gptq | smoothquant
    smooth_alpha: float = 0.5

    def validate(self) -> None:
        super().validate()
        choice("algorithm", self.algorithm, ("rtn", "gptq", "smoothquant"))
        check_alpha(self.smooth_alpha)
        self.gptq_options()
        rtn_only_init(self.init, self.algorithm)

    def calibration_options(self) -> GPTQOptions | None:
        # SmoothQuant reads only calib_batches from these options: one definition of how much data to take.
        return self.gptq_options() if self.algorithm in ("gptq", "smoothquant") else super().calibration_options()

    def apply_calibrated(self, model: nn.Module, calib_batches: Iterable[Any]) -> None:
        """Sequential GPTQ, or SmoothQuant then RTN, of the whole model: its target linears become
        :class:`QuantizedLinear`."""
        if self.algorithm == "smoothquant":
            smoothquant_quantize_model(model, calib_batches, self.bits, self.group_size, self.smooth_alpha,
                                       self.init, self.symmetric, self.zero_point, self.target_modules, inplace=True)
        else:
            gptq_quantize_with(model, calib_batches, self)

    def make_layer(self, linear: nn.Linear) -> QuantizedLinear:
        if self.algorithm != "rtn":
            raise ValueError(f"ptq with algorithm={self.algorithm!r} needs calibration data: use "
                             "qaft.apply_method(model, config, calib_batches=batches)")
        return rtn_quantize_linear(linear, self.bits, self.group_size, self.init, self.symmetric, self.zero_point)
