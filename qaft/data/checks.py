"""Up-front checks of the data a config names, so that a bad file costs one line, not a failed run.

Local files are read here (cheaply) before any model loads: an instruction file must be UTF-8 JSON (an array
of objects, or JSON lines) with string ``instruction`` and ``output`` fields, and at least one example whose
prompt leaves room for a response within ``max_length`` tokens (the data module drops the others); a text
corpus must be UTF-8 and hold at least one training block of ``seq_len`` tokens. Hub datasets are looked up
(metadata only): offline, or unreachable, that is one line as well.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qaft.data import BUILTIN_SOURCES, format_prompt
from qaft.sources import looks_local


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def read_instruct_records(path: Path) -> list[dict[str, Any]]:
    """The records of a local Alpaca-format file (a JSON array or JSON lines), checked field by field."""
    text = _read_text(path)
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    try:
        data = json.loads(text)
        records = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {number} is not JSON ({err.msg}); expected a JSON array of "
                                 "objects or one JSON object per line") from None
    for number, record in enumerate(records, 1):
        missing = [k for k in ("instruction", "output") if not isinstance(record, dict)
                   or not isinstance(record.get(k), str)]
        if missing:
            raise ValueError(f"{path}: record {number} lacks string field(s) {missing} "
                             "(Alpaca format: instruction, optional input, output)")
    if not records:
        raise ValueError(f"{path}: holds no records")
    return records


def check_instruct_file(path: Path, tokenizer: Any, max_length: int) -> None:
    """Raise ``ValueError`` unless some example's prompt fits in ``max_length`` tokens with room to learn."""
    for record in read_instruct_records(path):
        prompt = format_prompt(record["instruction"], record.get("input") or "")
        if len(tokenizer(prompt, add_special_tokens=True)["input_ids"]) < max_length:
            return
    raise ValueError(f"{path}: every example's prompt is max_length={max_length} tokens or longer, so no response "
                     "token would be trained on; raise data.datamodule.max_length")


def check_text_source(path: Path, tokenizer: Any, seq_len: int) -> None:
    """Raise ``ValueError`` unless the corpus (file, or folder of split files) is UTF-8 and holds a block."""
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path}: no .txt files in the folder")
    texts = {f: _read_text(f) for f in files}
    train = next((t for f, t in texts.items() if "train" in f.stem), None) if path.is_dir() else texts[path]
    if not train or not train.strip():
        raise ValueError(f"{path}: the training text is empty")
    if len(tokenizer(train[: seq_len * 16 + 64], add_special_tokens=False)["input_ids"]) < seq_len:
        raise ValueError(f"{path}: fewer than seq_len={seq_len} tokens of training text: no training block")


def check_hub_dataset(source: str, config: str | None) -> None:
    """Raise ``ValueError`` in one line when a hub dataset cannot be reached (offline and not cached)."""
    from datasets import load_dataset_builder

    try:
        load_dataset_builder(source, config)
    except Exception as err:  # noqa: BLE001 - datasets raises many types here; all mean "cannot use it"
        raise ValueError(f"dataset {source!r}: cannot be loaded from the hub or the local cache "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None


def check_data(kind: str, source: str, config: str | None, tokenizer: Any, length: int) -> None:
    """All of the above that applies to ``source`` (``length``: training ``seq_len`` or ``max_length``)."""
    if source in BUILTIN_SOURCES[kind]:
        return
    path = Path(source).expanduser()
    if path.exists():
        (check_instruct_file if kind == "instruct" else check_text_source)(path, tokenizer, length)
    elif not looks_local(source):
        check_hub_dataset(source, config)


__all__ = ["check_data", "check_hub_dataset", "check_instruct_file", "check_text_source", "read_instruct_records"]
