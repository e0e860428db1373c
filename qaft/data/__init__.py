"""qaft's datasets: built-in offline corpora (Austen, quiz) and the hub/local loaders used for real runs."""

from __future__ import annotations

from pathlib import Path

from qaft.sources import is_hub_id, looks_local

DATA_KINDS = ("instruct", "lm")
BUILTIN_SOURCES = {"instruct": ("quiz",), "lm": ("austen",)}
# Legacy hub datasets without an owner; any other bare name is taken for a mistyped built-in.
LEGACY_HUB_IDS = ("wikitext", "c4", "ptb_text_only", "lambada")


def validate_data_source(kind: str, source: str) -> None:
    """Reject a bad data source before any model or dataset is loaded.

    Runs on clusters fail minutes in when a typo'd path is only found at data loading; this
    check is cheap. Hub ids cannot be checked offline and pass.
    """
    if kind not in DATA_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {DATA_KINDS}")
    allowed = BUILTIN_SOURCES[kind]
    hint = f"use one of the built-in sources {allowed}, a hub dataset id ('org/name') or an existing local file"
    if not isinstance(source, str) or not source:
        raise ValueError(f"source={source!r} is empty; {hint}")
    if source in allowed:
        return
    if source in sum(BUILTIN_SOURCES.values(), ()):
        raise ValueError(f"source={source!r} is not a {kind} source; {hint}")
    if looks_local(source) and not Path(source).expanduser().exists():
        raise ValueError(f"source={source!r}: local path does not exist; {hint}")
    if not looks_local(source) and not is_hub_id(source) and source not in LEGACY_HUB_IDS:
        raise ValueError(f"source={source!r} is not a known {kind} source; {hint}")


from qaft.data.austen import austen_chapters, austen_splits  # noqa: E402
from qaft.data.instruct import InstructDataModule, PadCollator, format_prompt, tokenize_example  # noqa: E402
from qaft.data.lm import LMDataModule, lm_blocks, lm_eval_windows, load_lm_texts, tokenize_texts  # noqa: E402
from qaft.data.quiz import distractor_pool, quiz_items  # noqa: E402

__all__ = [
    "BUILTIN_SOURCES", "InstructDataModule", "LMDataModule", "PadCollator", "austen_chapters",
    "austen_splits", "distractor_pool", "format_prompt", "lm_blocks", "lm_eval_windows", "load_lm_texts",
    "quiz_items", "tokenize_example", "tokenize_texts", "validate_data_source",
]
