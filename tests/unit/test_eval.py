"""Evaluation: qaft's offline lm-eval tasks, perplexity, merged vs training-time models, offline hub errors."""
from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import qaft  # noqa: E402
from qaft.data import lm_eval_windows, quiz_items  # noqa: E402
from qaft.evaluation import LOCAL_TASKS, quiz_mc_docs, run_tasks, write_local_tasks  # noqa: E402
from qaft.evaluation.perplexity import perplexity  # noqa: E402
from qaft.models import load_causal_lm  # noqa: E402

from helpers import tiny_llama, token_batch  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return load_causal_lm("tiny-llama")


def test_quiz_mc_docs_are_heldout_deterministic_four_way():
    docs = quiz_mc_docs()
    heldout: dict[str, list[dict]] = {}
    for item in quiz_items("heldout"):
        heldout.setdefault(item["instruction"], []).append(item)
    train = {i["instruction"] for i in quiz_items("train")}
    assert len(docs) > 300
    assert len({d["question"] for d in docs}) == len(docs)
    for doc in docs:
        items = heldout[doc["question"]]  # only held-out questions, never trained on
        assert doc["question"] not in train
        assert len(doc["choices"]) == 4 == len({c.lower() for c in doc["choices"]})
        assert doc["choices"][doc["gold"]] == items[0]["output"]
        wrong = {c.lower() for i, c in enumerate(doc["choices"]) if i != doc["gold"]}
        assert not wrong & {a.lower() for item in items for a in item["accepted"] + [item["output"]]}
    quiz_mc_docs.cache_clear()
    assert quiz_mc_docs() == docs


def test_task_yamls_hold_absolute_data_paths(tmp_path):
    folder = write_local_tasks(tmp_path / "tasks")
    for name in LOCAL_TASKS:
        text = (folder / f"{name}.yaml").read_text()
        assert "@DATA_DIR@" not in text and str(folder) in text
    assert sum(1 for _ in open(folder / "quiz_mc.jsonl")) == len(quiz_mc_docs())


def test_offline_tasks_run_through_lm_eval(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data files must resolve wherever the evaluation is started
    model, tokenizer = tiny
    out = run_tasks(model, tokenizer, ["quiz_mc"], batch_size=8, max_length=128, model_form="training", limit=16)
    harness = out["harness"]
    assert harness["name"] == "lm-eval" and harness["version"] and harness["model_form"] == "training"
    assert harness["batch_size"] == 8 and harness["max_length"] == 128 and harness["limit"] == 16
    # One chapter is thousands of tokens, each scored against a 49k vocabulary: one document is enough here.
    austen = run_tasks(model, tokenizer, ["austen_ppl"], batch_size=8, max_length=128, limit=1)
    austen = austen["results"]["austen_ppl:0"]
    quiz = out["results"]["quiz_mc:0"]
    assert quiz["shots"] == 0 and quiz["version"] == 1.0
    assert quiz["n_samples"]["original"] == len(quiz_mc_docs()) and quiz["n_samples"]["effective"] == 16
    for metric in ("acc", "acc_norm"):
        assert 0.0 <= quiz["scores"][metric] <= 1.0
    assert austen["n_samples"]["original"] == 10
    assert austen["scores"]["word_perplexity"] > 1 and austen["scores"]["bits_per_byte"] > 0


def test_perplexity_is_exp_of_mean_token_loss(tiny):
    model, tokenizer = tiny
    windows = lm_eval_windows(tokenizer, ["It is a truth universally acknowledged, that a single man " * 8], 32)
    assert windows[-1].numel() < 32  # a short tail window is scored too
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(w.unsqueeze(0)).logits[0, :-1]
            total += F.cross_entropy(logits, w[1:], reduction="sum").item()
            count += w.numel() - 1
    assert perplexity(model, windows, batch_size=3) == pytest.approx(math.exp(total / count), rel=1e-5)


def _trained_l4q(steps: int = 3) -> torch.nn.Module:
    model = qaft.apply_method(tiny_llama(), qaft.config_for("l4q", bits=4, group_size=32, rank=4))
    params = [p for group in qaft.parameter_groups(model).values() for p in group]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for step in range(steps):
        qaft.set_training_step(model, step)
        ids = token_batch(seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_merged_integer_model_has_training_time_perplexity():
    model = _trained_l4q()
    merged = qaft.merge_model(model)
    assert any(isinstance(m, qaft.methods.QuantizedLinear) for m in merged.modules())
    windows = list(token_batch(seed=11, batch=6, length=24))
    assert perplexity(merged, windows) == pytest.approx(perplexity(model, windows), rel=1e-5)


def test_run_folder_merged_model_is_evaluated_into_its_record(tmp_path):
    from hydra import compose, initialize_config_dir

    from qaft.deploy.merged import save_merged
    from qaft.evaluation.app import CONF_DIR, evaluate
    from qaft.evaluation.runs import load_run_model

    base, tokenizer = load_causal_lm("tiny-llama")
    model = qaft.apply_method(base, qaft.config_for("l4q", bits=4, group_size=32, rank=4))
    merged = qaft.merge_model(model)
    save_merged(merged, tmp_path / "merged_model", tokenizer)
    record = {"status": "ok", "model": "tiny-llama", "metrics": {"merged_model_path": "merged_model", "ppl_merged": 1.0}}
    (tmp_path / "record.json").write_text(json.dumps(record))
    loaded, _, _ = load_run_model(tmp_path)
    ids = token_batch(seed=3) + 100
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, merged(ids).logits)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=[f"run_dir={tmp_path}", "tasks=[]", "perplexity.seq_len=64",
                                         "perplexity.max_tokens=256"])
    results = evaluate(cfg)
    updated = json.loads((tmp_path / "record.json").read_text())
    assert updated["metrics"] == record["metrics"]  # nothing already there is lost
    assert updated["eval"]["merged"]["perplexity"]["value"] == pytest.approx(results["perplexity"]["value"])
    assert results["form"] == "merged" and (tmp_path / "eval.json").is_file()


def test_dequantized_once_changes_nothing_but_speed():
    from qaft.evaluation import dequantized_once

    merged = qaft.merge_model(_trained_l4q(steps=1))
    ids = token_batch(seed=4)
    with torch.no_grad():
        before = merged(ids).logits
        with dequantized_once(merged):
            inside = merged(ids).logits
        after = merged(ids).logits
    assert torch.equal(before, inside) and torch.equal(before, after)
    assert all("forward" not in vars(m) for m in merged.modules())  # the per-call forward is back
