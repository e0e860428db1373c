"""Alpaca-format instruction tuning data: prompts, response-only labels, a Lightning DataModule.

Fine-tuning recipes in the QLoRA/QA-LoRA line train on Alpaca with the loss on the response
only; qaft reproduces that format exactly so its numbers compare. Offline, the built-in ``quiz``
set (``qaft.data.quiz``) takes Alpaca's place.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qaft.data.loaders import SplitDataModule
from qaft.data.local import JSON_SUFFIXES, json_records, records_dataset, split_files
from qaft.data.quiz import quiz_items

if TYPE_CHECKING:  # imported where used: a GPU check imports qaft.data on machines without `datasets`
    from datasets import Dataset, DatasetDict

IGNORE_INDEX = -100
# Verbatim from Stanford Alpaca (train.py, PROMPT_DICT), so checkpoints match its format.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
BUILTIN_INSTRUCT = ("quiz",)


def format_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - Alpaca's field name
    """The Alpaca prompt, with or without its input section."""
    if input and input.strip():
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def tokenize_example(example: dict[str, Any], tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """Token ids with labels only on the response and its eos.

    Prompt and response are tokenized separately and concatenated, so the label boundary is exact
    rather than guessed from a re-tokenized prefix. Truncation cuts the end, as Alpaca does.
    """
    prompt = format_prompt(example["instruction"], example.get("input") or "")
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(example["output"], add_special_tokens=False)["input_ids"]
    response_ids = response_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


class PadCollator:
    """Pads a list of examples to the longest one: pad id for inputs, -100 for labels.

    Padding per batch rather than to ``max_length`` saves most of the compute on short quiz items.
    Labels are built before padding, so a pad id equal to eos never masks a real eos.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for e in examples:
            ids = list(e["input_ids"])
            gap = width - len(ids)
            labels = list(e.get("labels", ids))
            mask = list(e.get("attention_mask", [1] * len(ids)))
            batch["input_ids"].append(ids + [self.pad_token_id] * gap)
            batch["attention_mask"].append(mask + [0] * gap)
            batch["labels"].append(labels + [IGNORE_INDEX] * gap)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def _local_splits(source: str, read: dict[str, str] | None) -> DatasetDict:
    """A local JSON / JSON-lines file (all of it is ``train``), or a folder of such files, one per split
    (``train`` required; ``valid``/``validation`` and ``test`` optional), parsed here (:mod:`qaft.data.local`)."""
    from datasets import DatasetDict

    path = Path(source).expanduser()
    if path.is_dir():
        files = split_files(path, JSON_SUFFIXES)
        if "train" not in files:
            raise ValueError(f"source={source!r}: no train .json/.jsonl file in the folder")
    elif path.suffix in JSON_SUFFIXES:
        files = {"train": path}
    else:
        raise ValueError(f"source={source!r}: a local instruction file must be .json or .jsonl")
    return DatasetDict({split: records_dataset(json_records(file, read)) for split, file in files.items()})


SPLIT_SEED = 0  # the seed that carves a validation split from train, the same for every run (whatever its seed)


def load_instruct_source(source: str, seed: int = 0, val_fraction: float = 0.05,
                         read: dict[str, str] | None = None) -> DatasetDict:
    """Raw ``instruction``/``input``/``output`` records with train, validation and test splits.

    ``quiz``: train/validation from the quiz train split, test = the held-out questions. A local file or
    folder is parsed here, never through ``datasets``' cache, and ``read`` (if given) collects ``{path: sha256}``
    of the files parsed. Hub or local sources without a validation split get one carved from train by ``seed``;
    their test split is the validation split when they have none.
    """
    from datasets import Dataset, DatasetDict, load_dataset

    from qaft.data import validate_data_source

    validate_data_source("instruct", source)
    if source == "quiz":
        test = Dataset.from_list(quiz_items("heldout"))
        parts = Dataset.from_list(quiz_items("train")).train_test_split(test_size=val_fraction, seed=seed)
        return DatasetDict(train=parts["train"], validation=parts["test"], test=test)
    raw = _local_splits(source, read) if Path(source).expanduser().exists() else load_dataset(source)
    if "validation" not in raw:
        parts = raw["train"].train_test_split(test_size=val_fraction, seed=seed)
        raw = DatasetDict(train=parts["train"], validation=parts["test"], **({"test": raw["test"]} if "test" in raw else {}))
    if "test" not in raw:
        raw["test"] = raw["validation"]
    return raw


class InstructDataModule(SplitDataModule):
    """Alpaca-style instruction data for Lightning, deterministic given ``seed``; after ``setup``, ``raw`` holds
    the records per split and ``data_sha256`` the digests of the local files they were parsed from."""

    def __init__(
        self,
        tokenizer: Any,
        source: str = "quiz",
        max_length: int = 256,
        batch_size: int = 4,
        seed: int = 0,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        val_fraction: float = 0.05,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        from qaft.data import validate_data_source

        validate_data_source("instruct", source)
        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be at least 2")
        self.tokenizer = tokenizer
        self.source, self.max_length, self.seed = source, max_length, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.val_fraction = num_workers, val_fraction
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.collator = PadCollator(tokenizer.pad_token_id)
        self.splits: dict[str, Dataset] = {}

    def _prepare(self, ds: Dataset, limit: int | None) -> Dataset:
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        tok = ds.map(
            lambda ex: tokenize_example(ex, self.tokenizer, self.max_length),
            remove_columns=ds.column_names,
            load_from_cache_file=False,
        )
        # A prompt longer than max_length leaves nothing to learn from; drop it rather than feed
        # the model an all -100 example.
        return tok.filter(lambda ex: any(l != IGNORE_INDEX for l in ex["labels"]), load_from_cache_file=False)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        # The split is carved with a fixed seed, not the run's: a run's seed changes initialisation, data order and
        # dropout, never which examples it trains on or is scored on (seeds are compared item by item).
        raw = load_instruct_source(self.source, SPLIT_SEED, self.val_fraction, read=self.data_sha256)
        self.raw = raw
        self.splits = {
            "train": self._prepare(raw["train"], self.max_train_samples),
            "validation": self._prepare(raw["validation"], self.max_eval_samples),
            "test": self._prepare(raw["test"], self.max_eval_samples),
        }
