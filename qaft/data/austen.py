"""Five Jane Austen novels as an offline WikiText-2 stand-in.

The machines qaft is developed on reach no dataset hub, so language-modelling perplexity needs a
real, redistributable corpus shipped in the package (see ``qaft/assets/README.md``). Splitting by
whole chapters, like WikiText splits by whole articles, keeps validation and test text unseen
during training rather than interleaved with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

NOVELS = ("emma", "mansfieldpark", "persuasion", "prideprejudice", "sensesensibility")
SPLITS = ("train", "validation", "test")
# Every 20th chapter of each novel goes to validation and to test (~5 % each). Position-based rather
# than hashed so each novel contributes to every split and the split never changes between runs.
_PERIOD = 20
_SPLIT_OFFSETS = {9: "validation", 19: "test"}
_CHAPTER = re.compile(r"^\s*chapter\s+([0-9]+|[ivxlcdm]+)\.?\s*$", re.IGNORECASE)
# Volume headings and end marks are layout, not prose; leaving them in would attach them to the
# neighbouring chapter.
_LAYOUT = re.compile(r"^\s*(volume\s+[ivx0-9]+|the end|finis|\(end of volume [a-z]+\.?\))\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Chapter:
    novel: str
    index: int  # 0-based position within the novel
    title: str  # the heading line, e.g. "CHAPTER IV"
    text: str  # heading plus body
    split: str


def assets_dir() -> Path:
    """Folder holding the novels inside the installed package."""
    return Path(__file__).resolve().parent.parent / "assets" / "austen"


def split_for_index(index: int) -> str:
    """Split of the chapter at 0-based ``index`` within its novel."""
    return _SPLIT_OFFSETS.get(index % _PERIOD, "train")


def _split_chapters(novel: str, text: str) -> list[Chapter]:
    """Cut one novel at its chapter headings; the title page before chapter one is dropped."""
    chapters: list[Chapter] = []
    title: str | None = None
    body: list[str] = []

    def flush() -> None:
        if title is not None:
            content = "\n".join(body).strip()
            chapters.append(Chapter(novel, len(chapters), title, f"{title}\n\n{content}", split_for_index(len(chapters))))

    for line in text.splitlines():
        if _CHAPTER.match(line):
            flush()
            title, body = line.strip(), []
        elif not _LAYOUT.match(line):
            body.append(line)
    flush()
    return chapters


@lru_cache(maxsize=1)
def _all_chapters() -> tuple[Chapter, ...]:
    folder = assets_dir()
    out: list[Chapter] = []
    for novel in NOVELS:
        path = folder / f"{novel}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"missing Austen asset {path}; reinstall qaft with its package data")
        out.extend(_split_chapters(novel, path.read_text(encoding="utf-8")))
    return tuple(out)


def austen_chapters(novel: str | None = None) -> list[Chapter]:
    """All chapters in reading order, optionally of one novel (one of ``NOVELS``)."""
    if novel is not None and novel not in NOVELS:
        raise ValueError(f"novel={novel!r} is not one of {NOVELS}")
    return [c for c in _all_chapters() if novel is None or c.novel == novel]


def austen_splits() -> dict[str, list[str]]:
    """Chapter texts per split (``train``/``validation``/``test``), in reading order."""
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for chapter in _all_chapters():
        out[chapter.split].append(chapter.text)
    return out
