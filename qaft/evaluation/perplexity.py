"""Held-out perplexity and the end-of-run evaluation (trained, merged, and the float / PTQ baselines).

Perplexity is ``exp`` of the mean next-token NLL over every predicted token (labels ``-100`` excluded), on
non-overlapping windows as in the quantization papers' WikiText-2 protocol.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qaft.methods import merge_model, ptq_model
from qaft.quant.linear import QuantizedLinear

Batch = dict[str, torch.Tensor]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _nll(model: nn.Module, batch: Batch) -> tuple[float, int]:
    """Summed next-token NLL and the number of scored tokens in one batch."""
    device = _device(model)
    ids = batch["input_ids"].to(device)
    labels = batch.get("labels", ids).to(device)[:, 1:]
    mask = batch.get("attention_mask")
    logits = model(input_ids=ids, attention_mask=None if mask is None else mask.to(device)).logits[:, :-1]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss.item(), int((labels != -100).sum())


def batches_perplexity(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Perplexity over labelled batches (instruction data: response tokens only)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        nll, n = _nll(model, batch)
        total, count = total + nll, count + n
    model.train(was_training)
    if count == 0:
        raise ValueError("no tokens to score")
    return math.exp(total / count)


def window_batches(windows: list[torch.Tensor], batch_size: int) -> list[Batch]:
    """Stack consecutive windows of equal length (only the tail window is shorter) into batches."""
    out: list[Batch] = []
    i = 0
    while i < len(windows):
        j = i + 1
        while j < len(windows) and j - i < batch_size and windows[j].numel() == windows[i].numel():
            j += 1
        out.append({"input_ids": torch.stack(windows[i:j])})
        i = j
    return out


def perplexity(model: nn.Module, windows: list[torch.Tensor], batch_size: int = 4) -> float:
    """Perplexity of ``model`` on non-overlapping token windows (every token after a window's first is scored)."""
    return batches_perplexity(model, window_batches(windows, batch_size))


def is_integer_model(model: nn.Module) -> bool:
    """Whether the deployed model holds integer layers (else it is float and is deployed by PTQ)."""
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def deploy(merged: nn.Module, bits: int, group_size: int) -> nn.Module:
    """The model a run ships: the merged integer model itself, or RTN PTQ of a float merge (the papers' "+PTQ")."""
    return merged if is_integer_model(merged) else ptq_model(merged, bits, group_size)


def end_of_run(model: nn.Module, batches: list[Batch], bits: int, group_size: int,
               load_float: Callable[[], nn.Module] | None,
               gptq: Callable[[nn.Module], nn.Module] | None = None) -> tuple[dict[str, float], nn.Module, nn.Module]:
    """Perplexities at the end of a run, the merged model and the deployed one (see :func:`deploy`).

    ``trained``: the training-time model; ``merged``: the merged one (equal to ``trained`` up to float
    rounding for integer methods); ``merged_ptq``: a float-merged model quantized by RTN at ``bits`` /
    ``group_size`` (the papers' "+PTQ"); ``float`` and ``ptq``: the untouched model and its plain RTN,
    when ``load_float`` is given. ``gptq`` (a float model in, a quantized copy out) adds the same two
    deployments by GPTQ: ``merged_gptq`` and ``ptq_gptq``.
    """
    results = {"trained": batches_perplexity(model, batches)}
    merged = merge_model(model)
    results["merged"] = batches_perplexity(merged, batches)
    deployed = deploy(merged, bits, group_size)
    if deployed is not merged:
        results["merged_ptq"] = batches_perplexity(deployed, batches)
        if gptq is not None:
            results["merged_gptq"] = batches_perplexity(gptq(merged), batches)
    if load_float is not None:
        base = load_float()
        results["float"] = batches_perplexity(base, batches)
        if gptq is not None:
            results["ptq_gptq"] = batches_perplexity(gptq(base), batches)
        results["ptq"] = batches_perplexity(ptq_model(base, bits, group_size, inplace=True), batches)
        del base
    return results, merged, deployed


def deployed_key(results: dict[str, Any]) -> str:
    """The result that describes the deployed model: the merged model, or its PTQ when it merges to float."""
    return "merged_ptq" if "merged_ptq" in results else "merged"


def format_table(results: dict[str, float], method: str, bits: int, group_size: int) -> str:
    """The short table printed at the end of a run."""
    group = "per-channel" if group_size == -1 else f"g{group_size}"
    rows = [("float (no quantization)", results.get("float")),
            (f"PTQ round-to-nearest w{bits} {group}", results.get("ptq")),
            (f"PTQ GPTQ w{bits} {group}", results.get("ptq_gptq")),
            (f"{method} merged (deployed) w{bits} {group}", results.get(deployed_key(results))),
            (f"{method} merged + GPTQ w{bits} {group}", results.get("merged_gptq")),
            (f"{method} training-time model", results.get("trained"))]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'model'.ljust(width)}  perplexity", f"{'-' * width}  ----------"]
    lines += [f"{name.ljust(width)}  {value:10.3f}" for name, value in rows if value is not None]
    return "\n".join(lines)
