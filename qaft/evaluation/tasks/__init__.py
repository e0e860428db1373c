"""qaft's offline lm-eval tasks: ``quiz_mc`` and ``austen_ppl``, generated from the package's own data.

lm-eval resolves a task's ``data_files`` against the working directory, so the YAMLs shipped here are
templates: :func:`write_local_tasks` writes the JSONL data and the YAMLs, with absolute paths filled in,
into ``$QAFT_CACHE/eval_tasks`` (default ``~/.cache/qaft``), a folder to give lm-eval's
``TaskManager(include_path=...)``.

* ``quiz_mc``: every held-out quiz question (``quiz_items("heldout")``, never in the training set) with
  its answer and three distractors drawn from the same category and field; options and the gold position
  are fixed by a hash of the question, so the task never drifts between runs or machines. Questions whose
  field has fewer than three other answers are left out.
* ``austen_ppl``: one document per Austen test chapter, scored by rolling log-likelihood (word and byte
  perplexity, bits per byte), like lm-eval's ``wikitext``.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from functools import lru_cache
from pathlib import Path

from qaft.data import austen_splits, distractor_pool, quiz_items
from qaft.files import apply_umask

LOCAL_TASKS = ("quiz_mc", "austen_ppl")
N_CHOICES = 4
_TEMPLATES = Path(__file__).resolve().parent
_PLACEHOLDER = "@DATA_DIR@"


def tasks_dir() -> Path:
    """Where the generated task folder lives (``$QAFT_CACHE/eval_tasks``)."""
    return Path(os.environ.get("QAFT_CACHE", "~/.cache/qaft")).expanduser() / "eval_tasks"


def _rng(text: str) -> random.Random:
    """A generator seeded by the text itself: stable across Python runs, unlike ``hash``."""
    return random.Random(int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big"))


def _quiz_doc(item: dict, accepted: set[str]) -> dict | None:
    """``accepted``: every right answer (lower case) of the question, over all lines that produce it."""
    pool = [a for a in distractor_pool(item["category"], item["field"], exclude=item["output"])
            if a.lower() not in accepted]
    if len(pool) < N_CHOICES - 1:
        return None
    rng = _rng(item["instruction"])
    choices = rng.sample(sorted(pool), N_CHOICES - 1)
    gold = rng.randrange(N_CHOICES)
    choices.insert(gold, item["output"])
    return {"question": item["instruction"], "choices": choices, "gold": gold,
            "category": item["category"], "field": item["field"]}


@lru_cache(maxsize=1)
def quiz_mc_docs() -> tuple[dict, ...]:
    """The ``quiz_mc`` documents (question, choices, gold index, category, field), in file order."""
    # The same question can come from several lines ("the Latin for 'cruel'": crudelis, immitis): one
    # document, the first line's answer as gold, and no other line's answer among the distractors.
    first: dict[str, dict] = {}
    accepted: dict[str, set[str]] = {}
    for item in quiz_items("heldout"):
        first.setdefault(item["instruction"], item)
        accepted.setdefault(item["instruction"], set()).update(
            a.lower() for a in item["accepted"] + [item["output"]])
    docs = (_quiz_doc(item, accepted[q]) for q, item in first.items())
    return tuple(d for d in docs if d is not None)


def austen_ppl_docs() -> list[dict]:
    """One ``{"text": chapter}`` document per Austen test chapter."""
    return [{"text": text} for text in austen_splits()["test"]]


def _write_if_changed(path: Path, text: str) -> None:
    """Atomic replace, and only when the content changed: concurrent runs may share the cache."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    apply_umask(tmp)  # mkstemp makes it 0600
    os.replace(tmp, path)


def _jsonl(docs) -> str:
    return "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)


def write_local_tasks(root: Path | str | None = None) -> Path:
    """Write the data files and task YAMLs (absolute paths) under ``root``; returns the folder for lm-eval."""
    folder = Path(root).expanduser().resolve() if root is not None else tasks_dir()
    folder.mkdir(parents=True, exist_ok=True)
    _write_if_changed(folder / "quiz_mc.jsonl", _jsonl(quiz_mc_docs()))
    _write_if_changed(folder / "austen_test.jsonl", _jsonl(austen_ppl_docs()))
    for name in LOCAL_TASKS:
        template = (_TEMPLATES / f"{name}.yaml").read_text(encoding="utf-8")
        _write_if_changed(folder / f"{name}.yaml", template.replace(_PLACEHOLDER, str(folder)))
    return folder


__all__ = ["LOCAL_TASKS", "austen_ppl_docs", "quiz_mc_docs", "tasks_dir", "write_local_tasks"]
