"""Per-item scores: the per-window NLL and per-document outcomes behind every reported perplexity and accuracy, as
run-folder files that reproduce the reported value, archived with their records; report cells over seeds."""
from __future__ import annotations

import json
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import qaft
from qaft.evaluation.harness import evaluate_tasks
from qaft.evaluation.perplexity import window_batches, window_scores
from qaft.models import load_causal_lm
from qaft.reporting import tables
from qaft.run_folder import ITEM_SCORES, ITEM_SCORES_ROWS, CorruptRun, RunFolder, check_record, read_item_scores

from helpers import fake_run_folder, tiny_llama, token_batch


def _windows() -> list[torch.Tensor]:
    ids = token_batch(seed=3, batch=1, length=100)[0]
    return list(ids.split(16))  # six windows of 16 and a tail of 4


def test_window_scores_reproduce_the_perplexity_exactly():
    model, windows = tiny_llama(), _windows()
    scores = window_scores(model, windows, batch_size=4)
    assert len(window_batches(windows, 4)) == 3  # rows of several batches, the tail window alone
    frame = pd.DataFrame(scores.rows())
    assert list(frame["item"]) == list(range(len(windows))) and list(frame["tokens"]) == [15] * 6 + [3]
    assert math.exp(frame["nll_sum"].sum() / frame["tokens"].sum()) == pytest.approx(scores.perplexity, rel=1e-12)
    with torch.no_grad():  # each window's own sum, scored alone
        for window, nll in zip(windows, scores.nll_sum):
            logits = model(window.unsqueeze(0)).logits[0, :-1]
            assert F.cross_entropy(logits, window[1:], reduction="sum").item() == pytest.approx(nll, rel=1e-5)


def _record(folder: RunFolder) -> dict:
    items = {"metrics.ppl_merged": [{"item": 0, "nll_sum": 12.5, "tokens": 4},
                                    {"item": 1, "nll_sum": 3.25, "tokens": 2}],
             "metrics.lm_eval.results.quiz_mc:0.scores.acc": [{"item": 7, "correct": 1}, {"item": 9, "correct": 0}]}
    fields = folder.store_item_scores(items, {"metrics.deployed": "metrics.ppl_merged"})
    record = {"status": "ok", "method": "l4q", "seed": 0, "run_dir": str(folder.path),
              "metrics": {"ppl_merged": math.exp(15.75 / 6), "deployed": {"form": "merged"}}, **fields}
    folder.write_record(record)
    return folder.record()


def test_item_score_files_are_named_in_the_record_and_checked(tmp_path):
    folder = RunFolder(tmp_path / "run")
    record = _record(folder)
    names = record[ITEM_SCORES]
    assert names["metrics.deployed"] == names["metrics.ppl_merged"] == "item_scores/metrics.ppl_merged.jsonl"
    acc = pd.read_json(folder.path / names["metrics.lm_eval.results.quiz_mc:0.scores.acc"], lines=True)
    assert list(acc.columns) == ["item", "correct"] and acc["correct"].mean() == 0.5
    ppl = pd.DataFrame(folder.read_item_scores("metrics.deployed"))
    reproduced = math.exp(ppl["nll_sum"].sum() / ppl["tokens"].sum())
    assert reproduced == pytest.approx(record["metrics"]["ppl_merged"], rel=1e-12)
    path = folder.path / names["metrics.ppl_merged"]
    path.write_text(path.read_text().replace("12.5", "12.6"))
    with pytest.raises(CorruptRun, match="digest"):
        folder.read_item_scores("metrics.ppl_merged")
    with pytest.raises(ValueError, match="not an item score"):  # refused before anything is written
        folder.write_item_scores("metrics.x", [{"item": 0, "nll_sum": float("nan"), "tokens": 3}])
    with pytest.raises(KeyError):
        folder.read_item_scores("metrics.ppl_trained")


def test_archive_carries_item_scores_without_the_run_folder(tmp_path, capsys):
    folder = RunFolder(tmp_path / "runs" / "run")
    record = _record(folder)
    archive = tables.archive_runs(tmp_path / "runs", tmp_path / "records.jsonl")
    expected = {k: folder.read_item_scores(k) for k in record[ITEM_SCORES]}
    for path in folder.path.rglob("*"):
        if path.is_file():
            path.unlink()  # the folder's files gone: the archive stands alone
    (line,) = archive.read_text().splitlines()
    archived = check_record(json.loads(line))  # the record's own digest still holds: the rows are outside it
    assert {k: read_item_scores(archived, k) for k in record[ITEM_SCORES]} == expected
    (row,) = tables.load_runs(archive).to_dict("records")
    assert read_item_scores(row, "metrics.lm_eval.results.quiz_mc:0.scores.acc") == expected[
        "metrics.lm_eval.results.quiz_mc:0.scores.acc"]
    assert not any(key.startswith(ITEM_SCORES_ROWS + ".") for key in row)  # not flattened into columns
    again = tables.archive_runs(archive, tmp_path / "again.jsonl")  # an archive of an archive keeps them
    assert again.read_text() == archive.read_text()
    tampered = json.loads(line)
    tampered[ITEM_SCORES_ROWS]["item_scores/metrics.ppl_merged.jsonl"][0]["nll_sum"] = 1.0
    archive.write_text(json.dumps(tampered) + "\n")
    assert tables.load_runs(archive).empty
    assert "digest" in capsys.readouterr().err


