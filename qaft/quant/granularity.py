"""Quantization granularity as typed values.

Groups run along the input dimension: each row of ``W`` (out x in) is cut into ``in / g`` groups of ``g``
consecutive input columns, each with its own scale and offset. Per-channel is the special case ``g = in``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PerChannel:
    """One scale/offset per output row (``group_size = -1`` in configs)."""

    def group_size(self, in_features: int) -> int:
        return in_features


@dataclass(frozen=True)
class PerGroup:
    """One scale/offset per ``size`` consecutive input columns of each row."""

    size: int

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"group_size must be -1 (per channel) or a positive integer, got {self.size}")

    def group_size(self, in_features: int) -> int:
        if in_features % self.size:
            divisors = [d for d in (16, 32, 64, 128, 192, 256) if in_features % d == 0]
            raise ValueError(
                f"group_size={self.size} does not divide in_features={in_features}; "
                f"allowed: -1 (per channel) or a divisor of {in_features}, e.g. {divisors}"
            )
        return self.size


Granularity = PerChannel | PerGroup


def granularity(group_size: int) -> Granularity:
    """The typed granularity for a config's ``group_size`` (-1 means per channel)."""
    if group_size == -1:
        return PerChannel()
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be -1 (per channel) or a positive integer, got {group_size!r}")
    return PerGroup(group_size)


def grouped(w: torch.Tensor, n_groups: int) -> torch.Tensor:
    """View ``w`` (out x in) as (out, n_groups, g) without copying."""
    out_features, in_features = w.shape
    return w.reshape(out_features, n_groups, in_features // n_groups)
