"""qaft.quant: the shared integer affine quantizer (functions, and the trainable :class:`AffineQuantizer` that method
layers hold), its initialisations, GPTQ, NF4, bit packing, the deployable ``QuantizedLinear``, and the dynamic
per-token activation / KV-cache quantizer (:mod:`qaft.quant.activation`)."""
from qaft.quant.activation import (
    ACT_BITS,
    PerTokenQuantizer,
    dequantize_per_token,
    fake_quantize_per_token,
    quantize_per_token,
)
from qaft.quant.affine import (
    VALID_BITS,
    dequantize,
    fake_quantize,
    fake_quantize_reference,
    lsq_grad_scale,
    qrange,
    quantize,
)
from qaft.quant.granularity import PerChannel, PerGroup, granularity
from qaft.quant.init import Init, init_scale_offset
from qaft.quant.module import AffineQuantizer
from qaft.quant.nf4 import NF4Tensor, nf4_dequantize, nf4_quantize
from qaft.quant.packing import pack_codes, to_int4pack_cpu, unpack_codes

__all__ = [
    "ACT_BITS", "VALID_BITS", "AffineQuantizer", "PerTokenQuantizer", "dequantize_per_token",
    "fake_quantize_per_token", "quantize_per_token", "Init", "NF4Tensor", "PerChannel", "PerGroup",
    "dequantize", "fake_quantize", "fake_quantize_reference", "granularity", "init_scale_offset",
    "lsq_grad_scale", "nf4_dequantize", "nf4_quantize", "pack_codes", "qrange", "quantize",
    "to_int4pack_cpu", "unpack_codes",
]
