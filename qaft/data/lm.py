"""Language-modelling data: fixed-length token blocks for training and perplexity windows.

Quantization papers report WikiText-2 perplexity on non-overlapping windows of the concatenated
test split; qaft does the same on any source so the numbers stay comparable. Offline, the
built-in ``austen`` corpus (``qaft.data.austen``) stands in for WikiText-2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from qaft.data.austen import austen_splits
from qaft.data.instruct import PadCollator
from qaft.data.loaders import SplitDataModule
from qaft.data.local import read_text, split_files

BUILTIN_LM = ("austen",)
LM_SPLITS = ("train", "validation", "test")
DOC_SEPARATOR = "\n\n"


def _read_local(source: str, read: dict[str, str] | None) -> dict[str, list[str]]:
    """A folder with ``train``/``valid(ation)``/``test`` ``.txt`` files, or one text file.

    One file is cut 90/5/5 by position (contiguous, so no paragraph is split across sets).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        files = split_files(path, (".txt",))
        missing = [split for split in LM_SPLITS if split not in files]
        if missing:
            raise ValueError(f"source={source!r}: no {missing[0]} .txt file in the folder")
        return {split: [read_text(files[split], read)] for split in LM_SPLITS}
    lines = read_text(path, read).splitlines()
    a, b = int(len(lines) * 0.9), int(len(lines) * 0.95)
    return {"train": ["\n".join(lines[:a])], "validation": ["\n".join(lines[a:b])], "test": ["\n".join(lines[b:])]}


def load_lm_texts(source: str = "austen", config: str | None = None,
                  read: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Documents per split for ``source``: ``austen``, a local path, or a hub dataset id.

    A local file or folder is read here, never through a cache, and ``read`` (if given) collects
    ``{path: sha256}`` of the files parsed (:mod:`qaft.data.local`). Hub datasets (e.g. ``wikitext`` with
    ``wikitext-2-raw-v1``) are read through ``datasets``; their ``text`` column's lines are joined back into
    one document per split, as the standard WikiText perplexity protocol does.
    """
    from qaft.data import validate_data_source

    validate_data_source("lm", source)
    if source == "austen":
        return austen_splits()
    if Path(source).expanduser().exists():
        return _read_local(source, read)
    from datasets import load_dataset

    raw = load_dataset(source, config)
    out = {}
    for split in LM_SPLITS:
        name = split if split in raw else ("valid" if split == "validation" and "valid" in raw else None)
        if name is None:
            raise ValueError(f"source={source!r} has no {split!r} split (has {list(raw)})")
        out[split] = ["\n".join(raw[name]["text"])]
    return out


def tokenize_texts(tokenizer: Any, texts: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """All documents joined by a blank line and tokenized as one stream (1-D long tensor).

    One stream, as the WikiText protocol does, so BPE merges at document seams match it. With
    ``max_tokens`` only a generous character prefix is tokenized first (≈4 characters per token in
    English), which keeps small test runs fast.
    """
    text = DOC_SEPARATOR.join(texts)
    if max_tokens is not None:
        prefix = text[: max_tokens * 16 + 64]
        ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        # The last prefix token may be cut mid-word; keep it only when the whole text was read.
        if len(ids) > max_tokens or len(prefix) == len(text):
            return torch.tensor(ids[:max_tokens], dtype=torch.long)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def lm_blocks(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` blocks; the last partial block is dropped (as in HF's
    ``group_texts``) so every training step sees full-length sequences."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be at least 2")
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def lm_eval_windows(
    tokenizer: Any, split_texts: list[str], seq_len: int, max_tokens: int | None = None
) -> list[torch.Tensor]:
    """Non-overlapping windows covering the split (the last one may be shorter) for perplexity.

    Unlike training blocks the tail is kept, so every token of the (capped) split is scored once.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be at least 2")
    ids = tokenize_texts(tokenizer, split_texts, max_tokens)
    return [w for w in ids.split(seq_len) if w.numel() >= 2]


class TokenRows(Dataset):
    """Token sequences as training examples: labels equal inputs (the model shifts them), no padding inside."""

    def __init__(self, rows: list[torch.Tensor]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids = self.rows[i].tolist()
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids}


class LMDataModule(SplitDataModule):
    """Language-modelling blocks for Lightning; labels equal inputs (the model shifts them).

    After ``setup``, ``texts`` holds the documents per split as read (score them rather than reading the source
    again, which could meet an edited file) and ``data_sha256`` the digests of the local files among them.
    """

    def __init__(
        self,
        tokenizer: Any,
        source: str = "austen",
        seq_len: int = 256,
        batch_size: int = 4,
        max_train_tokens: int | None = None,
        max_eval_tokens: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        config: str | None = None,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        from qaft.data import validate_data_source

        validate_data_source("lm", source)
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len} must be at least 2")
        self.tokenizer, self.source, self.config = tokenizer, source, config
        self.seq_len, self.seed, self.num_workers = seq_len, seed, num_workers
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.max_train_tokens, self.max_eval_tokens = max_train_tokens, max_eval_tokens
        self.collator = PadCollator(tokenizer.pad_token_id)
        self.splits: dict[str, TokenRows] = {}
        self.texts: dict[str, list[str]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.texts = texts = load_lm_texts(self.source, self.config, read=self.data_sha256)
        ids = tokenize_texts(self.tokenizer, texts["train"], self.max_train_tokens)
        self.splits["train"] = TokenRows(list(lm_blocks(ids, self.seq_len)))
        for split in ("validation", "test"):
            windows = lm_eval_windows(self.tokenizer, texts[split], self.seq_len, self.max_eval_tokens)
            self.splits[split] = TokenRows(windows)
