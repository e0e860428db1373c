"""What every method layer shares: the frozen bias, phases and parameter roles, the trainable quantizer, LoRA.

A method layer replaces one ``nn.Linear``. It keeps the original bias frozen, declares which of its members
train in which phase (:meth:`QaftLinear.phases`), and ``merge()`` returns the deployable layer. A layer that
trains its quantizer (L4Q, DL-QAT, QAT) holds it as the submodule ``quantizer``
(:class:`~qaft.quant.module.AffineQuantizer`, made by :func:`make_quantizer`); phases and roles name it as one
member, so its ``scale`` and ``offset`` / ``zero`` always train together.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qaft.methods.act_kv import carry_quantizers
from qaft.methods.config import QuantFields
from qaft.quant.module import AffineQuantizer

QUANTIZER = "quantizer"  # the attribute holding a layer's trainable quantizer
# Role of each member (a parameter, or the quantizer with all its parameters), for optimizer parameter groups
# (lr / weight decay per role). The order is the order parameter_groups lists parameters in, kept fixed so that
# optimizer state and the gradient-norm sum of clipping do not depend on how a layer registers its members.
ROLES = {"weight": "weight", QUANTIZER: "quant", "magnitude": "quant", "lora_A": "lora", "lora_B": "lora"}


def make_quantizer(weight: torch.Tensor, config: QuantFields) -> AffineQuantizer:
    """The trainable quantizer of a layer, fitted on ``weight`` with the config's quantizer settings."""
    return AffineQuantizer(weight, config.bits, config.group_size, config.init, config.symmetric,
                           config.lsq_grad_scale, config.zero_point)


