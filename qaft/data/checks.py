"""Up-front checks of the data a config names, so that a bad file costs one line, not a failed run.

Local files are read here (cheaply) before any model loads, and split exactly as the data modules split them
(:func:`qaft.data.instruct.load_instruct_source`, :func:`qaft.data.lm.load_lm_texts`), so that what passes here
gives the run at least one training example and one example to evaluate on:

* an instruction file must be UTF-8 JSON (an array of objects, or JSON lines) whose every record has string
  ``instruction`` and ``output`` fields, an ``input`` that is a string or null where it has one, and other fields of
  one JSON type throughout (``datasets`` reads a column as one type); its training split and its evaluation split
  must each hold an example whose prompt leaves room for a response within ``max_length`` tokens (the data module
  drops the others);
* a text corpus (a file, cut 90/5/5 by lines, or a folder of split files) must be UTF-8, hold one training block
  of ``seq_len`` tokens in its training part and at least two tokens (one scored token) in the evaluated split.

Hub datasets are looked up (metadata only): offline, or unreachable, that is one line as well.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from qaft.data import BUILTIN_SOURCES, format_prompt
from qaft.data.local import parse_json_records, read_text
from qaft.sources import looks_local

_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
               float: "a number"}


def _check_record(path: Path, number: int, record: Any, types: dict[str, tuple[str, int]]) -> None:
    """One record's fields; ``types``: each other field's JSON type and the record that set it, so far."""
    if not isinstance(record, dict):  # ValueError, not TypeError: a bad file is bad input, as every check here says
        kind = _JSON_TYPES.get(type(record), "null")
        raise ValueError(f"{path}: record {number} is {kind}, not an object "  # noqa: TRY004
                         "(Alpaca format: instruction, optional input, output)")
    missing = [k for k in ("instruction", "output") if not isinstance(record.get(k), str)]
    if missing:
        raise ValueError(f"{path}: record {number} lacks string field(s) {missing} "
                         "(Alpaca format: instruction, optional input, output)")
    if record.get("input") is not None and not isinstance(record["input"], str):
        raise ValueError(f"{path}: record {number}: field 'input' must be a string or null, got "
                         f"{_JSON_TYPES.get(type(record['input']))} ({record['input']!r:.40})")
    for key, value in record.items():
        if value is None or key in ("instruction", "input", "output"):
            continue
        kind = _JSON_TYPES[type(value)]
        first = types.setdefault(key, (kind, number))
        if first[0] != kind:
            raise ValueError(f"{path}: record {number}: field {key!r} is {kind} where record {first[1]}'s is "
                             f"{first[0]} (a field must have one type in every record)")


def read_instruct_records(path: Path) -> list[dict[str, Any]]:
    """The records of a local Alpaca-format file (a JSON array or JSON lines), checked field by field."""
    text = read_text(path)
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    records = parse_json_records(path, text)
    if not records:
        raise ValueError(f"{path}: holds no records")
    types: dict[str, tuple[str, int]] = {}
    for number, record in enumerate(records, 1):
        _check_record(path, number, record, types)
    return records


def _fits(record: dict[str, Any], tokenizer: Any, max_length: int) -> bool:
    prompt = format_prompt(record["instruction"], record.get("input") or "")
    return len(tokenizer(prompt, add_special_tokens=True)["input_ids"]) < max_length


def check_instruct_file(path: Path, tokenizer: Any, max_length: int, eval_split: str = "test", seed: int = 0,
                        val_fraction: float = 0.05, limits: tuple[int | None, int | None] = (None, None)) -> None:
    """Raise ``ValueError`` unless every record is well-formed and the training split and ``eval_split`` (as the
    data module splits the file, with ``seed`` / ``val_fraction``; ``limits``: its max_train_samples and
    max_eval_samples) each hold an example whose prompt fits in ``max_length`` tokens with room to learn."""
    from qaft.data.instruct import load_instruct_source

    records = read_instruct_records(path)
    if len(records) < 2:
        raise ValueError(f"{path}: holds 1 record; a run needs at least 2, one to train on and one held out to "
                         f"evaluate (a share data.datamodule.val_fraction={val_fraction} of them)")
    try:
        splits = load_instruct_source(str(path), seed, val_fraction)
    except ValueError as err:  # too few records for the held-out share
        raise ValueError(f"{path}: {len(records)} records cannot be split into training and held-out examples "
                         f"({str(err).splitlines()[0]})") from None
    for split, limit in (("train", limits[0]), (eval_split, limits[1])):
        examples = splits[split].select(range(min(limit or len(splits[split]), len(splits[split]))))
        if not any(_fits(r, tokenizer, max_length) for r in examples):
            raise ValueError(f"{path}: no example of its {split} split ({len(examples)}) has a prompt shorter than "
                             f"max_length={max_length} tokens, so none would be trained or scored on; raise "
                             "data.datamodule.max_length")


def _token_count(tokenizer: Any, text: str, enough: int) -> int:
    """Tokens in ``text``, counted only as far as ``enough``."""
    from qaft.data.lm import tokenize_texts

    return int(tokenize_texts(tokenizer, [text], enough).numel())


def check_text_source(path: Path, tokenizer: Any, seq_len: int, eval_split: str = "test") -> None:
    """Raise ``ValueError`` unless the corpus (file, or folder of split files) is UTF-8, its training part holds a
    block of ``seq_len`` tokens and its ``eval_split`` part a scored token (two tokens), as the data module cuts it."""
    from qaft.data.lm import load_lm_texts

    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path}: no .txt files in the folder")
    for file in files:
        read_text(file)
    texts = {split: "".join(docs) for split, docs in load_lm_texts(str(path)).items()}
    cut = "" if path.is_dir() else " (one file is cut 90/5/5 by lines)"
    if _token_count(tokenizer, texts["train"], seq_len) < seq_len:
        raise ValueError(f"{path}: its training part{cut} holds fewer than seq_len={seq_len} tokens: no training "
                         "block")
    check_text_split(path, tokenizer, eval_split, texts[eval_split])


def check_text_split(source: str | Path, tokenizer: Any, split: str, text: str | None = None) -> None:
    """Raise ``ValueError`` unless ``split`` of a local corpus holds two tokens (one to score)."""
    from qaft.data.lm import load_lm_texts

    text = "".join(load_lm_texts(str(source))[split]) if text is None else text
    if _token_count(tokenizer, text, 2) < 2:
        raise ValueError(f"{source}: its {split} part holds fewer than 2 tokens: nothing to evaluate on "
                         "(a file is cut 90/5/5 by lines; give more text, or a folder of train/valid/test .txt files)")


def check_hub_dataset(source: str, config: str | None) -> None:
    """Raise ``ValueError`` in one line when a hub dataset cannot be reached (offline and not cached)."""
    from datasets import load_dataset_builder

    try:
        load_dataset_builder(source, config)
    except Exception as err:  # noqa: BLE001 - datasets raises many types here; all mean "cannot use it"
        raise ValueError(f"dataset {source!r}: cannot be loaded from the hub or the local cache "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None


def check_data(kind: str, source: str, config: str | None, tokenizer: Any, length: int, **split: Any) -> None:
    """All of the above that applies to ``source`` (``length``: training ``seq_len`` or ``max_length``; ``split``:
    ``eval_split``, and for instruction files ``seed``, ``val_fraction`` and ``limits``, as the data module has
    them)."""
    if source in BUILTIN_SOURCES[kind]:
        return
    path = Path(source).expanduser()
    if path.exists() and kind == "instruct":
        check_instruct_file(path, tokenizer, length, **split)
    elif path.exists():
        check_text_source(path, tokenizer, length, split.get("eval_split", "test"))
    elif not looks_local(source):
        check_hub_dataset(source, config)


__all__ = ["check_data", "check_hub_dataset", "check_instruct_file", "check_text_source", "check_text_split",
           "read_instruct_records"]
