"""Greedy decoding with a static KV cache and a compiled one-token step: less overhead per token than HF generate.

At batch 1 on a CPU, a small model's matmuls take a few milliseconds per token and HF ``generate`` adds
a good share on top: logits processors and stopping criteria, the dynamic cache's concatenations, mask
construction, and hundreds of small eager ops (norms, rotary, residuals), each paying dispatch and Python
overhead (profile in results/bench_inference.md). This loop cuts it:

* a :class:`transformers.StaticCache`: fixed-size key/value buffers written in place, so every decode step
  has the same shapes. Attention reads every slot of it, so it is sized to the request (powers of two,
  at least ``MIN_CACHE_LEN``): SmolLM2 int4, 32 new tokens, 2-core AVX512 EPYC: 98 tok/s with 256 slots,
  122 tok/s with 64;
* the step itself (forward of one token, greedy argmax) compiled once with ``torch.compile(fullgraph=True)``;
  inductor fuses the small ops into a few C++ loops, the int4/int8 kernels stay aten calls inside the graph;
* dynamo's guards checked on the first step of each call only (:func:`_skip_guards`): 122 -> 130 tok/s;
* on CPU the compiled steps use transformers' plain (``eager``) attention, matmuls and a softmax that
  inductor compiles with the rest, instead of the SDPA CPU kernel, whose fixed cost per call dominates for
  one query token (:func:`_step_attention`). SmolLM2 int4, fused, 64 new tokens, 2 cores, side by side:
  93.0 -> 106.6 tok/s (experiments/bench/decode_ablation.py, results/bench_decode_ablation.md). Same maths:
  fp32 logits agree to 4e-5 of 39, and the compiled loop gives HF generate's tokens (tests).
  The prompt keeps SDPA (many query tokens), and the model's setting is restored after the loop;
* the output projection (49152 x 576 for SmolLM2) as one fused multiply-and-sum loop instead of PyTorch's
  bf16 matrix-vector kernel (:mod:`qaft.deploy.gemv`, set up by ``prepare_for_inference``): 91.0 -> 106.6 tok/s
  (same benchmark).

The prompt is prefilled eagerly (its length varies, a compiled prefill would recompile per length). The
compiled step is kept per model with its cache, so a request of a new power-of-two length recompiles once.
Inductor's ``cpp_wrapper`` (``greedy_generate(..., cpp_wrapper=True)``, off by default): SmolLM2 int4,
fused, 104.3 -> 108.4 tok/s side by side (results/bench_inference_cpp_wrapper.json), but the first call, which
compiles the step, took 96 s instead of 40 (timed once, SmolLM2, 2 cores). Where compilation is unavailable
or fails (no C++ compiler, an unsupported op), a warning is issued and the same loop runs eagerly, still with
the static cache; the tokens are the same up to floating-point op order.
"""
from __future__ import annotations

import contextlib
import types
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import StaticCache


@dataclass
class _DecodeState:
    cache: StaticCache
    batch: int
    max_len: int
    compiled: bool
    cpp_wrapper: bool
    step: Callable


# Smallest static cache (SDPA, bf16, SmolLM2 heads, q length 1: 33 us per layer at 64 slots, 100 us at 256).
MIN_CACHE_LEN = 64
_STATES: weakref.WeakKeyDictionary[nn.Module, _DecodeState] = weakref.WeakKeyDictionary()
_COMPILE_FAILED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _decode_step(model: nn.Module, cache: StaticCache, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=token, position_ids=position, cache=cache, use_cache=True, logits_to_keep=1).logits
    return logits[:, -1].argmax(-1, keepdim=True)


def _own_step() -> Callable:
    """A copy of :func:`_decode_step` with its own code object. Dynamo keeps compiled graphs, and counts
    recompiles against its limit of 8, per code object: sharing one across models and cache sizes would
    pile every graph onto one list (slower lookup) until the limit turns compilation off for good."""
    code = _decode_step.__code__.replace()
    return types.FunctionType(code, _decode_step.__globals__, _decode_step.__name__)


