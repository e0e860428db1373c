"""Where K and V sit in the output of a fused attention projection, so the KV-cache quantizer sees exactly them.

The KV-cache quantizer (:mod:`qaft.methods.act_kv`) quantizes one token's K (and, separately, V) over all heads,
per token and symmetric, where the projection produces them. With separate ``k_proj`` / ``v_proj`` that is their
whole output. Fused projections emit Q, K and V in one output, laid out per architecture (read from each
modeling file's split of the output):

* ``gpt2`` ``c_attn``: ``[q | k | v]``, each ``n_embd`` wide;
* ``phi3`` ``qkv_proj``: ``[q | k | v]`` with grouped-query sizes (``n_heads * d``, ``n_kv * d``, ``n_kv * d``);
* ``gpt_neox`` and ``bloom`` ``query_key_value``: per head ``[q_h | k_h | v_h]``, ``d`` each;
* ``falcon`` ``query_key_value``: the new decoder architecture groups per KV head ``[q ... q | k | v]``; multi-query
  is ``[q (all heads) | k | v]`` (one head each); the original layout is per head like GPT-NeoX.

:func:`fused_kv_parts` returns, per fused module, the output columns of K and of V;
:class:`FusedKVQuantizer` quantizes exactly those columns, each part per token as ``k_proj`` / ``v_proj``
outputs are (the per-token maximum does not depend on the order of the columns, so gathering them is exact).
Any other fused layout is refused for ``kv_bits`` in one line.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qaft.quant.activation import PerTokenQuantizer, fake_quantize_per_token

Parts = tuple[torch.Tensor, torch.Tensor]  # output column indices of K and of V


def _span(start: int, width: int) -> list[int]:
    return list(range(start, start + width))


def _parts(k: list[int], v: list[int]) -> Parts:
    return torch.tensor(k, dtype=torch.long), torch.tensor(v, dtype=torch.long)


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _per_head(n_heads: int, d: int) -> Parts:
    """``[q_h | k_h | v_h]`` for each head ``h``."""
    return _parts([i for h in range(n_heads) for i in _span(3 * d * h + d, d)],
                  [i for h in range(n_heads) for i in _span(3 * d * h + 2 * d, d)])


def _gpt2(config: Any) -> Parts:
    e = config.n_embd
    return _parts(_span(e, e), _span(2 * e, e))


def _phi3(config: Any) -> Parts:
    d = _head_dim(config)
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    return _parts(_span(q, kv), _span(q + kv, kv))


def _gpt_neox(config: Any) -> Parts:
    return _per_head(config.num_attention_heads, config.hidden_size // config.num_attention_heads)


def _bloom(config: Any) -> Parts:
    return _per_head(config.n_head, config.hidden_size // config.n_head)


def _falcon(config: Any) -> Parts:
    heads, d = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    if config.new_decoder_architecture:
        groups = config.num_kv_heads
        width = (heads // groups + 2) * d  # each group's queries, then its key and value
        return _parts([i for g in range(groups) for i in _span(g * width + width - 2 * d, d)],
                      [i for g in range(groups) for i in _span(g * width + width - d, d)])
    if config.multi_query:
        return _parts(_span(heads * d, d), _span((heads + 1) * d, d))
    return _per_head(heads, d)


# model_type -> (the fused projection's name, its K / V columns from the model config)
FUSED_LAYOUTS: dict[str, tuple[str, Callable[[Any], Parts]]] = {
    "gpt2": ("c_attn", _gpt2), "phi3": ("qkv_proj", _phi3), "gpt_neox": ("query_key_value", _gpt_neox),
    "bloom": ("query_key_value", _bloom), "falcon": ("query_key_value", _falcon),
}


def fused_kv_parts(model: nn.Module) -> dict[str, Parts]:
    """Fused projection name -> (K columns, V columns), for a model whose architecture is in
    :data:`FUSED_LAYOUTS`; empty otherwise."""
    config = getattr(model, "config", None)
    layout = FUSED_LAYOUTS.get(getattr(config, "model_type", None))
    if layout is None:
        return {}
    leaf, parts_of = layout
    parts = parts_of(config)
    return {name: parts for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] == leaf}


class FusedKVQuantizer(PerTokenQuantizer):
    """The per-token KV quantizer on the K and V columns of a fused projection's output (Q passes unchanged).
    The column indices are non-persistent buffers: the state dict is the one without the quantizer."""

    def __init__(self, bits: int, k_index: torch.Tensor, v_index: torch.Tensor) -> None:
        super().__init__(bits)
        self.register_buffer("k_index", k_index, persistent=False)
        self.register_buffer("v_index", v_index, persistent=False)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        out = y.clone()
        for index in (self.k_index, self.v_index):
            out[..., index] = fake_quantize_per_token(y[..., index], self.bits)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={len(self.k_index)} columns, v={len(self.v_index)} columns"


__all__ = ["FUSED_LAYOUTS", "FusedKVQuantizer", "Parts", "fused_kv_parts"]
