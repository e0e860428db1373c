"""Which layers a method quantizes: every linear layer of every decoder block, resolved per model.

The papers put their adapters and quantizers on "every linear layer" of the transformer blocks. Architectures
name those layers differently (LLaMA's ``q_proj`` ... ``down_proj``, OPT's ``out_proj`` / ``fc1`` / ``fc2``, GPT-2's
``c_attn`` / ``c_proj`` / ``c_fc``, GPT-NeoX's fused ``query_key_value``), so the default ``target_modules`` is the
single word :data:`ALL_LINEAR`, resolved on the model itself:

* a **decoder block** is a module whose class the model lists in ``_no_split_modules`` (what transformers and
  FSDP already treat as the unit of a layer stack); models that list none fall back to the children of their
  outermost ``nn.ModuleList`` of blocks;
* a **linear layer** is an ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2, ``y = x W + b`` with ``W`` stored
  ``[in, out]``). A ``Conv1D`` is the linear layer with weight ``W^T``: :func:`as_linear` converts it exactly
  (a transpose moves values, it rounds nothing), and a float merge converts it back (:func:`as_conv1d`) so a saved
  float model still loads into the architecture's own class;
* fused projections (``c_attn``, ``query_key_value``, ``qkv_proj``, ``gate_up_proj``) are one linear layer: groups
  run along the input features, so fusing outputs changes no group.

``lm_head`` and the embeddings stay float unless ``target_modules`` names them (``lm_head`` is a linear layer and
can be named; an embedding is not one and is refused). Weight matrices inside a block that are no linear layer
(fused MoE experts stored as one 3-D tensor, a router matrix held as a bare parameter, Mamba's convolution) are
reported as *unquantizable*: a method whose merge is integer refuses the model with the default targets, because
its "integer model" would keep them float (:func:`qaft.methods.api.plan_targets`).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qaft.methods.config import ALL_LINEAR

LINEAR_TYPES = (nn.Linear, Conv1D)
_INDEX = re.compile(r"\.\d+(?=\.|$)")


class TargetError(ValueError):
    """``target_modules`` does not fit the model: one line naming the model's linear layers."""


def leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def decoder_blocks(model: nn.Module) -> list[str]:
    """Names of the model's decoder blocks (outermost modules of a ``_no_split_modules`` class holding a linear
    layer; else the children of the outermost ``nn.ModuleList`` whose children hold linear layers)."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    blocks = _outermost([n for n, m in model.named_modules() if type(m).__name__ in classes and _has_linear(m)])
    if blocks:
        return blocks
    lists = _outermost([n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)
                        and all(_has_linear(child) for child in m)])
    return [f"{name}.{i}" for name in lists for i in range(len(model.get_submodule(name)))]


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, LINEAR_TYPES) for m in module.modules())


def _outermost(names: list[str]) -> list[str]:
    kept: list[str] = []
    for name in names:  # named_modules lists a parent before its children
        if not any(name.startswith(f"{k}.") for k in kept):
            kept.append(name)
    return kept


def _inside(name: str, blocks: list[str]) -> bool:
    return any(name.startswith(f"{b}.") for b in blocks)


@dataclass(frozen=True)
class TargetPlan:
    """What a method does to a model's layers: names of the linear layers it quantizes, of the linear layers it
    leaves float, of the ``Conv1D`` layers among the quantized, and of the block weight matrices that are no linear
    layer (left float whatever the targets)."""

    quantized: tuple[str, ...]
    float_linears: tuple[str, ...]
    transposed: tuple[str, ...]
    unquantizable: tuple[str, ...]

    def record(self) -> dict[str, dict[str, int]]:
        """For a run record: layer name patterns (block index as ``*``) -> count, per kind."""
        return {"quantized": _patterns(self.quantized), "float": _patterns(self.float_linears),
                "unquantizable": _patterns(self.unquantizable)}

    def line(self) -> str:
        """One line for the start of a run."""
        kinds = sorted({leaf(n) for n in self.quantized})
        left = sorted(_patterns(self.float_linears + self.unquantizable)) or ["none"]
        return (f"quantizing {len(self.quantized)} linear layers ({', '.join(kinds)}); "
                f"left float: {', '.join(left)}")


def _patterns(names: tuple[str, ...]) -> dict[str, int]:
    return dict(sorted(Counter(_INDEX.sub(".*", n) for n in names).items()))


def linear_names(model: nn.Module) -> list[str]:
    """The distinct leaf names of the model's linear layers (what ``target_modules`` can name)."""
    return sorted({leaf(n) for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)})


def _unquantizable(model: nn.Module, blocks: list[str]) -> list[str]:
    """Modules inside a block that own a weight matrix (>= 2-D parameter) but are no linear layer or embedding."""
    skip = (*LINEAR_TYPES, nn.Embedding)
    return [n for n, m in model.named_modules() if _inside(n, blocks) and not isinstance(m, skip)
            and any(p.dim() >= 2 for p in m.parameters(recurse=False))]


def resolve_targets(model: nn.Module, target_modules: tuple[str, ...]) -> TargetPlan:
    """The layers ``target_modules`` selects in ``model`` (:data:`ALL_LINEAR`: every linear layer of every decoder
    block; other entries: linear layers by their last name component, anywhere). :class:`TargetError` for a name
    the model lacks or that names something qaft cannot quantize."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)}
    kinds = linear_names(model)
    blocks = decoder_blocks(model) if ALL_LINEAR in target_modules else []
    if ALL_LINEAR in target_modules and not any(_inside(n, blocks) for n in linears):
        raise TargetError(f"target_modules={list(target_modules)}: the model has no decoder block holding a linear "
                          f"layer; name its layers instead, one of {kinds}")
    for wanted in target_modules:
        if wanted == ALL_LINEAR or wanted in kinds:
            continue
        other = next((type(m).__name__ for n, m in model.named_modules() if leaf(n) == wanted), None)
        what = f"is a {other}, not a linear layer qaft can quantize" if other else "is no layer of the model"
        raise TargetError(f"target_modules={list(target_modules)}: {wanted!r} {what}; the model's linear layers: "
                          f"{kinds} (or {ALL_LINEAR!r}: every linear layer of every decoder block)")
    chosen = [n for n in linears if leaf(n) in target_modules or _inside(n, blocks)]
    float_linears = tuple(n for n in linears if n not in chosen)
    return TargetPlan(tuple(chosen), float_linears, tuple(n for n in chosen if isinstance(linears[n], Conv1D)),
                      tuple(_unquantizable(model, decoder_blocks(model))))


def as_linear(conv: Conv1D) -> nn.Linear:
    """The ``nn.Linear`` computing exactly what ``conv`` does (weight transposed, same tensors' values)."""
    n_in, n_out = conv.weight.shape
    linear = nn.Linear(n_in, n_out, bias=conv.bias is not None, device="meta", dtype=conv.weight.dtype)
    linear.weight = nn.Parameter(conv.weight.detach().t().contiguous(), requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        linear.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=conv.bias.requires_grad)
    return linear


def as_conv1d(linear: nn.Linear) -> Conv1D:
    """The ``Conv1D`` computing exactly what a float ``linear`` does (the inverse of :func:`as_linear`)."""
    with torch.device("meta"):
        conv = Conv1D(linear.out_features, linear.in_features)
    conv.weight = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
    bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                                  device=linear.weight.device)
    conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return conv


__all__ = ["ALL_LINEAR", "LINEAR_TYPES", "TargetError", "TargetPlan", "as_conv1d", "as_linear", "decoder_blocks",
           "linear_names", "resolve_targets"]
