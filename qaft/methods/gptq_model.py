"""GPTQ over a whole causal LM, sequentially block by block, for the methods that need calibration data.

Sequential GPTQ (the paper's setting): the calibration batches are run once up to the first decoder block;
then for each block, forward hooks on its target linears accumulate every linear's Hessian in one pass of
the block, the linears are GPTQ-quantized into :class:`~qaft.quant.linear.QuantizedLinear`, and the block
is run again, now quantized, to produce the next block's inputs. So each block is calibrated on the
activations of the already quantized blocks before it. (Within a block all linears see the float block's
activations; the reference's "true sequential" sub-ordering of q/k/v, o, up/gate, down is not done.)

GPTQ needs data, so it does not fit a method's one-layer-at-a-time ``make_layer``. A method config that uses it
says so through :meth:`~qaft.methods.config.MethodConfig.calibration_options` (its
:class:`~qaft.quant.gptq.GPTQOptions`) and converts the model in
:meth:`~qaft.methods.config.MethodConfig.apply_calibrated` with
:func:`gptq_quantize_with`; ``qaft.apply_method(model, config, calib_batches=...)`` drives both. Today:

* ``ptq`` with ``algorithm="gptq"`` (the papers' "QLoRA + GPTQ" row: float-merge, then GPTQ);
* ``qalora`` with ``base_quant="gptq"``: GPTQ the float model first, then build each QA-LoRA layer on the
  resulting codes with :meth:`QALoRALinear.from_quantized <qaft.methods.qalora.QALoRALinear.from_quantized>`.

``qaft-train`` takes the batches from the start of the run's training stream
(:meth:`qaft.data.stream.RunData.calibration_batches`). Padding tokens (instruction batches) are left out of the
Hessians: they are no input the model will serve.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from qaft.methods.config import DEFAULT_TARGETS, GPTQFields, choice, rtn_only_init
from qaft.methods.layer import replace_module
from qaft.methods.targets import resolve_targets
from qaft.progress import Phase
from qaft.quant.gptq import GPTQOptions, HessianAccumulator, gptq_quantize_weight
from qaft.quant.linear import QuantizedLinear


class _Captured(Exception):
    """Raised by the first block's pre-hook: everything before it has run, nothing after needs to."""


