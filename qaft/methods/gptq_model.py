"""GPTQ over a whole causal LM, sequentially block by block, and the methods that need it.

Sequential GPTQ (the paper's setting): the calibration batches are run once up to the first decoder block;
then for each block, forward hooks on its target linears accumulate every linear's Hessian in one pass of
the block, the linears are GPTQ-quantized into :class:`~qaft.methods.deploy.QuantizedLinear`, and the block
is run again, now quantized, to produce the next block's inputs. So each block is calibrated on the
activations of the already quantized blocks before it. (Within a block all linears see the float block's
activations; the reference's "true sequential" sub-ordering of q/k/v, o, up/gate, down is not done.)

Two consumers:

* ``ptq`` with ``algorithm="gptq"`` (the papers' "QLoRA + GPTQ" row: float-merge, then :func:`gptq_quantize_model`);
* ``qalora`` with ``base_quant="gptq"``: GPTQ the float model first, then build each QA-LoRA layer on the
  resulting codes with :meth:`QALoRALinear.from_quantized <qaft.methods.qalora.QALoRALinear.from_quantized>`.

GPTQ needs data, so neither fits ``apply_method``'s one-layer-at-a-time ``make_layer``; callers use
:func:`apply_method_calibrated`, which falls back to ``apply_method`` for every method that needs no data.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from qaft.methods.config import DEFAULT_TARGETS, MethodConfig
from qaft.methods.deploy import QuantizedLinear
from qaft.quant.gptq import HessianAccumulator, gptq_quantize_weight


class _Captured(Exception):
    """Raised by the first block's pre-hook: everything before it has run, nothing after needs to."""


def _decoder_blocks(model: nn.Module, targets: tuple[str, ...]) -> nn.ModuleList:
    """The first ``ModuleList`` whose children hold target linears (``model.model.layers`` for LLaMA)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and any(
                isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets for n, m in module[0].named_modules()):
            return module
    raise ValueError(f"GPTQ: found no decoder blocks holding target_modules={list(targets)}")


def _as_batch(batch: Any) -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch if batch.dim() == 2 else batch.unsqueeze(0)}
    return {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}


def _block_inputs(model: nn.Module, first: nn.Module, batches: Iterable[Any]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) with which ``first`` is called, one entry per calibration batch."""
    captured: list[tuple[tuple, dict]] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, dict(kwargs)))
        raise _Captured

    device = next(model.parameters()).device
    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**{k: v.to(device) for k, v in _as_batch(batch).items()}, use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError("GPTQ needs at least one calibration batch")
    return captured


def _next_inputs(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The block's output as the next block's hidden states, other arguments (mask, rotary) unchanged."""
    out = block(*args, **kwargs)
    hidden = out[0] if isinstance(out, (tuple, list)) else out
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _replace_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _quantize_block(block: nn.Module, inputs: list[tuple[tuple, dict]], targets: tuple[str, ...],
                    gptq_kwargs: dict[str, Any]) -> None:
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets}
    stats = {n: HessianAccumulator(m.in_features) for n, m in linears.items()}
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: stats[n].add(args[0]))
               for n, m in linears.items()]
    try:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    for name, linear in linears.items():
        codes, scale, offset = gptq_quantize_weight(linear.weight, stats[name].hessian, **gptq_kwargs)
        _replace_child(block, name, QuantizedLinear(codes, scale, offset, gptq_kwargs["bits"], linear.bias))
        del stats[name]  # an (in x in) float64 matrix per linear: free it before the next one


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module,
    calib_batches: Iterable[Any],
    bits: int,
    group_size: int,
    act_order: bool = False,
    percdamp: float = 0.01,
    init: str = "minmax",
    symmetric: bool = False,
    block_size: int = 128,
    target_modules: tuple[str, ...] = DEFAULT_TARGETS,
    inplace: bool = False,
) -> nn.Module:
    """Sequential GPTQ of a float causal LM; its target linears become :class:`QuantizedLinear`.

    ``calib_batches``: token tensors ``[B, T]`` or dicts with ``input_ids`` (and ``attention_mask``), e.g. a
    data module's training loader cut to a few batches. Copies the model unless ``inplace``.
    """
    model = model if inplace else copy.deepcopy(model)
    was_training = model.training
    model.eval()
    targets = tuple(target_modules)
    blocks = _decoder_blocks(model, targets)
    inputs = _block_inputs(model, blocks[0], list(calib_batches))
    options = {"bits": bits, "group_size": group_size, "act_order": act_order, "percdamp": percdamp,
               "init": init, "symmetric": symmetric, "block_size": block_size}
    for block in blocks:
        _quantize_block(block, inputs, targets, options)
        inputs = [_next_inputs(block, args, kwargs) for args, kwargs in inputs]
    model.train(was_training)
    return model


def needs_calibration(config: MethodConfig) -> bool:
    """Whether applying ``config`` needs calibration data (GPTQ PTQ, or QA-LoRA on a GPTQ base)."""
    return getattr(config, "algorithm", "rtn") == "gptq" or getattr(config, "base_quant", "rtn") == "gptq"


def _gptq_options(config: MethodConfig) -> dict[str, Any]:
    return {"bits": config.bits, "group_size": config.group_size, "init": config.init,
            "symmetric": config.symmetric, "act_order": getattr(config, "act_order", False),
            "percdamp": getattr(config, "percdamp", 0.01), "target_modules": config.target_modules}


def apply_method_calibrated(model: nn.Module, config: MethodConfig, calib_batches: Iterable[Any] | None) -> nn.Module:
    """``apply_method`` for every method, including those that need calibration data (in place).

    ``ptq`` + ``gptq``: the model is GPTQ-quantized. ``qalora`` + ``gptq`` base: GPTQ first, then each
    ``QuantizedLinear`` becomes a ``QALoRALinear`` on the same codes, scales and offsets.
    """
    from qaft.methods.qalora import QALoRALinear
    from qaft.model import apply_method, set_training_step

    if not needs_calibration(config):
        return apply_method(model, config)
    if calib_batches is None:
        raise ValueError(f"method {config.name!r} with GPTQ needs calibration batches")
    gptq_quantize_model(model, calib_batches, inplace=True, **_gptq_options(config))
    model.requires_grad_(False)
    if config.name == "qalora":
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantizedLinear):
                _replace_child(model, name, QALoRALinear.from_quantized(module, config))
        model.qaft_config = config
        set_training_step(model, 0)
    else:
        model.qaft_config = config
    return model


__all__ = ["apply_method_calibrated", "gptq_quantize_model", "needs_calibration"]
