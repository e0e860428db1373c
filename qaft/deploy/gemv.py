"""The output projection's one-token product, written so that ``torch.compile`` makes it one fused loop.

At batch 1 a decode step's largest product is the output projection (SmolLM2: 49152 x 576, 57 MB in bf16, read
once per token). PyTorch's CPU kernel for a bf16 matrix-vector product takes 3.0-3.2 ms for it (~18 GB/s), a
third of an int4 model's token. Written as ``(W.float() * x.float()).sum(-1)``, inductor emits one vectorized
reduction that converts each weight in registers and accumulates in float32, as the GEMM does: 1.7-2.0 ms, the
same result up to summation order (2 cores, ``experiments/bench/inference.py --gemv``, its "output" entry;
results/bench_inference.md).

:class:`OneRowLinear` does that only while being traced by ``torch.compile`` on CPU for a single row; eagerly
(where the same expression would materialise a float32 copy of the matrix) and for longer inputs it is
``F.linear`` on the input flattened to 2-D. That flattening matters too: the prompt's last position, which HF
passes as a (1, 1, d) view with the prompt's strides, makes ``F.linear`` take a batched path that copies the
transposed matrix first (SmolLM2 bf16: 32.8 ms instead of 3.3 per prompt, about 0.5 ms per token of a 64-token
answer; experiments/bench/decode_ablation.py). It holds the original parameters, so tied embeddings stay tied.
"""
from __future__ import annotations

import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _matvec(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (weight.float() * x.float()).sum(-1).to(x.dtype)


_COMPILED: dict[tuple, Callable] = {}


def _compiled_matvec(weight: torch.Tensor) -> Callable:
    """A compiled :func:`_matvec` per weight shape and dtype, each with its own code object: dynamo's limit of 8
    recompiles per code object would otherwise, past a few models, silently run the uncompiled expression (which
    materialises a float32 copy of the matrix)."""
    key = (tuple(weight.shape), weight.dtype, weight.device)
    if key not in _COMPILED:
        fn = types.FunctionType(_matvec.__code__.replace(), _matvec.__globals__, _matvec.__name__)
        _COMPILED[key] = torch.compile(fn, dynamic=False)
    return _COMPILED[key]


@torch.library.custom_op("qaft::one_row_matvec", mutates_args=())
def one_row_matvec(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight @ x`` for a vector ``x`` as its own compiled loop: opaque to an enclosing compiled graph, which would
    otherwise fuse the producer of ``x`` (the final norm) and the consumer of the result (argmax) into the loop
    over the matrix (seen in a profile of SmolLM2's decode step: 2.9 ms for that kernel instead of 1.8)."""
    return _compiled_matvec(weight)(x, weight)


@one_row_matvec.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(weight.shape[0])


class OneRowLinear(nn.Linear):
    """``nn.Linear`` whose compiled single-row product on CPU is a fused multiply-and-sum (module docstring)."""

    @classmethod
    def wrap(cls, linear: nn.Linear) -> "OneRowLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias  # the same Parameters: ties survive
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() == x.shape[-1]:
            y = one_row_matvec(x.reshape(-1), self.weight)
            y = y if self.bias is None else y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features)
        # as 2-D: the last position of a longer prompt (HF's logits_to_keep) is a (1, 1, d) view with the prompt's
        # strides, which F.linear sends to a batched product that first copies the transposed matrix
        y = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


def one_row_output(model: nn.Module) -> nn.Module:
    """Swap ``model``'s output projection (a plain ``nn.Linear``) for :class:`OneRowLinear`, in place."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if type(head) is nn.Linear:
        model.set_output_embeddings(OneRowLinear.wrap(head))
    return model
