"""SmoothQuant (Xiao et al. 2023, https://arxiv.org/abs/2211.10438): move activation outliers into the weights
before quantizing both.

A linear ``y = X W^T`` is unchanged when its input channel ``j`` is divided by ``t_j`` and the weight's column
``j`` multiplied by it: ``y = (X diag(t)^-1) (W diag(t))^T``. Activations of LLMs have a few channels with huge
magnitudes, which ruin a per-token activation quantizer; weights are flat. SmoothQuant picks, per input channel,

    t_j = max|X_j|^α / max|W_{:,j}|^(1-α)

(max over calibration tokens, and over the rows of *every* weight that reads that input, so one ``t`` serves q, k
and v alike), which makes the smoothed maxima meet: ``max|X_j / t_j|^α == max|W_{:,j} t_j|^(1-α)``; with α = 0.5
both equal ``sqrt(max|X_j| max|W_{:,j}|)``. α → 1 pushes all the difficulty into the weights.

The division by ``t`` costs nothing at inference: it is folded into the operation that produces the input.
In a LLaMA decoder block (the only layout handled here):

* q/k/v read ``input_layernorm``'s output, gate/up read ``post_attention_layernorm``'s: an RMSNorm ends with a
  per-channel weight, so ``g_j / t_j`` replaces ``g_j``.
* down_proj reads ``act(gate) * up``: dividing ``up_proj``'s output row ``j`` (and bias) by ``t_j`` divides the
  product's channel ``j``.
* o_proj reads the attention output, per head ``softmax(Q K^T) V``, linear in V: dividing ``v_proj``'s row ``j``
  divides o's input channel ``j`` — but only where v's heads map one to one onto o's inputs
  (``num_key_value_heads == num_attention_heads``, i.e. ``v_proj.out_features == o_proj.in_features``). With
  grouped-query attention one V head feeds several o_proj column blocks, which would need one ``t`` shared by
  all of them; o_proj is then left unsmoothed (the paper smooths only the q/k/v and fc1 inputs anyway).

Before quantization the smoothed model computes the same function (float rounding aside). A channel whose
activation or weight maximum is 0 gets ``t = 1`` (nothing to balance, and no 0/0). The statistics come from the
float model: activation / KV quantizers already installed are bypassed while calibrating.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qaft.methods.act_kv import float_activations
from qaft.methods.config import DEFAULT_TARGETS
from qaft.methods.gptq_model import calibration_inputs
from qaft.methods.layer import replace_module
from qaft.methods.targets import resolve_targets
from qaft.quant.linear import rtn_quantize_linear

# (producer, readers) inside a LLaMA decoder block. Order matters for the balance each group reaches: a group
# whose producer is a linear (v, up) rescales that linear's rows, so it runs before the group that reads the
# linear's columns (q/k/v, gate/up) computes its weight maxima.
_GROUPS = (
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("mlp.up_proj", ("mlp.down_proj",)),
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)


@dataclass(frozen=True)
class SmoothGroup:
    """Linears (full names) that read one input, and the module (RMSNorm or linear) that produces it."""

    producer: str
    readers: tuple[str, ...]


def smoothing_factors(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``t = act_max^α / weight_max^(1-α)`` per channel, in float64; 1 where either maximum is 0."""
    check_alpha(alpha)
    a, w = act_max.double(), weight_max.double()
    live = (a > 0) & (w > 0)
    t = a.clamp_min(1e-300).pow(alpha) / w.clamp_min(1e-300).pow(1 - alpha)
    return torch.where(live, t, torch.ones_like(t))


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
        raise ValueError(f"smooth_alpha must be a number in (0, 1], got {alpha!r}")
    return float(alpha)


