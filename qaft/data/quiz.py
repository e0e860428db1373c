"""Question/answer pairs from the BSD ``quiz`` game files, as an offline instruction set.

Without hub access there is no Alpaca, so qaft ships the bsdgames quiz files (BSD licence) and
renders them into natural questions. Short factual answers also make an exact-match and
multiple-choice evaluation possible, with distractors drawn from the same field.

File grammar (from the game): ``:`` separates fields, ``a|b`` are alternatives, ``{x}`` is
optional text, ``[...]`` groups alternatives, and a trailing backslash continues the line.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

QUIZ_SPLITS = ("train", "heldout", "all")
# Whole files never seen in training test transfer to new facts of a known kind (Asian capitals
# after African and American ones) and to a new relation (sexes).
HELDOUT_CATEGORIES = ("asia", "sexes")
HELDOUT_FRACTION = 0.15
_MAX_FORMS = 256  # expansion is exponential in nested optionals; no real line comes close
_UNKNOWN = {"gok", ""}  # "god only knows": the game's marker for a missing answer
_ACCENT = re.compile(r"['^~,]")  # the files spell accents as e.g. ['e|e'|e]

# Display names where the index's field names read badly in a question.
_FIELD_NAMES = {
    ("africa", 0): "country", ("america", 0): "country", ("asia", 0): "country",
    ("midearth", 0): "realm", ("flowers", 0): "flower", ("pres", 2): "vice president",
    ("elements", 1): "atomic number", ("elements", 2): "atomic weight",
}
# The field each file's questions are about; the element name reads better than its symbol.
_KEY_FIELD = {"elements": 3}
# (category, from field, to field) -> template; {x} is the subject. Others use the generic forms.
_TEMPLATES = {
    ("state", 0, 1): "What is the capital of the U.S. state of {x}?",
    ("province", 0, 1): "What is the capital of the Canadian province of {x}?",
    ("latin", 0, 1): "What does the Latin word '{x}' mean in English?",
    ("latin", 1, 0): "What is the Latin for '{x}'?",
    ("greek", 0, 1): "What does the Greek word '{x}' mean in English?",
    ("greek", 1, 0): "What is the (transliterated) Greek for '{x}'?",
    ("collectives", 0, 1): "What is the collective noun for a group of {x}?",
    ("collectives", 1, 0): "A group of what is called a {x}?",
    ("sexes", 0, 1): "What is the female counterpart of '{x}'?",
    ("sexes", 1, 0): "What is the male counterpart of '{x}'?",
    ("flowers", 0, 1): "In the language of flowers, what does {x} mean?",
    ("flowers", 1, 0): "In the language of flowers, which flower means '{x}'?",
    ("pres", 0, 1): "In which years was {x} President of the United States?",
    ("pres", 1, 0): "Who was President of the United States in {x}?",
    ("pres", 0, 2): "Who was vice president under President {x}?",
    ("pres", 2, 0): "Under which president was {x} vice president?",
    ("pres", 0, 3): "Who succeeded {x} as President of the United States?",
    ("pres", 3, 0): "Whom did {x} succeed as President of the United States?",
}


# --- pattern grammar -------------------------------------------------------------------------
@dataclass(frozen=True)
class _Node:
    kind: str  # "alt" (choices of seqs), "seq" (concatenation), "opt" (optional alt), "lit"
    parts: tuple = ()
    text: str = ""


def _parse(pattern: str) -> _Node:
    node, pos = _parse_alt(pattern, 0, "")
    if pos != len(pattern):
        raise ValueError(f"unbalanced quiz pattern {pattern!r}")
    return node


def _parse_alt(s: str, pos: int, close: str) -> tuple[_Node, int]:
    seqs, items, buf = [], [], []
    while pos < len(s) and s[pos] != close:
        ch = s[pos]
        if ch in "{[":
            if buf:
                items.append(_Node("lit", text="".join(buf)))
                buf = []
            inner, pos = _parse_alt(s, pos + 1, "}" if ch == "{" else "]")
            items.append(_Node("opt", (inner,)) if ch == "{" else inner)
        elif ch == "|":
            seqs.append(_Node("seq", tuple(items + ([_Node("lit", text="".join(buf))] if buf else []))))
            items, buf = [], []
        elif ch in "}]":
            raise ValueError(f"unbalanced quiz pattern {s!r}")
        else:
            buf.append(ch)
        pos += 1
    if close and pos >= len(s):
        raise ValueError(f"unbalanced quiz pattern {s!r}")
    seqs.append(_Node("seq", tuple(items + ([_Node("lit", text="".join(buf))] if buf else []))))
    return _Node("alt", tuple(seqs)), pos


def _expand(node: _Node) -> list[str]:
    """Every accepted spelling of ``node`` (capped), in the file's preference order."""
    if node.kind == "lit":
        return [node.text]
    if node.kind == "opt":
        return _expand(node.parts[0]) + [""]
    if node.kind == "alt":
        return [form for seq in node.parts for form in _expand(seq)][:_MAX_FORMS]
    forms = [""]
    for part in node.parts:
        forms = [a + b for a in forms for b in _expand(part)][:_MAX_FORMS]
    return forms


def _render(node: _Node, drop_word_optionals: bool) -> str:
    """One readable spelling: first alternative (skipping accent-marked ones), optionals kept.

    With ``drop_word_optionals`` an optional that is a whole word (``{George }Washington``,
    ``{I} loose``) is dropped, while one that completes a word (``Wash{ington}``) is kept,
    since dropping that would leave a fragment such as "Wash".
    """
    if node.kind == "lit":
        return node.text
    if node.kind == "alt":
        choices = [_render(seq, drop_word_optionals) for seq in node.parts]
        plain = [c for c in choices if not _ACCENT.search(c)]
        return plain[0] if _ACCENT.search(choices[0]) and plain else choices[0]
    if node.kind == "opt":
        return _render(node.parts[0], drop_word_optionals)
    out = ""
    for i, part in enumerate(node.parts):
        text = _render(part, drop_word_optionals)
        if part.kind == "opt" and drop_word_optionals and _is_word(out, text, node.parts[i + 1:], drop_word_optionals):
            continue
        out += text
    return out