def test_lm_eval_items_average_to_the_reported_accuracies():
    model, tokenizer = load_causal_lm("tiny-llama")
    scores = evaluate_tasks(model, tokenizer, ["quiz_mc"], batch_size=8, max_length=128, limit=6)
    reported = scores.results["results"]["quiz_mc:0"]["scores"]
    for metric in ("acc", "acc_norm"):
        rows = scores.items[f"results.quiz_mc:0.scores.{metric}"]
        assert [r["item"] for r in rows] == list(range(6)) and {r["correct"] for r in rows} <= {0, 1}
        assert sum(r["correct"] for r in rows) / len(rows) == reported[metric]
    assert set(scores.results) == {"harness", "results"} and "doc_id" not in json.dumps(scores.results)  # no log


def test_qaft_eval_adds_its_item_scores_to_the_run(tmp_path):
    from hydra import compose, initialize_config_dir

    from qaft.evaluation.app import CONF_DIR, evaluate

    base, _ = load_causal_lm("tiny-llama")
    run_dir = tmp_path / "run"
    fake_run_folder(run_dir, qaft.merge_model(qaft.apply_method(base, qaft.config_for("l4q", bits=4, group_size=32))))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=[f"run_dir={run_dir}", "perplexity.seq_len=32", "perplexity.max_tokens=128",
                                         "model.dtype=float32", "tasks=[quiz_mc]", "lm_eval.limit=4",
                                         "perplexity.enabled=true"])
    results = evaluate(cfg)
    folder = RunFolder(run_dir)
    record, form = folder.record(), results["form"]
    rows = pd.DataFrame(folder.read_item_scores(f"eval.{form}.perplexity.value"))
    assert len(rows) == 4 and rows["tokens"].sum() == results["perplexity"]["tokens"] - 4
    assert math.exp(rows["nll_sum"].sum() / rows["tokens"].sum()) == pytest.approx(
        record["eval"][form]["perplexity"]["value"], rel=1e-9)
    acc = pd.DataFrame(folder.read_item_scores(f"eval.{form}.lm_eval.results.quiz_mc:0.scores.acc"))
    assert acc["correct"].mean() == record["eval"][form]["lm_eval"]["results"]["quiz_mc:0"]["scores"]["acc"]


def test_cells_show_the_mean_with_a_t_interval_over_seeds(monkeypatch):
    assert tables._cell(pd.Series([44.786]), 2) == "44.79"  # one seed: the value as before
    assert tables._cell(pd.Series([1.0, 2.0, 3.0]), 2) == "2.00 ± 2.48 (n=3)"  # 4.302653 * 1 / sqrt(3)
    assert tables._cell(pd.Series([40.0, 42.0]), 2) == "41.00 ± 12.71 (n=2)"
    assert tables._cell(pd.Series([float("nan")]), 2) == tables.NOT_APPLICABLE
    with_scipy = [tables.t_quantile(df) for df in (1, 2, 9, 29, 45)]
    monkeypatch.setitem(sys.modules, "scipy", None)  # the table where scipy is not installed
    assert [tables.t_quantile(df) for df in (1, 2, 9, 29)] == pytest.approx(with_scipy[:4], abs=1e-6)
    assert tables.t_quantile(45) == 2.021075 >= with_scipy[4]  # beyond the table: the next df below (wider)


def test_an_instruct_runs_seed_changes_its_order_not_its_examples():
    from qaft.data import InstructDataModule
    from qaft.models import load_tokenizer

    tok = load_tokenizer("tiny-llama")
    modules = [InstructDataModule(tok, source="quiz", batch_size=4, max_length=64, seed=seed) for seed in (0, 1)]
    for dm in modules:
        dm.setup()
    for split in ("train", "validation", "test"):  # the same examples: a seed carves no split of its own
        assert modules[0].raw[split]["instruction"] == modules[1].raw[split]["instruction"]
    orders = [next(iter(dm.train_dataloader()))["input_ids"].tolist() for dm in modules]
    assert orders[0] != orders[1]  # the seed orders them


def test_a_bit_exact_trained_model_is_the_merged_one_only_where_their_first_batch_agrees_bit_for_bit():
    from qaft.evaluation.deployed import ModelForm, _trained_vs_merged
    from qaft.evaluation.perplexity import ItemNLL

    merged = ItemNLL((10.5, 11.25, 9.0), (31, 31, 31))
    same = {ModelForm.MERGED: merged}
    assert _trained_vs_merged(ItemNLL((10.5, 11.25), (31, 31)), same) == {"windows": 2, "bit_equal": True}
    assert same[ModelForm.TRAINED] is merged
    off = {ModelForm.MERGED: merged}  # one window off by one ulp: not the same model, and no ppl_trained
    probe = ItemNLL((10.5, math.nextafter(11.25, 12.0)), (31, 31))
    assert _trained_vs_merged(probe, off) == {"windows": 2, "bit_equal": False}
    assert ModelForm.TRAINED not in off
