"""Block-AP, EfficientQAT's first stage (Chen et al. 2024, https://arxiv.org/abs/2407.11062): block-wise
training of every weight and quantization parameter on calibration sequences.

Decoder blocks are visited in order. For block ``i`` with float weights ``W`` and calibration inputs ``X_i``:

    target  Y_i = F_i(X_i^fp)                       the float block on the float model's own stream
    train   min over W, s, b (or s, z) of  mean || F_i^q(X_i^q; Q_{s,b}(W)) - Y_i ||^2
    next    X_{i+1}^q = F_i^q(X_i^q),  X_{i+1}^fp = Y_i

``F_i^q`` is the block with every target linear replaced by full QAT (:class:`~qaft.methods.qat.QATLinear`: ``W``
and the layer's quantizer train through the shared quantizer's straight-through gradients); ``X_0^q = X_0^fp`` are
the calibration batches' inputs to the first block. So each block is fitted on the inputs the already quantized
blocks before it produce, towards what the float model computes there (the public code's two streams,
``quant_inps`` and ``fp_inps``). Padding tokens (a batch's ``attention_mask``) are left out of the loss.

The optimizer is the public code's: AdamW (weight decay 0) with two groups, quantizer parameters at
``block_ap_quant_lr`` and weights at ``block_ap_weight_lr`` (a group whose lr is 0 stays frozen), each lr on a
cosine from its value down to a twentieth of it over the block's ``epochs x batches`` steps, restarted per block;
the batches are visited in order each epoch (nothing random; attention backward runs on the deterministic
math kernel). Float targets are computed with the activation / KV quantizers off (the float model); the quantized
stream keeps them (the model as it will train).

When a block is done each trained layer is frozen into its integer codes ``q = clamp(round((W - b) / s))`` by
``finish`` (EfficientQAT: the E2E-QP layer, which holds ``q`` and the quantizer and trains only ``s``); its float
``W`` is dropped. Nothing here is random, so a resumed run rebuilds the same codes (checked by their digest).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from qaft.methods.act_kv import float_activations
from qaft.methods.gptq_model import _block_inputs, _BlockInput, _decoder_blocks
from qaft.methods.layer import QUANTIZER, replace_module
from qaft.methods.qat import QATLinear
from qaft.methods.targets import resolve_targets
from qaft.progress import Phase

MIN_LR_FACTOR = 20  # the cosine ends at lr / 20 (the public code's --min_lr_factor default)


class BlockAPSettings(Protocol):
    """What Block-AP reads from a method config: the quantizer settings (QuantFields), targets and its own."""

    bits: int
    group_size: int
    target_modules: tuple[str, ...]
    block_ap_epochs: int
    block_ap_quant_lr: float
    block_ap_weight_lr: float


def _hidden(entry: _BlockInput) -> torch.Tensor:
    args, kwargs, _ = entry
    return args[0] if args else kwargs["hidden_states"]


def _run(block: nn.Module, entry: _BlockInput, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """The block's output hidden states for a captured call, its hidden-states input replaced by ``hidden``."""
    args, kwargs, _ = entry
    if hidden is not None:
        args, kwargs = ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_hidden(entry: _BlockInput, hidden: torch.Tensor) -> _BlockInput:
    args, kwargs, keep = entry
    if args:
        return (hidden, *args[1:]), kwargs, keep
    return args, {**kwargs, "hidden_states": hidden}, keep


def reconstruction_loss(out: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over the real tokens (``keep``: [B, T] mask, ``None``: all) and the hidden dimension."""
    diff = out.float() - target.float()
    if keep is not None and diff.shape[:-1] == keep.shape:
        diff = diff[keep]
    return diff.pow(2).mean()


def cosine_lr(base: float, step: int, total: int) -> float:
    """``base`` at step 0 down a half cosine to ``base / MIN_LR_FACTOR`` at step ``total``."""
    low = base / MIN_LR_FACTOR
    return low + (base - low) * (1 + math.cos(math.pi * step / max(total, 1))) / 2


def _optimizer(layers: list[QATLinear], config: BlockAPSettings) -> tuple[torch.optim.Optimizer, list[float]]:
    groups = []
    for lr, params in ((config.block_ap_quant_lr, [p for m in layers for p in getattr(m, QUANTIZER).parameters()]),
                       (config.block_ap_weight_lr, [m.weight for m in layers])):
        for p in params:
            p.requires_grad_(lr > 0)
        if lr > 0:
            groups.append({"params": params, "lr": lr})
    return torch.optim.AdamW(groups, weight_decay=0.0), [g["lr"] for g in groups]


def _train_block(block: nn.Module, layers: list[QATLinear], entries: list[_BlockInput],
                 targets: list[torch.Tensor], config: BlockAPSettings) -> tuple[float, float]:
    """Block-AP on one block; returns the reconstruction loss of its first and of its last step."""
    optimizer, base_lrs = _optimizer(layers, config)
    total, step, losses = config.block_ap_epochs * len(entries), 0, []
    # The math attention kernel: the fused CUDA kernels' backward may accumulate in a varying order, and a resume
    # must rebuild the same codes (their digest is checked).
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        for _ in range(config.block_ap_epochs):
            for entry, target in zip(entries, targets):
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = cosine_lr(base, step, total)
                loss = reconstruction_loss(_run(block, entry), target, entry[2])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                step += 1
    return losses[0], losses[-1]


def _qat_layers(block: nn.Module, names: list[str], config: BlockAPSettings) -> dict[str, QATLinear]:
    """Replace the block's target linears (``names``, relative to the block) by full-QAT layers (weight and
    quantizer trainable)."""
    layers = {}
    for name in names:
        layers[name] = QATLinear(block.get_submodule(name), config)
        replace_module(block, name, layers[name])
    return layers


def block_ap(model: nn.Module, calib_batches: Iterable[Any], config: BlockAPSettings,
             finish: Callable[[QATLinear], nn.Module]) -> list[tuple[float, float]]:
    """Block-AP of ``model`` in place: every target linear ends as ``finish(trained QAT layer)``.

    Returns, per block, the reconstruction loss of its first and last training step (on the batch then seen)."""
    was_training = model.training
    model.eval()  # no dropout: the target and the fit see the same function
    model.requires_grad_(False)  # only the block being fitted trains
    chosen = set(resolve_targets(model, tuple(config.target_modules)).quantized)
    blocks = _decoder_blocks(model, chosen)
    entries = _block_inputs(model, blocks[0][1], list(calib_batches))
    float_hidden = [_hidden(entry) for entry in entries]
    phase = Phase(f"Block-AP w{config.bits} {'pc' if config.group_size == -1 else f'g{config.group_size}'}",
                  len(blocks), "blocks")
    losses = []
    for prefix, block in blocks:
        with torch.no_grad(), float_activations(model):
            float_hidden = [_run(block, entry, h) for entry, h in zip(entries, float_hidden)]
        layers = _qat_layers(block, sorted(n[len(prefix) + 1:] for n in chosen if n.startswith(f"{prefix}.")), config)
        if config.block_ap_epochs:
            losses.append(_train_block(block, list(layers.values()), entries, float_hidden, config))
        for name, layer in layers.items():
            replace_module(block, name, finish(layer))
        del layers
        with torch.no_grad():
            entries = [_with_hidden(entry, _run(block, entry)) for entry in entries]
        phase.step()
    phase.end(f"reconstruction loss of the last block {losses[-1][0]:.3g} -> {losses[-1][1]:.3g}" if losses else "")
    model.train(was_training)
    return losses


__all__ = ["BlockAPSettings", "block_ap", "cosine_lr", "reconstruction_loss"]
