import json

import pytest
import torch

from qaft.data import (
    InstructDataModule,
    LMDataModule,
    PadCollator,
    austen_chapters,
    austen_splits,
    distractor_pool,
    format_prompt,
    lm_blocks,
    lm_eval_windows,
    quiz_items,
    tokenize_example,
    tokenize_texts,
    validate_data_source,
)
from qaft.data.austen import NOVELS
from qaft.data.instruct import IGNORE_INDEX, PROMPT_NO_INPUT
from qaft.data.quiz import HELDOUT_CATEGORIES
from qaft.models import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-llama")


# --- Austen -----------------------------------------------------------------------------------
def test_austen_chapter_counts():
    counts = {n: len(austen_chapters(n)) for n in NOVELS}
    assert counts == {"emma": 55, "mansfieldpark": 48, "persuasion": 24, "prideprejudice": 61, "sensesensibility": 50}
    first = austen_chapters("prideprejudice")[0].text
    assert first.startswith("Chapter 1\n") and "truth universally acknowledged" in first
    assert all("VOLUME" not in c.text.splitlines() for c in austen_chapters())


def test_austen_splits_disjoint_complete_deterministic():
    splits = austen_splits()
    assert set(splits) == {"train", "validation", "test"}
    all_texts = [c.text for c in austen_chapters()]
    joined = [t for s in splits.values() for t in s]
    assert sorted(joined) == sorted(all_texts)  # every chapter exactly once
    assert not set(splits["train"]) & set(splits["validation"])
    assert not set(splits["train"]) & set(splits["test"])
    assert not set(splits["validation"]) & set(splits["test"])
    assert 0.03 < len(splits["validation"]) / len(all_texts) < 0.08
    assert 0.03 < len(splits["test"]) / len(all_texts) < 0.08
    assert austen_splits() == splits
    assert {c.novel for c in austen_chapters() if c.split == "validation"} == set(NOVELS)


# --- quiz -------------------------------------------------------------------------------------
def test_quiz_known_items():
    train = quiz_items("train")
    by_q = {i["instruction"]: i for i in quiz_items("all")}
    alaska = by_q["What is the capital of the U.S. state of Alaska?"]
    assert alaska["output"] == "Juneau" and alaska["category"] == "state" and alaska["field"] == "capital"
    assert alaska in train
    assert by_q["Of which state is Juneau the capital?"]["accepted"] == ["Alaska", "AK"]
    flower = by_q["What is the flower of Alaska?"]
    assert flower["output"] == "forget-me-not" and "forget me not" in flower["accepted"]
    pres = by_q["Who succeeded George Washington as President of the United States?"]
    assert pres["output"] == "Adams" and "John Adams" in pres["accepted"]  # {J{ohn} } is optional
    for item in quiz_items("all"):
        assert item["input"] == "" and item["output"] in item["accepted"]
        assert not any(c in item["output"] for c in "{}[]|"), item
        assert item["output"].lower() != "gok"


def test_quiz_heldout_never_in_train():
    train, held = quiz_items("train"), quiz_items("heldout")
    assert len(train) > 1000 and len(held) > 200
    assert not {i["instruction"] for i in train} & {i["instruction"] for i in held}
    assert not {i["category"] for i in train} & set(HELDOUT_CATEGORIES)
    assert set(HELDOUT_CATEGORIES) <= {i["category"] for i in held}
    assert len({i["category"] for i in held}) > len(HELDOUT_CATEGORIES)  # fraction of others too
    assert quiz_items("train") == train  # deterministic
    with pytest.raises(ValueError, match="split"):
        quiz_items("validation")


def test_distractor_pool():
    pool = distractor_pool("state", "capital", exclude="Juneau")
    assert "Juneau" not in pool and "Sacramento" in pool and len(pool) == len(set(pool)) >= 40
    with pytest.raises(ValueError, match="category"):
        distractor_pool("nope", "capital")


# --- instruct ---------------------------------------------------------------------------------
def test_alpaca_template_exact():
    assert format_prompt("Say hi") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nSay hi\n\n### Response:"
    )
    assert "### Input:\nctx\n\n### Response:" in format_prompt("Say hi", "ctx")
    assert format_prompt("Say hi", "  ") == PROMPT_NO_INPUT.format(instruction="Say hi")