class QaftLinear(nn.Module):
    """Base of every method layer: frozen bias, phases, roles, and a ``merge()`` to deploy.

    Built from the replaced layer's shapes and bias (``from_linear``-style constructors live in the subclasses
    and their configs' ``make_layer``).
    """

    # phase name -> members (parameter names, or QUANTIZER for all of the quantizer's) that train in it
    PHASES: ClassVar[Mapping[str, frozenset[str]]] = {}
    # Buffers that training checkpoints keep next to what trains: quantizer state that is no parameter (the
    # quantizer's own buffers are added by state_buffers()). The frozen bases' codes are rebuilt, never kept.
    STATE_BUFFERS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, config: Any) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.config = config
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.phase = ""

    def phases(self) -> Mapping[str, frozenset[str]]:
        """Phase name -> the members that train in it; the class's ``PHASES`` unless the config decides."""
        return self.PHASES

    def _members(self) -> Iterator[tuple[str, list[nn.Parameter]]]:
        """``(member, its parameters)`` for every member with parameters, in :data:`ROLES` order."""
        members: dict[str, list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            members.setdefault(name.partition(".")[0], []).append(param)
        order = list(ROLES)
        yield from sorted(members.items(), key=lambda item: order.index(item[0]) if item[0] in ROLES else len(order))

    def set_phase(self, phase: str) -> None:
        """Make exactly the parameters of ``phase`` trainable."""
        trainable = self.phases()[phase]
        for member, params in self._members():
            for param in params:
                param.requires_grad_(member in trainable)
        self.phase = phase

    def role_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Every parameter that trains in some phase, by role (``lora``, ``quant``, ``weight``)."""
        ever = frozenset().union(*self.phases().values())
        groups: dict[str, list[nn.Parameter]] = {}
        for member, params in self._members():
            if member in ever:
                groups.setdefault(ROLES[member], []).extend(params)
        return groups

    def trained_quantizer(self) -> AffineQuantizer | None:
        """The layer's trainable quantizer (its submodule ``quantizer``), if it has one."""
        return getattr(self, QUANTIZER, None)

    def state_buffers(self) -> list[str]:
        """Names (relative to the layer) of the buffers a training checkpoint keeps besides what trains."""
        quantizer = self.trained_quantizer()
        names = list(self.STATE_BUFFERS)
        if quantizer is not None:
            names += [f"{QUANTIZER}.{name}" for name, _ in quantizer.named_buffers()]
        return names

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # An override rather than a load pre-hook: a hook holding the layer would make every layer a reference
        # cycle, freed only by the garbage collector (an in-place merge must free each layer when it is replaced).
        _legacy_quantizer_keys(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def merge(self) -> nn.Module:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, phase={self.phase!r}"


def _legacy_quantizer_keys(layer: QaftLinear, state_dict: dict[str, Any], prefix: str) -> None:
    """Checkpoints written before the quantizer became a submodule hold ``<layer>.scale`` / ``.offset`` /
    ``.zero``: load them into ``<layer>.quantizer.*`` (a resume loads non-strictly and would drop them silently)."""
    quantizer = layer.trained_quantizer()
    if quantizer is None:
        return
    for name in dict(quantizer.named_parameters()) | dict(quantizer.named_buffers()):
        old, new = prefix + name, f"{prefix}{QUANTIZER}.{name}"
        if old in state_dict and new not in state_dict:
            state_dict[new] = state_dict.pop(old)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` of ``root`` is, with the activation / KV quantizers the old one
    had (they belong to the position in the model, so merges, PTQ and GPTQ keep them)."""
    parent, _, child = name.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    carry_quantizers(getattr(owner, child), new)
    setattr(owner, child, new)


def add_lora(layer: nn.Module, rank: int, in_features: int, out_features: int, gaussian: bool = False) -> None:
    """Create ``lora_A`` (rank x in) and ``lora_B = 0`` (out x rank) on ``layer``, in float32.

    ``A`` is Kaiming-uniform as in LoRA/peft, or Gaussian with std 1/rank (DL-QAT).
    """
    a = torch.empty(rank, in_features)
    if gaussian:
        nn.init.normal_(a, std=1.0 / rank)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    layer.lora_A = nn.Parameter(a)
    layer.lora_B = nn.Parameter(torch.zeros(out_features, rank))


def lora_delta(layer: nn.Module, scaling: float) -> torch.Tensor:
    """``scaling * B A`` in float32 (a fresh tensor: merges add the base into it in place)."""
    return (layer.lora_B @ layer.lora_A).mul_(scaling)


def lora_output(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float,
                training: bool) -> torch.Tensor:
    """``scaling * dropout(x) A^T B^T``, computed in the adapter's dtype, returned in ``x``'s."""
    h = F.dropout(x, dropout, training) if dropout > 0 else x
    return (scaling * (h.to(a.dtype) @ a.T @ b.T)).to(x.dtype)


class _RecomputedLinear(torch.autograd.Function):
    """``x W^T`` for a frozen ``W = weight_fn(*state)`` that is rebuilt in backward instead of saved.

    The base of QLoRA / QA-LoRA / QAT-LoRA / LoftQ is stored compressed, and L4Q's warm-up base ``Q(W0)`` is a
    function of ``W0`` and the frozen ``s, b``; keeping ``W`` alive until backward would cost one weight-sized
    tensor per layer, which is what this avoids.
    """

    @staticmethod
    def forward(ctx, x, weight_fn, *state):
        ctx.weight_fn = weight_fn
        ctx.save_for_backward(*state)
        return x @ weight_fn(*state).to(x.dtype).T

    @staticmethod
    def backward(ctx, grad):
        state = ctx.saved_tensors  # read once: non-reentrant gradient checkpointing unpacks each saved tensor once
        w = ctx.weight_fn(*state)
        return (grad @ w.to(grad.dtype), None) + (None,) * len(state)


def recomputed_linear(x: torch.Tensor, weight_fn: Callable[..., torch.Tensor], *state: torch.Tensor) -> torch.Tensor:
    return _RecomputedLinear.apply(x, weight_fn, *state)


def float_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """A frozen ``nn.Linear`` holding ``weight`` in ``dtype`` (the deployable form of float-merged methods).

    ``weight`` is taken over, not copied, when it already has ``dtype``: pass a tensor nothing else uses (a
    merge builds one per layer, and an in-place merge of a whole model should not hold two of each).
    """
    out_features, in_features = weight.shape
    # On the meta device nn.Linear allocates and initialises nothing (and draws no random numbers).
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach().to(dtype).contiguous(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(dtype, copy=True), requires_grad=False)
    return layer