def _decoder_blocks(model: nn.Module, chosen: set[str]) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` of the first ``ModuleList``'s children that hold target linears (``model.model.layers``
    for LLaMA), in order."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and any(n.startswith(f"{name}.0.") for n in chosen):
            return [(f"{name}.{i}", block) for i, block in enumerate(module)]
    raise ValueError(f"GPTQ: found no decoder blocks holding the target linears {sorted(chosen)[:3]} ...")


def calibration_inputs(batch: Any, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """A calibration batch (token ids, or a dict with an attention mask) as model inputs on ``device``, and the
    [B, T] mask of real tokens (None when every token is real)."""
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch if batch.dim() == 2 else batch.unsqueeze(0)}
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask") if k in batch}
    mask = inputs.get("attention_mask")
    return inputs, None if mask is None or bool(mask.all()) else mask.bool()


# One calibration batch at a decoder block: its call's (args, kwargs) and the [B, T] mask of real tokens.
_BlockInput = tuple[tuple, dict, "torch.Tensor | None"]


def _block_inputs(model: nn.Module, first: nn.Module, batches: Iterable[Any]) -> list[_BlockInput]:
    """How ``first`` is called, one entry per calibration batch."""
    captured: list[_BlockInput] = []
    device = next(model.parameters()).device
    for batch in batches:
        inputs, keep = calibration_inputs(batch, device)

        def grab(module: nn.Module, args: tuple, kwargs: dict, keep: torch.Tensor | None = keep) -> None:
            captured.append((args, dict(kwargs), keep))
            raise _Captured

        handle = first.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model(**inputs, use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
    if not captured:
        raise ValueError("GPTQ needs at least one calibration batch")
    return captured


def _next_inputs(block: nn.Module, args: tuple, kwargs: dict, keep: torch.Tensor | None) -> _BlockInput:
    """The block's output as the next block's hidden states, other arguments (mask, rotary) unchanged."""
    out = block(*args, **kwargs)
    hidden = out[0] if isinstance(out, (tuple, list)) else out
    if args:
        return (hidden,) + tuple(args[1:]), kwargs, keep
    return args, {**kwargs, "hidden_states": hidden}, keep


def _quantize_block(block: nn.Module, inputs: list[_BlockInput], targets: set[str],
                    gptq_kwargs: dict[str, Any]) -> None:
    """GPTQ of the linears of ``block`` named (relative to the block) in ``targets``."""
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) and n in targets}
    # One accumulator per distinct input, made when its first rows arrive: the linears that share another's
    # input never get one of their own (an in x in float64 matrix each).
    stats: dict[str, HessianAccumulator] = {}
    shared = _Shared()
    rows: list[torch.Tensor | None] = [None]  # the real-token mask of the batch being run

    def add(name: str, x: torch.Tensor) -> None:
        if shared.owner(name, x) != name:
            return  # the very tensor another linear took (q/k/v, gate/up): its Hessian is that one's
        keep = rows[0]
        if name not in stats:
            stats[name] = HessianAccumulator(x.shape[-1], linears[name].weight.device)
        # A linear that sees tokens in another layout (flattened, routed) cannot be masked: all its rows count.
        stats[name].add(x[keep] if keep is not None and x.shape[:-1] == keep.shape else x)

    handles = [m.register_forward_hook(lambda mod, args, out, n=n: add(n, args[0])) for n, m in linears.items()]
    try:
        for args, kwargs, keep in inputs:
            rows[0] = keep
            shared.next_batch()
            block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    owners = [shared.of.get(name, name) for name in linears]
    for i, (name, linear) in enumerate(linears.items()):
        hessian = stats[owners[i]].hessian if owners[i] in stats else HessianAccumulator(  # never called: no rows
            linear.in_features, linear.weight.device).hessian
        codes, scale, offset = gptq_quantize_weight(linear.weight, hessian, **gptq_kwargs)
        replace_module(block, name, QuantizedLinear(codes, scale, offset, gptq_kwargs["bits"], linear.bias))
        if owners[i] not in owners[i + 1:]:
            stats.pop(owners[i], None)  # an (in x in) float64 matrix per input: free it once no later linear reads it


class _Shared:
    """Which linears of a block read the very same input tensor (q/k/v read one normed hidden state, gate/up
    another): their Hessians ``2/n sum x x^T`` are one matrix, accumulated once, not 3 of a block's 7 products
    over again (GPTQ of SmolLM2 side by side: 0.96x the time, the same codes; ``experiments/bench/tiny_run_cuts.py``).
    Decided per batch by tensor identity (a reference is held, so an id is never reused within a batch); a linear
    must share the same way in every batch."""

    def __init__(self) -> None:
        self.of: dict[str, str] = {}  # linear -> the linear whose accumulator takes its inputs (itself if none)
        self._taken: dict[int, tuple[torch.Tensor, str]] = {}

    def next_batch(self) -> None:
        self._taken = {}

    def owner(self, name: str, x: torch.Tensor) -> str:
        taken = self._taken.get(id(x))
        owner = taken[1] if taken is not None and taken[0] is x else name
        if self.of.setdefault(name, owner) != owner:
            raise RuntimeError(f"GPTQ: {name} reads the same input as {self.of[name]} in some batches only")
        if owner == name:
            self._taken[id(x)] = (x, name)
        return owner


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
    zero_point: str = "float",
) -> nn.Module:
    """Sequential GPTQ of a float causal LM; its target linears become :class:`QuantizedLinear`.

    ``calib_batches``: token tensors ``[B, T]`` or dicts with ``input_ids`` (and ``attention_mask``), e.g. a
    data module's training loader cut to a few batches. Copies the model unless ``inplace``. ``zero_point``:
    the grid of the group parameters (``"int"``: GPTQ's reference quantizer, 0 always a level).
    """
    model = model if inplace else copy.deepcopy(model)
    was_training = model.training
    model.eval()
    chosen = set(resolve_targets(model, tuple(target_modules)).quantized)
    blocks = _decoder_blocks(model, chosen)
    inputs = _block_inputs(model, blocks[0][1], list(calib_batches))
    options = {"bits": bits, "group_size": group_size, "act_order": act_order, "percdamp": percdamp,
               "init": init, "symmetric": symmetric, "block_size": block_size, "zero_point": zero_point}
    group = "pc" if group_size == -1 else f"g{group_size}"
    phase = Phase(f"GPTQ w{bits} {group}", len(blocks), "blocks")
    for prefix, block in blocks:
        _quantize_block(block, inputs, {n[len(prefix) + 1:] for n in chosen if n.startswith(f"{prefix}.")}, options)
        inputs = [_next_inputs(block, *entry) for entry in inputs]
        phase.step()
    phase.end()
    model.train(was_training)
    return model


class _GPTQMethod(Protocol):
    """What :func:`gptq_quantize_with` reads from a method config (its QuantFields, GPTQFields and targets)."""

    bits: int
    group_size: int
    init: str
    symmetric: bool
    zero_point: str
    target_modules: tuple[str, ...]

    def gptq_options(self) -> GPTQOptions: ...


def gptq_quantize_with(model: nn.Module, calib_batches: Iterable[Any], config: _GPTQMethod) -> nn.Module:
    """GPTQ of ``model`` in place with a method config's quantizer settings, targets and GPTQ options."""
    options = config.gptq_options()
    return gptq_quantize_model(model, calib_batches, config.bits, config.group_size, act_order=options.act_order,
                               percdamp=options.percdamp, init=config.init, symmetric=config.symmetric,
                               target_modules=config.target_modules, inplace=True, zero_point=config.zero_point)


BASES = ("rtn", "gptq")


@dataclass(kw_only=True)
class GPTQBaseFields(GPTQFields):
    """A method over an integer base fitted by round-to-nearest (``base_quant='rtn'``: layer by layer, in
    ``make_layer``) or by GPTQ on calibration data (``'gptq'``: :func:`gptq_quantize_with`, then the method's layer
    on each GPTQ layer's codes). The config names that layer class, ``base_layer``, which builds from a float
    linear (``from_linear``) or from GPTQ's :class:`~qaft.quant.linear.QuantizedLinear` (``from_quantized``).
    Listed first among a config's bases, so that these methods are the config's."""

    base_layer: ClassVar[Any]
    base_quant: str = "rtn"  # rtn | gptq (GPTQ on calibration data: see calibration_options())

    def validate(self) -> None:
        super().validate()
        choice("base_quant", self.base_quant, BASES)
        self.gptq_options()
        rtn_only_init(self.init, self.base_quant)

    def calibration_options(self) -> GPTQOptions | None:
        return self.gptq_options() if self.base_quant == "gptq" else super().calibration_options()

    def apply_calibrated(self, model: nn.Module, calib_batches: Iterable[Any]) -> None:
        """GPTQ the float model, then put the method's layer on each resulting integer layer's codes."""
        gptq_quantize_with(model, calib_batches, self)
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantizedLinear):
                replace_module(model, name, self.base_layer.from_quantized(module, self))

    def make_layer(self, linear: nn.Linear) -> nn.Module:
        if self.base_quant == "gptq":
            raise ValueError(f"{self.name} with base_quant='gptq' needs calibration data: use "
                             "qaft.apply_method(model, config, calib_batches=batches)")
        return self.base_layer.from_linear(linear, self)


__all__ = ["BASES", "GPTQBaseFields", "GPTQOptions", "gptq_quantize_model", "gptq_quantize_with"]
