"""OmniQuant's learnable weight clipping (Shao et al. 2024, https://arxiv.org/abs/2308.13137) as an ``init`` of the
shared quantizer: ``init="omniquant_lwc"``, for PTQ and as the start of every integer method.

Per group, the range the quantizer is fitted on is clipped by two learnt strengths::

    hi = max * sigmoid(gamma),   lo = min * sigmoid(beta)          (gamma = beta = 4 at the start: 0.982)

and ``(s, b)`` follow from ``[lo, hi]`` as ``minmax`` fits them (symmetric, or on the integer-zero grid, as the
method's quantizer settings say: :mod:`qaft.quant.init`). ``gamma, beta`` are trained block by block, in order,
with the weights frozen, on Block-AP's reconstruction loss (METHODS.md): the mean squared error between the
block's output with its target linears fake-quantized (:func:`qaft.quant.affine.fake_quantize`, straight-through,
so the gradient reaches ``s, b`` and through them ``gamma, beta``) on the inputs coming from the already clipped
blocks before it, and the float block's output on the float model's own activations (OmniQuant's ``fp_inps``).
AdamW, ``lr = 1e-2``, no weight decay, ``EPOCHS = 10`` passes over the calibration batches, one step per batch:
the defaults of OmniQuant's ``main.py``. The learnt ratios are then fixed: :func:`fit_clipping` returns them per
layer name and :func:`qaft.methods.api.apply_method` builds each layer inside :func:`qaft.quant.init.clipping`.

Calibration data: the config's ``calib_batches`` where it has the field (GPTQ's count), else
:data:`~qaft.quant.gptq.GPTQOptions`'s default; :meth:`qaft.methods.config.MethodConfig.calibration_options`
asks for them. GPTQ or SmoothQuant bases fit their own ranges, so the init does not combine with them.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qaft.methods.act_kv import INPUT, OUTPUT
from qaft.methods.gptq_model import _block_inputs, _decoder_blocks, _next_inputs
from qaft.progress import Phase
from qaft.quant.affine import fake_quantize, offset_of_zero, qrange
from qaft.quant.granularity import granularity
from qaft.quant.init import MIN_SCALE, Init

EPOCHS = 10
LR = 1e-2
INIT_VALUE = 4.0
Ratios = tuple[torch.Tensor, torch.Tensor]  # (sigmoid(beta), sigmoid(gamma)) of one layer, (out, n_groups) each


def uses_lwc(config: Any) -> bool:
    """Whether ``config`` starts its quantizer from learnt weight clipping."""
    return getattr(config, "init", None) == Init.OMNIQUANT_LWC.value


def clipped_scale_offset(w: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, bits: int, symmetric: bool,
                         int_zero: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, b)`` of the clipped range, differentiable in ``gamma, beta`` (``minmax``'s formulas of
    :mod:`qaft.quant.init`, without its ulp containment, which training does not need)."""
    wg = w.reshape(w.shape[0], gamma.shape[1], -1)
    lo, hi = wg.amin(-1) * torch.sigmoid(beta), wg.amax(-1) * torch.sigmoid(gamma)
    qn, qp = qrange(bits)
    levels = 2**bits - 1
    if symmetric:
        s = torch.maximum((lo / qn).abs(), (hi / qp).abs()).clamp_min(MIN_SCALE)
        return s, torch.zeros_like(s)
    if int_zero:  # GPTQ's reference grid: range widened to hold 0, z = round(-lo / s) (straight-through)
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        s = ((hi - lo) / levels).clamp_min(MIN_SCALE)
        return s, offset_of_zero(s, -lo / s, bits)
    s = ((hi - lo) / levels).clamp_min(MIN_SCALE)
    return s, (2 ** (bits - 1) * hi + (2 ** (bits - 1) - 1) * lo) / levels


