"""Names of models and datasets: a Hugging Face hub id (``org/name``) or a local path.

One rule for both: a name is a local path when it starts with ``/``, ``.`` or ``~``, ends with a data file
suffix, or holds a path separator without being a hub id; hub ids cannot be checked offline.
"""
from __future__ import annotations

import os
import re

# "org/name" with no further slashes.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DATA_SUFFIXES = (".json", ".jsonl", ".txt")


def looks_local(name: str) -> bool:
    """Whether ``name`` should be a file system path rather than a hub id."""
    if name.startswith(("/", ".", "~")) or name.endswith(DATA_SUFFIXES):
        return True
    return os.sep in name and not HUB_ID.match(name)


def is_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name))
