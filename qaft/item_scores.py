"""Per-item scores: one row per evaluation item, so that a metric can be resampled item by item (the claims'
bootstrap, :mod:`qaft.reporting.claims`) and checked against what the record reports.

A file is JSON lines, one row per item: ``{"item", "nll_sum", "tokens"}`` for a perplexity (one row per window;
``exp(sum nll_sum / sum tokens)`` is the reported value) or ``{"item", "correct"}`` for an accuracy (one row per
document; the mean is the reported value). The same rows always make the same bytes, so a record can carry the
file's digest and an archive can embed the rows and still be checked. Where the files live in a run folder and how
a record names them is :mod:`qaft.run_folder`'s business.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

ITEM_SCORES_DIR = "item_scores"  # the run folder's folder of item-score files


class BadItemScores(ValueError):
    """An item-score file (or row) that is not what this module writes (one line, naming where)."""


def item_scores_name(key: str) -> str:
    """The file a metric's item scores go to, relative to the run folder (``quiz_mc:0`` -> ``quiz_mc_0``)."""
    return f"{ITEM_SCORES_DIR}/{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.jsonl"


def _number(value: Any, whole: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
        return False
    return math.isfinite(value)


def _check_item(row: Any, where: str) -> dict[str, Any]:
    """``row`` if it is one item's scores: an ``item`` id and either ``nll_sum`` + ``tokens`` or ``correct``."""
    fields = set(row) if isinstance(row, dict) else set()
    ok = isinstance(row, dict) and isinstance(row.get("item"), (int, str)) and not isinstance(row["item"], bool)
    if fields == {"item", "nll_sum", "tokens"}:
        ok = ok and _number(row["nll_sum"]) and _number(row["tokens"], whole=True) and row["tokens"] >= 0
    elif fields == {"item", "correct"}:
        ok = ok and _number(row["correct"])
    else:
        ok = False
    if not ok:
        raise BadItemScores(f"{where}: not an item score ({{item, nll_sum, tokens}} or {{item, correct}}): {row!r:.80}")
    return row


_ITEM_FIELDS = ("item", "nll_sum", "tokens", "correct")  # a row's fields in the order a file holds them


def item_scores_text(rows: list[dict[str, Any]]) -> str:
    """The file's text: one row per line (checked), rows in the order given, fields in :data:`_ITEM_FIELDS`' order:
    the same rows always make the same bytes (an archive's rows are checked against the file's digest)."""
    return "".join(json.dumps({k: r[k] for k in _ITEM_FIELDS if k in _check_item(r, "an item score to write")},
                              allow_nan=False) + "\n" for r in rows)


def parse_item_scores(text: str, where: str, sha256: str | None = None) -> list[dict[str, Any]]:
    """The rows of an item-score file's ``text``; :class:`BadItemScores` where a line is not an item score, an id
    repeats, or ``sha256`` (the digest the record holds) does not match."""
    if sha256 is not None and hashlib.sha256(text.encode()).hexdigest() != sha256:
        raise BadItemScores(f"{where}: its contents do not match the digest in the record (edited since?)")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            rows.append(_check_item(json.loads(line), f"{where} line {number}"))
        except json.JSONDecodeError:
            raise BadItemScores(f"{where} line {number}: not JSON: {line[:80]!r}") from None
    if len({r["item"] for r in rows}) != len(rows):
        raise BadItemScores(f"{where}: an item id repeats")
    return rows


__all__ = ["ITEM_SCORES_DIR", "BadItemScores", "item_scores_name", "item_scores_text", "parse_item_scores"]