def _state(model: nn.Module, batch: int, length: int, compile: bool, cpp_wrapper: bool = False) -> _DecodeState:
    """The model's cache and step, rebuilt only when the batch, the compile flags or a longer length needs it."""
    state = _STATES.get(model)
    cpp_wrapper = compile and cpp_wrapper
    if (state is None or state.batch != batch or state.compiled != compile or state.cpp_wrapper != cpp_wrapper
            or state.max_len < length):
        max_len = max(MIN_CACHE_LEN, 1 << (length - 1).bit_length())
        options = {"cpp_wrapper": True} if cpp_wrapper else None
        step = torch.compile(_own_step(), fullgraph=True, dynamic=False, options=options) if compile else _decode_step
        state = _DecodeState(StaticCache(config=model.config, max_cache_len=max_len), batch, max_len, compile,
                             cpp_wrapper, step)
        _STATES[model] = state
    return state


def _skip_guards() -> contextlib.AbstractContextManager:
    """Skip dynamo's guard evaluation (~0.7 ms per call for a model whose ~300 tensors are all guarded).

    Only entered after the first decode step of a call has run with full guards, which compiled or picked
    the right graph for this model, cache and input shapes; the later steps of the same call pass the same
    model and cache and tensors of the same shapes, so the guards cannot fail (torch's condition for this
    "unsafe" stance). With several graphs cached, torch still evaluates the guards that tell them apart.
    """
    if not hasattr(torch.compiler, "set_stance"):
        return contextlib.nullcontext()
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


@contextlib.contextmanager
def _step_attention(model: nn.Module, device: torch.device, compile: bool) -> Iterator[None]:
    """Plain attention for the compiled one-token steps on CPU (module docstring), the model's own afterwards."""
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch = compile and device.type == "cpu" and before not in (None, "eager") and hasattr(
        model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)


def _run(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None,
         compile: bool, cpp_wrapper: bool = False) -> torch.Tensor:
    batch, length = input_ids.shape
    state = _state(model, batch, length + max_new_tokens, compile, cpp_wrapper)
    state.cache.reset()
    logits = model(input_ids=input_ids, cache=state.cache, use_cache=True, logits_to_keep=1).logits
    token = logits[:, -1].argmax(-1, keepdim=True)
    tokens = [token]
    done = torch.zeros(batch, 1, dtype=torch.bool, device=input_ids.device)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_step_attention(model, input_ids.device, compile))
        for i in range(max_new_tokens - 1):
            if eos_token_id is not None:
                done |= token == eos_token_id
                if bool(done.all()):
                    break
            position = torch.full((1, 1), length + i, dtype=torch.long, device=input_ids.device)
            token = state.step(model, state.cache, token, position)
            if i == 0 and compile:
                stack.enter_context(_skip_guards())
            if eos_token_id is not None:
                token = token.masked_fill(done, eos_token_id)  # finished rows keep emitting eos
            tokens.append(token)
    return torch.cat([input_ids, *tokens], dim=1)


def greedy_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, compile: bool = True,
                    eos_token_id: int | None = None, cpp_wrapper: bool = False) -> torch.Tensor:
    """Greedy continuation of ``input_ids`` (batch, length; no padding): returns prompt + new tokens.

    Stops early once every row has produced ``eos_token_id`` (when given); rows that finish first are
    filled with it. ``compile=False`` runs the same static-cache loop eagerly. ``cpp_wrapper=True`` compiles the
    step with inductor's C++ wrapper: faster steps, a longer first compile (module docstring).
    """
    if max_new_tokens < 1:
        return input_ids
    with torch.inference_mode():
        out = None
        if compile and model not in _COMPILE_FAILED:
            try:
                out = _run(model, input_ids, max_new_tokens, eos_token_id, compile=True, cpp_wrapper=cpp_wrapper)
            except Exception as err:  # dynamo/inductor errors surface at the first call; eager re-raises real ones
                warnings.warn(f"torch.compile of the decode step failed ({type(err).__name__}: {err}); "
                              "decoding eagerly", RuntimeWarning, stacklevel=2)
                _COMPILE_FAILED.add(model)  # don't pay for a failing compile again
        if out is None:
            out = _run(model, input_ids, max_new_tokens, eos_token_id, compile=False)
    return out.clone()  # a normal tensor, usable outside inference mode
