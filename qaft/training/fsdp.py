"""FSDP's wrap policy from the model itself: one shard unit per module of a class the model lists in
``_no_split_modules`` (transformers' own statement of what must not be split across devices: its decoder block,
``LlamaDecoderLayer``, ``GPT2Block``, ``OPTDecoderLayer``, ...), so ``trainer=fsdp`` fits every architecture
without naming a class in the config.

FSDP calls the policy top-down (a parent before its children), so the model, which carries
``_no_split_modules``, is seen before its blocks; the classes are read from it then.
"""
from __future__ import annotations

from torch import nn


class NoSplitModulesPolicy:
    """``auto_wrap_policy`` callable ``(module, recurse, nonwrapped_numel) -> bool`` for FSDP."""

    def __init__(self) -> None:
        self.classes: set[str] = set()

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        self.classes |= set(getattr(module, "_no_split_modules", None) or ())
        if recurse:
            return True
        return type(module).__name__ in self.classes


__all__ = ["NoSplitModulesPolicy"]
