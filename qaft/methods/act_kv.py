"""Where a method's activation and KV-cache quantizers sit in the model, and how they stay there.

``act_bits < 16``: every target linear quantizes its input (:class:`~qaft.quant.activation.PerTokenQuantizer`
as the submodule ``input_quantizer``, applied by a forward pre-hook). ``kv_bits < 16``: every ``k_proj`` and
``v_proj`` (targeted or not) quantizes its output (``output_quantizer``, a forward hook): one token's K or V over
all heads, before LLaMA's attention applies RoPE to K (LLM-QAT's placement). Architectures that compute Q, K and V
in one fused projection (GPT-2's ``c_attn``, GPT-NeoX's ``query_key_value``, Phi-3's ``qkv_proj``, ...) quantize
the K and V columns of its output, each as ``k_proj`` / ``v_proj`` would (:mod:`qaft.methods.fused_kv`).
Embeddings, norms, ``lm_head`` and ``q_proj``'s output stay float. With both at 16 nothing is installed: the model
is exactly the weight-only one.

Why hooks on the existing modules rather than wrapper modules: a quantizer has no state, so the state dict, the
module names (what checkpoints, GPTQ and the deploy code look up) and every method layer stay as they are. The
hooks are module-level functions that receive the module, so no layer holds a reference to itself (an in-place
merge frees each layer as soon as it is replaced). :func:`qaft.methods.layer.replace_module` carries the
quantizers from a replaced module to its replacement, so ``merge_model``, ``ptq_model`` and GPTQ keep them, and
the merged model computes what the trained one did. Checkpoints record :func:`act_kv_layout` and reinstall it
with :func:`restore_act_kv`.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from qaft.methods.fused_kv import FUSED_LAYOUTS, FusedKVQuantizer, Parts, fused_kv_parts
from qaft.quant.activation import OFF, PerTokenQuantizer, check_act_bits

INPUT = "input_quantizer"
OUTPUT = "output_quantizer"
KV_MODULES = ("k_proj", "v_proj")


def _quantize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (getattr(module, INPUT)(args[0]), *args[1:])


def _quantize_output(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    return getattr(module, OUTPUT)(output)


def _install(module: nn.Module, attr: str, quantizer: PerTokenQuantizer, register: Any, hook: Any) -> None:
    """``module.<attr>`` = ``quantizer``, run by ``hook``; if it has a quantizer already, only its bits change."""
    existing = getattr(module, attr, None)
    if isinstance(existing, PerTokenQuantizer):
        existing.bits = quantizer.bits
        return
    module.add_module(attr, quantizer)
    register(hook)


def quantize_input(module: nn.Module, bits: int) -> None:
    """Make ``module`` quantize its (first) input per token at ``bits``; a second call only changes the bits."""
    _install(module, INPUT, PerTokenQuantizer(bits), module.register_forward_pre_hook, _quantize_input)


def quantize_output(module: nn.Module, bits: int, parts: Parts | None = None) -> None:
    """Make ``module`` quantize its output per token at ``bits`` (the KV cache at ``k_proj`` / ``v_proj``); with
    ``parts`` (a fused projection's K and V columns) only those columns, K and V each on its own."""
    quantizer = PerTokenQuantizer(bits) if parts is None else FusedKVQuantizer(bits, *parts)
    _install(module, OUTPUT, quantizer, module.register_forward_hook, _quantize_output)


def carry_quantizers(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the input / output quantizers ``old`` had (it takes ``old``'s place in the model)."""
    if old is new:
        return
    quantizer = getattr(old, INPUT, None)
    # an integer-activation layer (e.g. W8A8) quantizes its own input the same way
    if isinstance(quantizer, PerTokenQuantizer) and getattr(new, "input_bits", None) != quantizer.bits:
        quantize_input(new, quantizer.bits)
    quantizer = getattr(old, OUTPUT, None)
    if isinstance(quantizer, PerTokenQuantizer):
        parts = (quantizer.k_index, quantizer.v_index) if isinstance(quantizer, FusedKVQuantizer) else None
        quantize_output(new, quantizer.bits, parts)


def kv_module_names(model: nn.Module) -> dict[str, Parts | None]:
    """The modules whose outputs are the KV cache: every ``k_proj`` and ``v_proj`` (``None``: the whole output),
    and every fused projection of a mapped architecture (its K and V columns)."""
    names: dict[str, Parts | None] = {name: None for name, _ in model.named_modules()
                                      if name.rsplit(".", 1)[-1] in KV_MODULES}
    return names | fused_kv_parts(model)


def check_kv_modules(model: nn.Module, kv_bits: int) -> dict[str, Parts | None]:
    """The KV modules for ``kv_bits`` (none at 16); a ``ValueError`` if the model has neither k_proj and v_proj
    nor a fused projection whose K / V layout qaft maps."""
    if check_act_bits(kv_bits, "kv_bits") == OFF:
        return {}
    names = kv_module_names(model)
    missing = [kind for kind in KV_MODULES if not any(n.rsplit(".", 1)[-1] == kind for n in names)]
    if missing and not any(parts is not None for parts in names.values()):
        kind = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(f"kv_bits={kv_bits} quantizes the outputs of {list(KV_MODULES)} or the K / V columns of a "
                         f"mapped fused projection ({sorted(FUSED_LAYOUTS)}), but this {kind!r} model has no "
                         f"{' / '.join(missing)} module: set kv_bits=16 for this architecture")
    return names


def install_act_kv(model: nn.Module, targets: list[str], act_bits: int, kv_bits: int) -> None:
    """Quantize the inputs of the modules named ``targets`` at ``act_bits`` and the KV projections' outputs at
    ``kv_bits`` (16: that one is not installed). Checks everything before touching the model."""
    kv_names = check_kv_modules(model, kv_bits)
    if check_act_bits(act_bits) != OFF:
        for name in targets:
            quantize_input(model.get_submodule(name), act_bits)
    for name, parts in kv_names.items():
        quantize_output(model.get_submodule(name), kv_bits, parts)


def _bits_of(model: nn.Module, attr: str) -> tuple[int, list[str]]:
    found = {name: m.bits for name, m in model.named_modules()
             if isinstance(m, PerTokenQuantizer) and name.rpartition(".")[2] == attr}
    widths = set(found.values())
    if len(widths) > 1:  # a config cannot produce this; the layout below could not describe it
        raise ValueError(f"mixed {attr} widths {sorted(widths)} in one model")
    return (widths.pop() if widths else OFF), [name.rpartition(".")[0] for name in found]


def act_kv_layout(model: nn.Module) -> dict[str, Any]:
    """``{"act_bits", "kv_bits", "input_layers", "output_layers"}``: what a checkpoint records to reinstall."""
    act_bits, inputs = _bits_of(model, INPUT)
    kv_bits, outputs = _bits_of(model, OUTPUT)
    return {"act_bits": act_bits, "kv_bits": kv_bits, "input_layers": inputs, "output_layers": outputs}


def restore_act_kv(model: nn.Module, layout: dict[str, Any] | None) -> None:
    """Reinstall what :func:`act_kv_layout` recorded (``None``, or 16 bits: nothing)."""
    if not layout:
        return
    act_bits, kv_bits = check_act_bits(layout["act_bits"]), check_act_bits(layout["kv_bits"], "kv_bits")
    if act_bits != OFF:
        for name in layout["input_layers"]:
            quantize_input(model.get_submodule(name), act_bits)
    if kv_bits != OFF:
        fused = fused_kv_parts(model)
        for name in layout["output_layers"]:
            quantize_output(model.get_submodule(name), kv_bits, fused.get(name))


@contextmanager
def float_activations(model: nn.Module) -> Iterator[None]:
    """Within the block, every installed activation / KV quantizer passes its input through unchanged (e.g. to
    calibrate on the float model's activations); on exit they are all back."""
    swapped = [(owner, attr, getattr(owner, attr)) for owner in list(model.modules()) for attr in (INPUT, OUTPUT)
               if isinstance(getattr(owner, attr, None), PerTokenQuantizer)]
    for owner, attr, _ in swapped:
        owner.add_module(attr, nn.Identity())  # the hook stays; it now calls an identity
    try:
        yield
    finally:
        for owner, attr, quantizer in swapped:
            owner.add_module(attr, quantizer)


def has_act_kv(model: nn.Module) -> bool:
    """Whether any module of ``model`` quantizes activations or the KV cache."""
    return any(isinstance(m, PerTokenQuantizer) for m in model.modules())
