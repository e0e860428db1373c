"""A real tiny ``qaft-train`` run leaves the item scores behind every number its record reports, and seeds mean
something: the same seed repeats the run bit for bit; another seed changes training (LoRA initialisation, data
order, dropout), never the held-out windows or questions it is scored on."""
from __future__ import annotations

import hashlib
import math
import sys

import pandas as pd
import pytest

from qaft.run_folder import ITEM_SCORES, ITEM_SCORES_SHA256, RunFolder

from helpers import tiny_run_overrides

CORPUS = "{name: austen_val, source: austen, split: validation, seq_len: 32, max_tokens: 64, batch_size: 2}"
ACC = "metrics.lm_eval.results.quiz_mc:0.scores.acc"
PERPLEXITIES = ("ppl_trained", "ppl_merged", "ppl_merged_ptq", "ppl_float", "ppl_ptq", "ppl_austen_val")


def _train(root, seed: int) -> RunFolder:
    from qaft.training.cli import main

    replaced = ("eval.baselines", "eval.max_tokens")
    args = [a for a in tiny_run_overrides(root, steps=2) if not a.startswith(replaced)]
    args += ["method=lora", "method.dropout=0.1", f"seed={seed}", "eval.baselines=true", "eval.max_tokens=128",
             f"eval.corpus={CORPUS}", "eval.tasks=[quiz_mc]", "eval.lm_eval.limit=4", "eval.lm_eval.batch_size=4"]
    with pytest.MonkeyPatch.context() as patch:  # qaft-train's own entry point, in this process
        patch.setattr(sys, "argv", ["qaft-train", *args])
        main()
    (record,) = root.rglob("record.json")
    return RunFolder(record.parent)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Seed 0 twice (two run stores) and seed 1, otherwise the same config."""
    tmp = tmp_path_factory.mktemp("seeds")
    return {name: _train(tmp / name, seed) for name, seed in (("first", 0), ("again", 0), ("other", 1))}


def _frame(folder: RunFolder, key: str) -> pd.DataFrame:
    return pd.read_json(folder.path / folder.record()[ITEM_SCORES][key], lines=True)


def test_every_reported_score_has_items_that_reproduce_it(runs):
    folder = runs["first"]
    record = folder.record()
    metrics = record["metrics"]
    assert record["status"] == "ok" and metrics["deployed"]["form"] == "merged+ptq"
    assert set(record[ITEM_SCORES]) == {f"metrics.{k}" for k in PERPLEXITIES} | {
        "metrics.deployed", ACC, "metrics.lm_eval.results.quiz_mc:0.scores.acc_norm"}
    for name, digest in record[ITEM_SCORES_SHA256].items():
        assert hashlib.sha256((folder.path / name).read_bytes()).hexdigest() == digest
    for key in PERPLEXITIES:
        items = _frame(folder, f"metrics.{key}")
        assert list(items.columns) == ["item", "nll_sum", "tokens"] and list(items["item"]) == list(range(len(items)))
        assert math.exp(items["nll_sum"].sum() / items["tokens"].sum()) == pytest.approx(metrics[key], rel=1e-9)
    assert _frame(folder, "metrics.deployed").equals(_frame(folder, "metrics.ppl_merged_ptq"))
    assert _frame(folder, "metrics.ppl_trained")["tokens"].sum() == metrics["eval_tokens"]
    scores = metrics["lm_eval"]["results"]["quiz_mc:0"]["scores"]
    for metric in ("acc", "acc_norm"):
        items = _frame(folder, f"metrics.lm_eval.results.quiz_mc:0.scores.{metric}")
        assert list(items.columns) == ["item", "correct"] and list(items["item"]) == [0, 1, 2, 3]
        assert items["correct"].mean() == scores[metric]


def test_the_same_seed_repeats_bit_for_bit(runs):
    first, again = runs["first"], runs["again"]
    assert first.read_metrics() and [r.get("train/loss") for r in first.read_metrics()] == [
        r.get("train/loss") for r in again.read_metrics()]
    assert first.record()[ITEM_SCORES_SHA256] == again.record()[ITEM_SCORES_SHA256]  # every window's NLL, equal
    assert {k: first.record()["metrics"][k] for k in PERPLEXITIES} == {
        k: again.record()["metrics"][k] for k in PERPLEXITIES}


def test_another_seed_changes_training_not_what_it_is_scored_on(runs):
    first, other = runs["first"], runs["other"]
    losses = [[r["train/loss"] for r in f.read_metrics() if "train/loss" in r] for f in (first, other)]
    assert losses[0] and losses[0] != losses[1]  # LoRA initialisation, data order and dropout differ
    assert not _frame(first, "metrics.ppl_trained").equals(_frame(other, "metrics.ppl_trained"))
    # The untouched model and its PTQ score identically, window by window: the same held-out windows.
    for key in ("metrics.ppl_float", "metrics.ppl_ptq"):
        assert _frame(first, key).equals(_frame(other, key))
    for key in ("metrics.ppl_trained", "metrics.ppl_austen_val", ACC):
        assert list(_frame(first, key)["item"]) == list(_frame(other, key)["item"])
    corpus = [list(_frame(f, "metrics.ppl_austen_val")["tokens"]) for f in (first, other)]
    assert corpus[0] == corpus[1]