def weight_column_max(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``max |W_{:,j}|`` per input channel over the rows of every weight in ``weights`` (all ``[out_i, in]``)."""
    return torch.stack([w.detach().abs().amax(dim=0).double() for w in weights]).amax(dim=0)


def smooth_groups(model: nn.Module, targets: tuple[str, ...]) -> list[SmoothGroup]:
    """Every group of every LLaMA decoder block in which some reader is a target linear (all readers of the input
    are rescaled, targets or not, so the model stays the same function)."""
    chosen = set(resolve_targets(model, targets).quantized)
    groups = []
    for name, block in model.named_modules():
        if not all(hasattr(block, a) for a in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")):
            continue
        v, o = block.get_submodule("self_attn.v_proj"), block.get_submodule("self_attn.o_proj")
        for producer, readers in _GROUPS:
            if producer.endswith("v_proj") and v.out_features != o.in_features:
                continue  # grouped-query attention: see the module docstring
            if any(f"{name}.{r}" in chosen for r in readers):
                groups.append(SmoothGroup(f"{name}.{producer}", tuple(f"{name}.{r}" for r in readers)))
    if not groups:
        raise ValueError("smoothquant found no LLaMA decoder block (input_layernorm, self_attn, "
                         "post_attention_layernorm, mlp) holding a target linear")
    return groups


@torch.no_grad()
def input_maxima(model: nn.Module, calib_batches: Iterable[Any], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``max |X_j|`` over the calibration tokens at the input of each linear in ``names`` (float64 per channel).

    Batches as GPTQ takes them (``[B, T]`` tensors or dicts with ``input_ids`` / ``attention_mask``); padding
    tokens are left out, as GPTQ leaves them out of its Hessians. Installed activation / KV quantizers are
    bypassed: the statistics are the float model's.
    """
    maxima: dict[str, torch.Tensor] = {}
    keep: list[torch.Tensor | None] = [None]

    def record(name: str, x: torch.Tensor) -> None:
        mask = keep[0]
        rows = x[mask] if mask is not None and x.shape[:-1] == mask.shape else x
        batch_max = rows.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).double()
        maxima[name] = batch_max if name not in maxima else torch.maximum(maxima[name], batch_max)

    # prepend: seen before the module's own input quantizer hook (bypassed anyway, but order-proof)
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: record(n, args[0]),
                                                                prepend=True) for n in names]
    device = next(model.parameters()).device
    try:
        with float_activations(model):
            for batch in calib_batches:
                inputs, keep[0] = calibration_inputs(batch, device)
                model(**inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if len(maxima) != len(names):
        raise ValueError("smoothquant needs at least one calibration batch")
    return maxima


@torch.no_grad()
def apply_smoothing(model: nn.Module, group: SmoothGroup, t: torch.Tensor) -> None:
    """Divide ``group``'s input by ``t``: ``1/t`` into the producer (norm weight or linear rows and bias), ``t``
    into every reader's columns."""
    producer = model.get_submodule(group.producer)
    inv = (1.0 / t).to(producer.weight.device)
    # a linear's output channel j is its weight row j; a norm's (RMSNorm g * x / rms(x)) is its weight entry j
    row = inv[:, None] if isinstance(producer, nn.Linear) else inv
    producer.weight.copy_((producer.weight.double() * row).to(producer.weight.dtype))
    bias = getattr(producer, "bias", None)
    if bias is not None:  # a LayerNorm's or a linear's shift is on the output channel too
        bias.copy_((bias.double() * inv).to(bias.dtype))
    for name in group.readers:
        w = model.get_submodule(name).weight
        w.copy_((w.double() * t.to(w.device)[None, :]).to(w.dtype))


@torch.no_grad()
def smooth_model(model: nn.Module, calib_batches: Iterable[Any], alpha: float = 0.5,
                 targets: tuple[str, ...] = DEFAULT_TARGETS) -> dict[str, torch.Tensor]:
    """Smooth ``model`` in place from the calibration batches; returns ``t`` per group (by producer name).

    All activation maxima are taken from one pass of the float model before any change (each smoothing is an
    identity, so the other groups' inputs do not depend on it); weight maxima from the current weights, group by
    group in :data:`_GROUPS` order.
    """
    check_alpha(alpha)
    groups = smooth_groups(model, targets)
    was_training = model.training
    model.eval()
    maxima = input_maxima(model, list(calib_batches), [g.readers[0] for g in groups])
    factors = {}
    for group in groups:
        weights = [model.get_submodule(r).weight for r in group.readers]
        t = smoothing_factors(maxima[group.readers[0]], weight_column_max(weights), alpha)
        apply_smoothing(model, group, t)
        factors[group.producer] = t
    model.train(was_training)
    return factors


@torch.no_grad()
def smoothquant_quantize_model(model: nn.Module, calib_batches: Iterable[Any], bits: int, group_size: int,
                               alpha: float = 0.5, init: str = "minmax", symmetric: bool = False,
                               zero_point: str = "float", target_modules: tuple[str, ...] = DEFAULT_TARGETS,
                               inplace: bool = False) -> nn.Module:
    """SmoothQuant PTQ: :func:`smooth_model`, then round-to-nearest of every target linear into a
    :class:`~qaft.quant.linear.QuantizedLinear` (activation / KV quantizers already installed are kept).
    Copies the model unless ``inplace``."""
    model = model if inplace else copy.deepcopy(model)
    targets = tuple(target_modules)
    smooth_model(model, calib_batches, alpha, targets)
    names = [n for n in resolve_targets(model, targets).quantized if isinstance(model.get_submodule(n), nn.Linear)]
    for name in names:
        linear = model.get_submodule(name)
        replace_module(model, name, rtn_quantize_linear(linear, bits, group_size, init, symmetric, zero_point))
    return model


__all__ = ["SmoothGroup", "apply_smoothing", "check_alpha", "input_maxima", "smooth_groups", "smooth_model",
           "smoothquant_quantize_model", "smoothing_factors", "weight_column_max"]
