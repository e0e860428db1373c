"""Held-out perplexity: ``exp`` of the mean next-token NLL over every predicted token (labels ``-100``
excluded), on non-overlapping windows as in the quantization papers' WikiText-2 protocol.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sized

import torch
import torch.nn.functional as F
from torch import nn

from qaft.progress import Phase

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


def batches_perplexity(model: nn.Module, batches: Iterable[Batch], what: str = "perplexity") -> float:
    """Perplexity over labelled batches (instruction data: response tokens only); ``what`` names it in the
    progress lines (:mod:`qaft.progress`)."""
    was_training = model.training
    model.eval()
    phase = Phase(what, len(batches) if isinstance(batches, Sized) else None, "batches")
    total, count = 0.0, 0
    for batch in batches:
        nll, n = _nll(model, batch)
        total, count = total + nll, count + n
        phase.step()
    model.train(was_training)
    if count == 0:
        raise ValueError("no tokens to score")
    value = math.exp(total / count)
    phase.end(f"perplexity {value:.3f}")
    return value


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
