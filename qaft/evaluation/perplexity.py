"""Held-out perplexity: ``exp`` of the mean next-token NLL over every predicted token (labels ``-100``
excluded), on non-overlapping windows as in the quantization papers' WikiText-2 protocol.

Every perplexity is computed from per-item sums (:class:`ItemNLL`): one item per row of a batch (a window, or
one instruction example), its summed NLL (float64) and its number of scored tokens. The reported value is
``exp(sum(nll_sum) / sum(tokens))`` of exactly those numbers, so a run's per-item file (:mod:`qaft.run_folder`,
``item_scores``) reproduces it, and a bootstrap over items resamples the very numbers the value came from.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qaft.progress import Phase

Batch = dict[str, torch.Tensor]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass(frozen=True)
class ItemNLL:
    """Per-item NLL sums and scored-token counts, in batch order (item ``i``: the ``i``-th row scored)."""

    nll_sum: tuple[float, ...]
    tokens: tuple[int, ...]

    @property
    def perplexity(self) -> float:
        count = sum(self.tokens)
        if count == 0:
            raise ValueError("no tokens to score")
        return math.exp(sum(self.nll_sum) / count)

    def rows(self) -> list[dict[str, float | int]]:
        """One row per item, ``{"item", "nll_sum", "tokens"}``: a run folder's item-score file."""
        return [{"item": i, "nll_sum": nll, "tokens": n} for i, (nll, n) in enumerate(zip(self.nll_sum, self.tokens))]


AUTOCAST = {"bf16": torch.bfloat16}  # eval.autocast: the dtypes scoring may run its GEMMs in (None: float32)


class _Float32Head(nn.Module):
    """The output projection outside autocast, in float32: bf16 logits between 16 and 64 step by 1/8 to 1/4 nat,
    coarser than the differences perplexity and multiple choice measure."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.head(x.float())


@contextlib.contextmanager
def scoring_precision(model: nn.Module, autocast: str | None) -> Iterator[None]:
    """Score ``model`` with its GEMMs in ``autocast`` (``"bf16"``; ``None``: as the model is, float32), the output
    projection in float32 (:class:`_Float32Head`); the model is restored afterwards. Merges and GPTQ stay outside:
    they must compute in float32."""
    if autocast is None:
        yield
        return
    head = model.get_output_embeddings()
    model.set_output_embeddings(_Float32Head(head))
    try:
        with torch.autocast(_device(model).type, dtype=AUTOCAST[autocast]):
            yield
    finally:
        model.set_output_embeddings(head)


@torch.no_grad()
def _nll(model: nn.Module, batch: Batch) -> tuple[list[float], list[int]]:
    """Summed next-token NLL (accumulated in float64) and the number of scored tokens of each row of a batch."""
    device = _device(model)
    ids = batch["input_ids"].to(device)
    labels = batch.get("labels", ids).to(device)[:, 1:]
    mask = batch.get("attention_mask")
    logits = model(input_ids=ids, attention_mask=None if mask is None else mask.to(device)).logits[:, :-1]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100, reduction="none")  # 0 where ignored
    sums = loss.reshape(labels.shape).double().sum(dim=1)
    return sums.tolist(), (labels != -100).sum(dim=1).tolist()


def batches_scores(model: nn.Module, batches: Iterable[Batch], what: str = "perplexity",
                   autocast: str | None = None) -> ItemNLL:
    """Per-item NLL of labelled batches (instruction data: response tokens only); ``what`` names it in the
    progress lines (:mod:`qaft.progress`); ``autocast``: :func:`scoring_precision`."""
    was_training = model.training
    model.eval()
    phase = Phase(what, len(batches) if isinstance(batches, Sized) else None, "batches")
    nll: list[float] = []
    tokens: list[int] = []
    with scoring_precision(model, autocast):
        for batch in batches:
            sums, counts = _nll(model, batch)
            nll += sums
            tokens += [int(n) for n in counts]
            phase.step()
    model.train(was_training)
    scores = ItemNLL(tuple(nll), tuple(tokens))
    phase.end(f"perplexity {scores.perplexity:.3f}")
    return scores


def batches_perplexity(model: nn.Module, batches: Iterable[Batch], what: str = "perplexity") -> float:
    """Perplexity over labelled batches: :func:`batches_scores`' value."""
    return batches_scores(model, batches, what).perplexity


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


def window_scores(model: nn.Module, windows: list[torch.Tensor], batch_size: int = 4,
                  what: str = "perplexity") -> ItemNLL:
    """Per-window NLL of ``model`` on non-overlapping token windows (item ``i``: window ``i``); ``what`` names it
    in the progress lines."""
    return batches_scores(model, window_batches(windows, batch_size), what)


def perplexity(model: nn.Module, windows: list[torch.Tensor], batch_size: int = 4) -> float:
    """Perplexity of ``model`` on non-overlapping token windows (every token after a window's first is scored)."""
    return window_scores(model, windows, batch_size).perplexity
