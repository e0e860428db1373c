"""Logit distillation from a frozen float teacher (LLM-QAT, Liu et al. 2023, https://arxiv.org/abs/2305.17888).

For a method whose config has a teacher (:meth:`qaft.methods.config.MethodConfig.teacher`), the training loss is
the cross-entropy of the student's next-token distribution against the teacher's full softmax::

    L = -1/N  sum_{t in P}  sum_v  p_T(v | x_<=t) log p_S(v | x_<=t)

over the ``N`` positions ``P`` whose next token has a label (``labels[t + 1] != -100``: the positions HF's
causal-LM loss averages over, shifted the same way). It is the KL divergence ``KL(p_T || p_S)`` plus the teacher's
entropy, which does not depend on the student: same gradient, and the value a label loss would have on the
teacher's samples. Computed in float32 (or the logits' wider dtype) whatever the model's dtype. The teacher's
logits come from the same model in the same step, under ``torch.no_grad`` (:func:`distilled_loss`).
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``-mean_t sum_v softmax(teacher)_v log_softmax(student)_v`` over the labelled next-token positions.

    ``*_logits``: ``[B, T, V]``; ``labels``: ``[B, T]`` (-100 where there is no target). A batch without any
    label gives 0 (with a graph, so backward runs), not the 0/0 of an empty mean.
    """
    keep = labels[:, 1:] != IGNORE_INDEX
    if not bool(keep.any()):
        return student_logits.sum() * 0.0
    log_p_student = _wide(student_logits[:, :-1][keep]).log_softmax(-1)
    p_teacher = _wide(teacher_logits[:, :-1][keep]).softmax(-1)
    return -(p_teacher * log_p_student).sum(-1).mean()


def distilled_loss(model: nn.Module, batch: dict[str, torch.Tensor],
                   teacher: AbstractContextManager[Any]) -> torch.Tensor:
    """One training step's loss: the teacher's logits (``model`` under ``teacher``, no graph), then the student's
    forward and :func:`distillation_loss` against them. ``batch``: ``input_ids``, ``attention_mask``, ``labels``."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad(), teacher:
        target = model(**inputs).logits
    return distillation_loss(model(**inputs).logits, target, batch["labels"])


__all__ = ["IGNORE_INDEX", "distillation_loss", "distilled_loss"]