def test_labels_only_on_response(tok):
    ex = {"instruction": "What is the capital of Alaska?", "input": "", "output": "Juneau"}
    out = tokenize_example(ex, tok, max_length=256)
    prompt_ids = tok(format_prompt(ex["instruction"]))["input_ids"]
    response_ids = tok("Juneau", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(prompt_ids)
    assert out["input_ids"] == prompt_ids + response_ids
    assert out["labels"][:n] == [IGNORE_INDEX] * n
    assert out["labels"][n:] == response_ids
    short = tokenize_example(ex, tok, max_length=n + 1)
    assert len(short["input_ids"]) == n + 1 and short["labels"][-1] == response_ids[0]

    batch = PadCollator(tok.pad_token_id)([out, short])
    assert all(v.dtype == torch.long for v in batch.values())
    assert batch["labels"][1, n + 1 :].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"][1].sum() == n + 1
    assert batch["input_ids"][1, n + 1 :].eq(tok.pad_token_id).all()
    assert batch["labels"][0, -1] == tok.eos_token_id  # eos == pad here, yet still supervised


def test_instruct_datamodule_quiz(tok):
    dm = InstructDataModule(tok, source="quiz", batch_size=4, max_length=128, max_train_samples=64)
    dm.setup()
    assert len(dm.splits["train"]) == 64 and len(dm.splits["test"]) == len(quiz_items("heldout"))
    first = [b["input_ids"].tolist() for b in dm.train_dataloader()]
    again = [b["input_ids"].tolist() for b in InstructDataModule(tok, max_length=128, max_train_samples=64).train_dataloader()]
    assert first == again  # seeded shuffling
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert ((batch["labels"] != IGNORE_INDEX) <= batch["attention_mask"].bool()).all()
    held = {i["instruction"] for i in quiz_items("heldout")}
    assert not held & set(dm.raw["train"]["instruction"]) and not held & set(dm.raw["validation"]["instruction"])


def test_instruct_local_json(tok, tmp_path):
    rows = [{"instruction": f"Count to {i}", "input": "", "output": " ".join(map(str, range(i)))} for i in range(1, 41)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    dm = InstructDataModule(tok, source=str(path), batch_size=8)
    dm.setup()
    assert len(dm.splits["train"]) + len(dm.splits["validation"]) == 40
    assert next(iter(dm.train_dataloader()))["input_ids"].shape[0] == 8


def test_validate_data_source(tmp_path):
    validate_data_source("instruct", "quiz")
    validate_data_source("lm", "austen")
    validate_data_source("instruct", "tatsu-lab/alpaca")
    validate_data_source("lm", "wikitext")
    with pytest.raises(ValueError, match="source='/no/such.json'.*does not exist"):
        validate_data_source("instruct", "/no/such.json")
    with pytest.raises(ValueError, match="'quiz'"):
        validate_data_source("instruct", "quizz")
    with pytest.raises(ValueError, match="'austen'"):
        validate_data_source("lm", "quiz")
    with pytest.raises(ValueError, match="kind"):
        validate_data_source("vision", "austen")
    with pytest.raises(ValueError, match="source"):
        InstructDataModule(None, source="missing.jsonl")


# --- language modelling -----------------------------------------------------------------------
def test_lm_blocks_and_windows(tok):
    texts = austen_splits()["test"][:2]
    ids = tokenize_texts(tok, texts)
    assert torch.equal(ids, torch.tensor(tok("\n\n".join(texts), add_special_tokens=False)["input_ids"]))
    blocks = lm_blocks(ids, 128)
    assert blocks.shape == (ids.numel() // 128, 128)
    assert torch.equal(blocks.flatten(), ids[: blocks.numel()])
    windows = lm_eval_windows(tok, texts, 128)
    assert torch.equal(torch.cat(windows), ids)  # every token scored exactly once
    assert all(w.numel() == 128 for w in windows[:-1])
    capped = lm_eval_windows(tok, texts, 128, max_tokens=300)
    assert [w.numel() for w in capped] == [128, 128, 44]


def test_lm_datamodule(tok, tmp_path):
    dm = LMDataModule(tok, source="austen", seq_len=64, batch_size=4, max_train_tokens=4096, max_eval_tokens=1000)
    dm.setup()
    assert len(dm.splits["train"]) == 64
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 64) and torch.equal(batch["labels"], batch["input_ids"])
    val = list(dm.val_dataloader())
    assert sum(int(b["attention_mask"].sum()) for b in val) == 1000
    assert val[-1]["labels"][-1, -1] == IGNORE_INDEX  # padded tail window
    order = [b["input_ids"][:, 0].tolist() for b in dm.train_dataloader()]
    again = LMDataModule(tok, seq_len=64, max_train_tokens=4096, max_eval_tokens=1000)
    assert order == [b["input_ids"][:, 0].tolist() for b in again.train_dataloader()]

    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"line {i} of a small local corpus" for i in range(400)))
    local = LMDataModule(tok, source=str(path), seq_len=32)
    local.setup()
    assert len(local.splits["train"]) > 0 and len(local.splits["test"]) > 0
