"""Peak training memory of one run, comparable across runs that share a process (a Hydra sweep).

What the number means, on either device: the bytes of every live tensor at the worst moment of the run
(weights, gradients, optimizer state, saved activations, temporaries), as ``torch.cuda.max_memory_allocated``
reports it on a GPU.

* CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats`` at the start.
* CPU: PyTorch keeps no allocator statistics there, and the process's peak resident set (``ru_maxrss``)
  only ever grows, so in a sweep it would report the largest run so far for every later run. Instead glibc's
  live heap (``mallinfo2``: bytes handed out by ``malloc``, mmapped chunks included) is read after the
  forward of every block (each element of a ``ModuleList``: the decoder layers) and of every leaf module
  outside the blocks (embedding, final norm, head), and again when that output's gradient arrives in
  backward (hooks, in the training thread). The peak is
  ``model bytes at start + (max live heap - live heap at start)``: the model (whose frozen weights may be
  file-mapped rather than on the heap) plus everything the run allocated on top of it. Without glibc the
  fallback is the process's peak RSS, labelled as such by :attr:`PeakMemory.method`.

  Not a sampling thread: on a 2-core machine a thread waking every few ms preempts the math library's
  worker threads and doubled the step time here. Not every module either: ``mallinfo2`` walks the
  allocator's free lists (~0.5 ms on a fragmented heap), which over ~1,000 modules per step is seconds.
  Sampling at block boundaries misses temporaries that live and die inside one block's forward or
  backward; they are small next to the saved activations here.
* Which steps: only those that can set the peak (:func:`sampled_step`), the first two of the run and of every
  training phase. A phase's first step allocates its gradients and AdamW state; its second holds all of them
  through a whole forward and backward; every later step of the phase repeats the second's allocations (same
  shapes, same batch shape), so sampling it adds calls, not information. (What those calls cost is unclear:
  two separate tiny DL-QAT runs on 2 cores took 4.25 s/step sampling every step and 3.7 s sampling none, but
  side by side on a loaded machine, ``experiments/bench/tiny_run_cuts.py``, the watched step was no slower:
  ``results/bench_tiny_run_cuts.json``.)
"""
from __future__ import annotations

import ctypes
import resource
from collections.abc import Callable

import torch
from torch import nn


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    try:
        fn = ctypes.CDLL(None).mallinfo2  # glibc >= 2.33
    except (AttributeError, OSError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


def live_heap_bytes() -> int | None:
    """Bytes currently allocated through ``malloc`` (arena chunks in use + mmapped chunks); None without glibc."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of the distinct storages behind ``module``'s parameters and buffers."""
    storages = {}
    for t in [*module.parameters(), *module.buffers()]:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def sampled_modules(model: nn.Module) -> list[nn.Module]:
    """Every element of a ``ModuleList`` (not below it) and every leaf module outside those elements."""
    blocks = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]
    below = {id(sub) for block in blocks for sub in block.modules() if sub is not block}
    outermost = [b for b in blocks if id(b) not in below]
    inside = below | {id(b) for b in blocks}
    leaves = [m for m in model.modules() if not list(m.children()) and id(m) not in inside]
    return outermost + leaves


def _first_tensor(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def sampled_step(step: int, first_step: int, phase_at: Callable[[int], str]) -> bool:
    """Whether optimizer step ``step`` can set the peak: one of the first two since ``first_step`` (this process's
    first; a resumed run measures its own) or of its training phase (``phase_at``: the method's phase per step)."""
    if step - first_step < 2:
        return True
    phase = phase_at(step)
    return phase_at(step - 1) != phase or phase_at(step - 2) != phase


class PeakMemory:
    """``start(model)`` / ``watch(on)`` / ``peak_bytes()`` / ``stop()``; see the module docstring for what is
    measured. On the CPU heap path, forwards and backwards are sampled while watched (from ``start`` on, until
    ``watch(False)``)."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.method = "cuda_max_allocated" if self.cuda else (
            "model+heap_peak" if _MALLINFO2 is not None else "process_peak_rss")
        self._handles: list = []
        self._modules: list[nn.Module] = []
        self._base = self._model = self._max = 0

    def start(self, model: nn.Module) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        if _MALLINFO2 is None:
            return
        self._model = tensor_bytes(model)
        self._base = self._max = live_heap_bytes()
        self._modules = sampled_modules(model)
        self.watch(True)

    def watch(self, on: bool) -> None:
        """Sample (``True``) or not the forwards and backwards that follow (CPU heap path; no-op elsewhere)."""
        if on and not self._handles:
            self._handles = [m.register_forward_hook(self._after_forward) for m in self._modules]
        elif not on:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def sample(self) -> None:
        self._max = max(self._max, live_heap_bytes())

    def _after_forward(self, module: nn.Module, args: tuple, output) -> None:
        self.sample()
        tensor = _first_tensor(output)
        if tensor is not None and tensor.requires_grad:
            tensor.register_hook(self._in_backward)

    def _in_backward(self, grad: torch.Tensor) -> None:
        self.sample()

    def peak_bytes(self) -> int:
        """The peak so far (also samples now, so a call right after a step sees that step)."""
        if self.cuda:
            return int(torch.cuda.max_memory_allocated())
        if _MALLINFO2 is None:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        self.sample()
        return self._model + self._max - self._base

    def stop(self) -> None:
        self.watch(False)
        self._modules = []