class _ClippedLinear(nn.Module):
    """A target linear during the fit: ``x Q(W)^T + bias`` with ``Q``'s range from the learnt ``gamma, beta``."""

    def __init__(self, linear: nn.Linear, config: Any) -> None:
        super().__init__()
        self.linear = linear
        self.bits, self.symmetric = config.bits, config.symmetric or config.init == Init.L4Q.value
        self.int_zero = config.zero_point == "int"
        n_groups = linear.in_features // granularity(config.group_size).group_size(linear.in_features)
        shape = (linear.out_features, n_groups)
        self.gamma = nn.Parameter(torch.full(shape, INIT_VALUE, device=linear.weight.device))
        self.beta = nn.Parameter(torch.full(shape, INIT_VALUE, device=linear.weight.device))

    def ratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(self.beta).detach(), torch.sigmoid(self.gamma).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = self.linear
        w = linear.weight.detach().float()
        s, b = clipped_scale_offset(w, self.gamma, self.beta, self.bits, self.symmetric, self.int_zero)
        # the activation / KV quantizers of the linear (W-A-KV runs) apply as in the model it stands for
        x = getattr(linear, INPUT, nn.Identity())(x)
        bias = None if linear.bias is None else linear.bias.to(x.dtype)
        return getattr(linear, OUTPUT, nn.Identity())(F.linear(x, fake_quantize(w, s, b, self.bits).to(x.dtype), bias))


def _put(root: nn.Module, name: str, module: nn.Module) -> None:
    """Set submodule ``name`` (the linears' own activation quantizers stay on them: the wrapper calls them)."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _outputs(block: nn.Module, inputs: list) -> list[torch.Tensor]:
    out = []
    for args, kwargs, _ in inputs:
        hidden = block(*args, **kwargs)
        out.append(hidden[0] if isinstance(hidden, (tuple, list)) else hidden)
    return out


def _mse(out: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    diff = (out.float() - target.float()).pow(2)
    return (diff[keep] if keep is not None and keep.shape == diff.shape[:-1] else diff).mean()


def _fit_block(block: nn.Module, clipped: dict[str, _ClippedLinear], quant_in: list, targets: list,
               epochs: int, lr: float) -> list[float]:
    """Train the block's ``gamma, beta``; returns the mean loss of every epoch."""
    params = [p for m in clipped.values() for p in (m.gamma, m.beta)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(epochs):
        total = 0.0
        for (args, kwargs, keep), target in zip(quant_in, targets):
            with torch.enable_grad():
                out = block(*args, **kwargs)
                loss = _mse(out[0] if isinstance(out, (tuple, list)) else out, target, keep)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            total += float(loss)
        losses.append(total / len(quant_in))
    return losses


@torch.no_grad()
def fit_clipping(model: nn.Module, config: Any, calib_batches: Iterable[Any], names: list[str],
                 epochs: int | None = None, lr: float = LR) -> tuple[dict[str, Ratios], list[list[float]]]:
    """Learn the clipping of every target linear ``names`` (model-level names), block by block.

    Returns ``{name: (sigmoid(beta), sigmoid(gamma))}`` and, per block, the mean loss of each epoch. The model is
    left as it was (its linears are swapped for the fit and put back). ``epochs``: :data:`EPOCHS` by default."""
    was_training = model.training
    model.eval()
    wanted = set(names)
    blocks = _decoder_blocks(model, wanted)
    fp_in = _block_inputs(model, blocks[0][1], list(calib_batches))
    quant_in = list(fp_in)
    ratios, history = {}, []
    phase = Phase(f"OmniQuant LWC w{config.bits}", len(blocks), "blocks")
    for block_prefix, block in blocks:
        targets = _outputs(block, fp_in)  # the float block on the float activations
        fp_in = [_next_inputs(block, *entry) for entry in fp_in]
        clipped = {n: _ClippedLinear(m, config) for n, m in block.named_modules()
                   if isinstance(m, nn.Linear) and f"{block_prefix}.{n}" in wanted}
        for n, m in clipped.items():
            _put(block, n, m)
        try:
            history.append(_fit_block(block, clipped, quant_in, targets, EPOCHS if epochs is None else epochs, lr))
            quant_in = [_next_inputs(block, *entry) for entry in quant_in]
        finally:
            for n, m in clipped.items():
                _put(block, n, m.linear)
        ratios |= {f"{block_prefix}.{n}": m.ratios() for n, m in clipped.items()}
        phase.step()
    phase.end()
    model.train(was_training)
    missing = sorted(wanted - set(ratios))
    if missing:
        raise ValueError(f"omniquant_lwc: target layers outside the decoder blocks: {missing}")
    return ratios, history


__all__ = ["EPOCHS", "LR", "clipped_scale_offset", "fit_clipping", "uses_lwc"]
