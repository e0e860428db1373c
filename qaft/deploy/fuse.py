"""Fusing the projections that read the same input: q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``.

At batch 1 every projection of a small model is a GEMV of a few microseconds, so the fixed cost of a call
(dispatch, thread fork/join inside the kernel, Python) is a large share of it. One int4 call on the
concatenated weight replaces three (attention) or two (MLP). Measured on a 2-core AVX512 EPYC, SmolLM2
shapes, int4 with bf16 activations, eager: q+k+v 37 us -> 18 us, gate+up 42 us -> 33 us, per layer and
token; end to end, int4 decode 77 -> 85 tok/s under HF generate, 99 -> 114 tok/s in the compiled loop of
:mod:`qaft.deploy.decode` (results/bench_inference.md).

Fusion is exact: weights are concatenated along the output dimension, so each output row keeps its own
codes, scale, offset (or float row) and bias, and the product is split back in the original order.
Integer layers are fused as :class:`~qaft.quant.linear.QuantizedLinear` (same bits, group size and
input width), before the kernel layers are built; float layers as ``nn.Linear`` of one dtype.

Only modules whose ``forward`` is exactly transformers' ``LlamaAttention.forward`` / ``LlamaMLP.forward``
are fused (Llama, SmolLM2, TinyLlama): their forward is replaced, per instance, by the one below, which
computes the same thing from the fused layer. Other architectures are left as they are.
"""
from __future__ import annotations

import types
from typing import Callable

import torch
from torch import nn
from transformers.models.llama import modeling_llama as llama

from qaft.methods.act_kv import INPUT, OUTPUT
from qaft.methods.layer import float_linear
from qaft.quant.linear import QuantizedLinear


def _fused_linear(layers: list[nn.Module]) -> nn.Module | None:
    """One layer computing ``cat([l(x) for l in layers], -1)``, or None where they cannot be fused."""
    first = layers[0]
    if any(type(l) is not type(first) or l.in_features != first.in_features for l in layers):
        return None
    if any(hasattr(l, INPUT) or hasattr(l, OUTPUT) for l in layers):
        return None  # K/V quantize per token over their own outputs: one fused output would mix them with Q's
    if len({l.bias is None for l in layers}) > 1:
        return None
    bias = None if first.bias is None else torch.cat([l.bias.detach() for l in layers])
    if isinstance(first, QuantizedLinear):
        if any(l.bits != first.bits or l.group_size != first.group_size for l in layers):
            return None
        return QuantizedLinear(torch.cat([l.codes() for l in layers]), torch.cat([l.scale for l in layers]),
                               torch.cat([l.offset for l in layers]), first.bits, bias)
    if type(first) is nn.Linear and len({l.weight.dtype for l in layers}) == 1:
        return float_linear(torch.cat([l.weight.detach() for l in layers]), bias, first.weight.dtype)
    return None


def _attention_forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                       attention_mask: torch.Tensor | None = None, cache=None, **kwargs):
    # LlamaAttention.forward (transformers 5.x) with the three projections read from one product.
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = self.qkv_proj(hidden_states).split(self.qkv_sizes, dim=-1)
    query_states = q.reshape(hidden_shape).transpose(1, 2)
    key_states = k.reshape(hidden_shape).transpose(1, 2)
    value_states = v.reshape(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query_states, key_states = llama.apply_rotary_pos_emb(query_states, key_states, cos, sin)
    if cache is not None:
        key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
    attention_interface: Callable = llama.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, llama.eager_attention_forward)
    attn_output, attn_weights = attention_interface(
        self, query_states, key_states, value_states, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_up_proj(x).split(self.gate_up_sizes, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


# module forward to replace -> (names of the layers to fuse, fused name, sizes attribute, new forward)
_FUSIONS = {
    llama.LlamaAttention.forward: (("q_proj", "k_proj", "v_proj"), "qkv_proj", "qkv_sizes", _attention_forward),
    llama.LlamaMLP.forward: (("gate_proj", "up_proj"), "gate_up_proj", "gate_up_sizes", _mlp_forward),
}


@torch.no_grad()
def fuse_projections(model: nn.Module) -> int:
    """Fuse q/k/v and gate/up of every Llama attention and MLP block of ``model`` in place.

    Returns the number of blocks fused. Blocks whose layers differ in type, width or quantization layout,
    or whose class overrides ``forward``, are left unchanged.
    """
    fused_count = 0
    for module in list(model.modules()):
        spec = _FUSIONS.get(getattr(type(module), "forward", None))
        if spec is None:
            continue
        names, fused_name, sizes_attr, forward = spec
        layers = [getattr(module, n) for n in names]
        fused = _fused_linear(layers)
        if fused is None:
            continue
        for n in names:
            delattr(module, n)  # the fused copy replaces them: no duplicate weights
        setattr(module, fused_name, fused)
        setattr(module, sizes_attr, [l.out_features for l in layers])
        module.forward = types.MethodType(forward, module)
        fused_count += 1
    return fused_count
