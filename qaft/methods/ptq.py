"""Post-training quantization baseline: round-to-nearest per group (``minmax``, ``mse`` or ``l4q`` ranges).

Nothing trains; the layer is already the deployable :class:`~qaft.methods.deploy.QuantizedLinear`.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qaft.methods.config import QuantMethodConfig, register
from qaft.methods.deploy import QuantizedLinear, rtn_quantize_linear


@register
@dataclass(kw_only=True)
class PTQConfig(QuantMethodConfig):
    name = "ptq"

    def make_layer(self, linear: nn.Linear) -> QuantizedLinear:
        return rtn_quantize_linear(linear, self.bits, self.group_size, self.init, self.symmetric)