def _is_word(before: str, text: str, after: tuple, drop: bool) -> bool:
    following = "".join(_render(p, drop) for p in after)
    if text[:1].isspace() or text[-1:].isspace():
        return True
    return (not before or before[-1].isspace()) and (not following or following[0].isspace())


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# --- reading the files -----------------------------------------------------------------------
def assets_dir() -> Path:
    """Folder holding the quiz files inside the installed package."""
    return Path(__file__).resolve().parent.parent / "assets" / "quiz"


def _read_lines(path: Path) -> list[str]:
    """Data lines with backslash continuations joined."""
    lines, pending = [], ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.endswith("\\"):
            pending += raw[:-1]
            continue
        if (pending + raw).strip():
            lines.append(pending + raw)
        pending = ""
    return lines


@lru_cache(maxsize=1)
def quiz_index() -> dict[str, list[str]]:
    """Category (file name) -> field display names, for the files shipped with qaft."""
    out: dict[str, list[str]] = {}
    for line in _read_lines(assets_dir() / "index"):
        path, *fields = line.split(":")
        category = path.rsplit("/", 1)[-1]
        if (assets_dir() / category).is_file():
            names = [_clean(_render(_parse(f), False)).lower().replace("-", " ") for f in fields]
            out[category] = [_FIELD_NAMES.get((category, i), n) for i, n in enumerate(names)]
    return out


def _held_out(category: str, key: str) -> bool:
    """Stable across Python runs (unlike ``hash``), so the evaluation set never drifts."""
    if category in HELDOUT_CATEGORIES:
        return True
    digest = hashlib.sha1(f"{category}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < HELDOUT_FRACTION


def _question(category: str, names: list[str], src: int, dst: int, subject: str) -> str:
    template = _TEMPLATES.get((category, src, dst))
    if template is None:
        key = _KEY_FIELD.get(category, 0)
        if src == key:
            template = f"What is the {names[dst]} of {{x}}?"
        else:
            template = f"Of which {names[dst]} is {{x}} the {names[src]}?"
    return template.format(x=subject)


@lru_cache(maxsize=1)
def _all_items() -> tuple[dict, ...]:
    items: list[dict] = []
    for category, names in quiz_index().items():
        key = _KEY_FIELD.get(category, 0)
        pairs = [(key, j) for j in range(len(names)) if j != key]
        pairs += [(j, key) for j in range(len(names)) if j != key]
        for line in _read_lines(assets_dir() / category):
            fields = [_parse(f) for f in _split_fields(line)]
            if len(fields) != len(names):
                continue  # malformed line; the game skips these too
            line_key = _clean(_render(fields[key], False))
            held = _held_out(category, line_key)
            for src, dst in pairs:
                item = _make_item(category, names, fields, src, dst, held)
                if item is not None:
                    items.append(item)
    return tuple(items)


def _split_fields(line: str) -> list[str]:
    """Split on ``:`` outside brackets (no file nests one today, but the grammar allows it)."""
    fields, depth, start = [], 0, 0
    for i, ch in enumerate(line):
        depth += (ch in "{[") - (ch in "}]")
        if ch == ":" and depth == 0:
            fields.append(line[start:i])
            start = i + 1
    return fields + [line[start:]]


def _make_item(category: str, names: list[str], fields: list[_Node], src: int, dst: int, held: bool) -> dict | None:
    subject = _clean(_render(fields[src], False))
    answer = _clean(_render(fields[dst], True))
    if subject.lower() in _UNKNOWN or answer.lower() in _UNKNOWN:
        return None
    accepted = list(dict.fromkeys(f for f in map(_clean, _expand(fields[dst])) if f))
    if answer not in accepted:
        accepted.insert(0, answer)
    return {
        "instruction": _question(category, names, src, dst, subject),
        "input": "",
        "output": answer,
        "category": category,
        "field": names[dst],
        "accepted": accepted,
        "heldout": held,
    }


def quiz_items(split: str = "train") -> list[dict]:
    """Rendered items of ``split`` (``train``, ``heldout`` or ``all``), in file order.

    A question text that occurs in the held-out split is removed from train even when it was
    produced by a training line, so no evaluation prompt is ever trained on.
    """
    if split not in QUIZ_SPLITS:
        raise ValueError(f"split={split!r} is not one of {QUIZ_SPLITS}")
    items = [dict(i, accepted=list(i["accepted"])) for i in _all_items()]
    if split == "all":
        return items
    heldout = [i for i in items if i["heldout"]]
    if split == "heldout":
        return heldout
    banned = {i["instruction"] for i in heldout}
    return [i for i in items if not i["heldout"] and i["instruction"] not in banned]


def distractor_pool(category: str, field: str, exclude: str | None = None) -> list[str]:
    """Distinct canonical answers of ``field`` in ``category``, for multiple-choice options."""
    if category not in quiz_index():
        raise ValueError(f"category={category!r} is not one of {tuple(quiz_index())}")
    if field not in quiz_index()[category]:
        raise ValueError(f"field={field!r} is not one of {tuple(quiz_index()[category])}")
    pool = (i["output"] for i in _all_items() if i["category"] == category and i["field"] == field)
    return [a for a in dict.fromkeys(pool) if exclude is None or a.lower() != exclude.lower()]
