"""Applying a method to a causal LM (with calibration data where it needs some), driving its phases, and
merging it for deployment."""
from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qaft.methods.act_kv import install_act_kv
from qaft.methods.config import ALL_LINEAR, INTEGER, MethodConfig, config_for
from qaft.methods.layer import QaftLinear, replace_module
from qaft.methods.lwc import fit_clipping, uses_lwc
from qaft.methods.targets import TargetError, TargetPlan, as_conv1d, as_linear, linear_names, resolve_targets
from qaft.quant.init import clipping


def _shape(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` of ``module``'s shape on the meta device (a ``Conv1D`` stores ``[in, out]``), to validate."""
    if isinstance(module, nn.Linear):
        return module
    n_in, n_out = module.weight.shape
    return nn.Linear(n_in, n_out, bias=module.bias is not None, device="meta")


def plan_targets(model: nn.Module, config: MethodConfig) -> TargetPlan:
    """The layers ``config`` quantizes in ``model``, every one validated, before anything is replaced.

    Raises :class:`~qaft.methods.targets.TargetError` (a ``ValueError``, one line) for targets the model lacks,
    and where a method whose merge is integer would leave a weight matrix of a decoder block float under the
    default targets (its deployed "integer model" would not be one). Works on a model on the meta device (the
    run config check builds one from ``config.json`` before any weight loads)."""
    plan = resolve_targets(model, config.target_modules)
    if config.traits.merges_to == INTEGER and ALL_LINEAR in config.target_modules and plan.unquantizable:
        kinds = sorted({type(model.get_submodule(n)).__name__ for n in plan.unquantizable})
        raise TargetError(f"method {config.name!r} merges to integer layers, but {len(plan.unquantizable)} weight "
                          f"matrices of the decoder blocks are no linear layer qaft can quantize ({', '.join(kinds)}: "
                          f"{plan.unquantizable[0]}, ...) and would stay float; name the layers to quantize in "
                          f"target_modules (the model's linear layers: {linear_names(model)})")
    for name in plan.quantized:
        config.validate_layer(name, _shape(model.get_submodule(name)))
    return plan


def _as_linears(model: nn.Module, plan: TargetPlan) -> None:
    """Replace every targeted ``Conv1D`` by its exact ``nn.Linear`` (what every method layer is built from)."""
    for name in plan.transposed:
        module = model.get_submodule(name)
        if isinstance(module, Conv1D):
            replace_module(model, name, as_linear(module))


def _swap_targets(model: nn.Module, config: MethodConfig, plan: TargetPlan | None = None,
                  ratios: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> TargetPlan:
    """Replace each target by ``config.make_layer``; ``ratios``: the learnt clipping of ``init='omniquant_lwc'``
    per layer name, which the layer's init reads while it is built."""
    plan = plan_targets(model, config) if plan is None else plan
    _as_linears(model, plan)
    for name in plan.quantized:
        with clipping(None if ratios is None else ratios[name]):
            replace_module(model, name, config.make_layer(model.get_submodule(name)))
    return plan


def apply_method(model: nn.Module, config: MethodConfig, calib_batches: Iterable[Any] | None = None) -> nn.Module:
    """Replace the target linear layers of ``model`` by ``config``'s layers; freeze everything else.

    ``config.target_modules`` is resolved on the model (:func:`plan_targets`; the default is every linear layer
    of every decoder block, :mod:`qaft.methods.targets`); ``model.qaft_targets`` keeps the resulting
    :class:`~qaft.methods.targets.TargetPlan` (what a run records). Every target layer is validated (e.g. the
    group size divides its width, ``kv_bits`` finds the K and V projections) before any is replaced, so a bad
    config leaves the model untouched. ``act_bits`` / ``kv_bits``
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
    plan = plan_targets(model, config)
    install_act_kv(model, list(plan.quantized), config.act_bits, config.kv_bits)
    if uses_lwc(config):  # the calibration data is the init's (its configs refuse GPTQ / SmoothQuant with it)
        _as_linears(model, plan)
        ratios, _ = fit_clipping(model, config, calib_batches, list(plan.quantized))
        _swap_targets(model, config, plan, ratios)
    elif options is None:
        _swap_targets(model, config, plan)
    else:
        _as_linears(model, plan)
        config.apply_calibrated(model, calib_batches)
    model.requires_grad_(False)  # set_training_step below re-enables what the first phase trains
    model.qaft_config = config
    model.qaft_targets = plan
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
    plan: TargetPlan | None = getattr(merged, "qaft_targets", None)
    transposed = set(plan.transposed) if plan is not None else set()
    for name in names:
        layer = merged.get_submodule(name).merge()
        # A float merge of a GPT-2 Conv1D goes back to Conv1D, so the saved model loads into its own class.
        replace_module(merged, name, as_conv1d(layer) if name in transposed and type(layer) is nn.Linear else layer)
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
