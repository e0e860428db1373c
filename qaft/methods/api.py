"""Applying a method to a causal LM (with calibration data where it needs some), driving its phases, and
merging it for deployment."""
from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from qaft.methods.act_kv import install_act_kv
from qaft.methods.config import MethodConfig, config_for
from qaft.methods.layer import QaftLinear, replace_module
from qaft.methods.lwc import fit_clipping, uses_lwc
from qaft.quant.init import clipping


def _targets(model: nn.Module, target_modules: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules]
    if not found:
        raise ValueError(f"target_modules={list(target_modules)} matched no nn.Linear in the model")
    return found


def _validated_targets(model: nn.Module, config: MethodConfig) -> list[tuple[str, nn.Linear]]:
    """Every target layer, each validated (so a bad config raises before anything is replaced)."""
    targets = _targets(model, config.target_modules)
    for name, linear in targets:
        config.validate_layer(name, linear)
    return targets


def _swap_targets(model: nn.Module, config: MethodConfig, targets: list[tuple[str, nn.Linear]] | None = None,
                  ratios: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """Replace each target by ``config.make_layer``; ``ratios``: the learnt clipping of ``init='omniquant_lwc'``
    per layer name, which the layer's init reads while it is built."""
    for name, linear in _validated_targets(model, config) if targets is None else targets:
        with clipping(None if ratios is None else ratios[name]):
            replace_module(model, name, config.make_layer(linear))


def apply_method(model: nn.Module, config: MethodConfig, calib_batches: Iterable[Any] | None = None) -> nn.Module:
    """Replace the target linear layers of ``model`` by ``config``'s layers; freeze everything else.

    Every target layer is validated (e.g. the group size divides its width, ``kv_bits`` finds ``k_proj`` and
    ``v_proj``) before any is replaced, so a bad config leaves the model untouched. ``act_bits`` / ``kv_bits``
    below 16 install the per-token quantizers on the float layers first (:mod:`qaft.methods.act_kv`), so GPTQ
    calibrates on the quantized inputs the layers will see, and every replacement keeps them.

    A config that needs calibration data (``config.calibration_options()`` is not ``None``: GPTQ or SmoothQuant
    PTQ, QA-LoRA on a GPTQ base) converts the model from ``calib_batches`` (token tensors ``[B, T]`` or dicts with
    ``input_ids`` and ``attention_mask``); other methods ignore them. Returns the same model, set to the phase of
    step 0.
    """
    options = config.calibration_options()
    if options is not None and calib_batches is None:
        raise ValueError(f"method {config.name!r} needs calibration data ({options.calib_batches} "
                         "batches by its calib_batches): call apply_method(model, config, calib_batches=batches)")
    targets = _validated_targets(model, config)
    install_act_kv(model, [name for name, _ in targets], config.act_bits, config.kv_bits)
    if uses_lwc(config):  # the calibration data is the init's (its configs refuse GPTQ / SmoothQuant with it)
        ratios, _ = fit_clipping(model, config, calib_batches, [name for name, _ in targets])
        _swap_targets(model, config, targets, ratios)
    elif options is None:
        _swap_targets(model, config, targets)
    else:
        config.apply_calibrated(model, calib_batches)
    model.requires_grad_(False)  # set_training_step below re-enables what the first phase trains
    model.qaft_config = config
    set_training_step(model, 0)
    return model


def qaft_layers(model: nn.Module) -> list[QaftLinear]:
    return [m for m in model.modules() if isinstance(m, QaftLinear)]


def set_training_step(model: nn.Module, step: int) -> str:
    """Move every method layer to the phase of optimizer step ``step``; returns the phase name."""
    config: MethodConfig | None = getattr(model, "qaft_config", None)
    if config is None:
        raise ValueError("model has no qaft method applied; call qaft.apply_method first")
    phase = config.phase_at(step)
    for layer in qaft_layers(model):
        if layer.phase != phase:
            layer.set_phase(phase)
    return phase


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Every parameter that trains in some phase, by role: ``lora`` (A, B), ``quant`` (the quantizer's s and b
    or z, DL-QAT's m), ``weight``.

    Build the optimizer once from these; parameters frozen in the current phase get no gradient and
    AdamW leaves them alone.
    """
    groups: dict[str, list[nn.Parameter]] = {}
    for layer in qaft_layers(model):
        for role, params in layer.role_parameters().items():
            groups.setdefault(role, []).extend(params)
    return groups


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def merge_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The deployable model: every method layer replaced by its ``merge()`` (integer or float layers).

    Same call signature as the training model (logits out). Copies the model unless ``inplace``; in place,
    each method layer is dropped as soon as its merged layer replaces it, so the merge needs about one layer
    of memory on top of the model (provided nothing else, e.g. an optimizer, still holds the layers' tensors).
    """
    merged = model if inplace else copy.deepcopy(model)
    # Names only: holding the layers themselves would keep every one alive until the loop ends.
    names = [name for name, module in merged.named_modules() if isinstance(module, QaftLinear)]
    for name in names:
        replace_module(merged, name, merged.get_submodule(name).merge())
    merged.eval()
    return merged


@torch.no_grad()
def ptq_model(model: nn.Module, bits: int, group_size: int, init: str = "minmax",
              target_modules: tuple[str, ...] | None = None, inplace: bool = False,
              zero_point: str = "float") -> nn.Module:
    """Round-to-nearest PTQ of a float (e.g. float-merged) model: the papers' "+PTQ" baselines (for GPTQ see
    :func:`qaft.methods.gptq_model.gptq_quantize_model`)."""
    fields = {"bits": bits, "group_size": group_size, "init": init, "zero_point": zero_point}
    if target_modules is not None:
        fields["target_modules"] = tuple(target_modules)
    config = config_for("ptq", **fields)
    quantized = model if inplace else copy.deepcopy(model)
    _swap_targets(quantized, config)
    return quantized
