import hashlib
import json
import os

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
from qaft.training.identity import FILES_KEY, config_digest, identity_config, unmatched_reads


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


# --- local files: what is parsed is what is hashed, and the identity hashes what the config names ---------
def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rewrite_keeping_mtime(path, text: str) -> None:
    """New contents under the old modification time, as ``cp -p`` and ``rsync -a`` leave them."""
    st = path.stat()
    path.write_text(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _qa_lines(word: str, n: int = 20) -> str:
    return "".join(json.dumps({"instruction": f"Name a {word}, number {i}.", "output": word}) + "\n" for i in range(n))


def test_a_local_instruct_file_is_parsed_afresh_and_its_digest_is_of_the_bytes_parsed(tok, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(_qa_lines("cat"))
    first = InstructDataModule(tok, source=str(path), max_length=64)
    first.setup()
    _rewrite_keeping_mtime(path, _qa_lines("owl"))  # datasets' json cache (path + mtime) would serve "cat" again
    second = InstructDataModule(tok, source=str(path), max_length=64)
    second.setup()
    assert all(set(second.raw[split]["output"]) == {"owl"} for split in ("train", "validation", "test"))
    assert second.data_sha256 == {str(path): _sha(path)} and first.data_sha256 != second.data_sha256
    (tmp_path / "rows.json").write_text(json.dumps([{"instruction": "Hi?", "output": "Hello", "extra": 1},
                                                    {"instruction": "Bye?", "input": "now", "output": "Bye"}]))
    raw = InstructDataModule(tok, source=str(tmp_path / "rows.json"), max_length=64)
    raw.setup()
    rows = list(raw.raw["train"]) + list(raw.raw["validation"])
    assert sorted(r["output"] for r in rows) == ["Bye", "Hello"] and {"input", "extra"} <= set(rows[0])


def test_local_folders_of_split_files_record_each_file_read(tok, tmp_path):
    lm, qa = tmp_path / "corpus", tmp_path / "qa"
    lm.mkdir(), qa.mkdir()
    for split in ("train", "valid", "test"):
        (lm / f"{split}.txt").write_text(" ".join(f"{split} word {i}." for i in range(200)))
    (qa / "train.jsonl").write_text(_qa_lines("cat"))
    (qa / "test.jsonl").write_text(_qa_lines("dog", 4))
    dm = LMDataModule(tok, source=str(lm), seq_len=16, max_eval_tokens=64)
    dm.setup()
    assert dm.data_sha256 == {str(lm / f"{s}.txt"): _sha(lm / f"{s}.txt") for s in ("train", "valid", "test")}
    assert dm.texts["validation"] == [(lm / "valid.txt").read_text()]
    inst = InstructDataModule(tok, source=str(qa), max_length=64)
    inst.setup()
    assert set(inst.raw["test"]["output"]) == {"dog"} and len(inst.raw["train"]) + len(inst.raw["validation"]) == 20
    assert set(inst.data_sha256) == {str(qa / "train.jsonl"), str(qa / "test.jsonl")}
    # the identity hashes the folders' files, and the data read matches it
    identity = identity_config({"data": {"source": str(lm)}, "eval": {"corpus": {"source": str(qa)}}})
    assert unmatched_reads(identity, dm.data_sha256 | inst.data_sha256) == []


def test_the_identity_hashes_every_local_file_any_config_value_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, word in (("x.jsonl", "cat"), ("other.jsonl", "dog")):
        (tmp_path / name).write_text(_qa_lines(word))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"hidden_size": 64}')
    for bare in ("austen", "test"):  # bare words are built-in or option names, never these folders
        (tmp_path / bare).mkdir()
        (tmp_path / bare / "a.txt").write_text("not data")
    cfg = {"data": {"source": "x.jsonl", "datamodule": {"_target_": "qaft.data.InstructDataModule",
                                                        "source": "other.jsonl"}},
           "model": {"name_or_path": "./model"}, "eval": {"split": "test", "corpus": {"source": "austen"}},
           "runs_root": "runs"}
    tree = identity_config(cfg)
    assert tree[FILES_KEY] == {"x.jsonl": _sha(tmp_path / "x.jsonl"), "other.jsonl": _sha(tmp_path / "other.jsonl"),
                               "./model": {"config.json": _sha(tmp_path / "model" / "config.json")}}
    digest = config_digest(cfg)
    assert config_digest(tree) == digest  # an identity is its own identity
    (tmp_path / "austen" / "a.txt").write_text("still not data")
    assert config_digest(cfg) == digest
    _rewrite_keeping_mtime(tmp_path / "other.jsonl", _qa_lines("owl"))  # same size, same mtime, other data
    assert config_digest(cfg) != digest
    digest = config_digest(cfg)
    _rewrite_keeping_mtime(tmp_path / "model" / "config.json", '{"hidden_size": 32}')
    assert config_digest(cfg) != digest


def test_unmatched_reads_names_data_read_other_than_the_identity_promises(tok, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(_qa_lines("cat"))
    identity = identity_config({"data": {"source": str(path)}})
    dm = InstructDataModule(tok, source=str(path), max_length=64)
    dm.setup()
    assert unmatched_reads(identity, dm.data_sha256) == []
    _rewrite_keeping_mtime(path, _qa_lines("owl"))  # edited between the identity and the read
    late = InstructDataModule(tok, source=str(path), max_length=64)
    late.setup()
    (line,) = unmatched_reads(identity, late.data_sha256)
    assert line.startswith(f"{path}: read with sha256 {_sha(path)[:12]}") and "changed after" in line
    (line,) = unmatched_reads(identity_config({"data": {"source": "quiz"}}), late.data_sha256)
    assert "no config value names it" in line
