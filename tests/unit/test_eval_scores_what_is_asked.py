"""``qaft-eval`` scores what it is asked to: tasks alone score no perplexity (the perplexity is asked for with
``perplexity.enabled=true``, or by giving no tasks); a perplexity is shown with its windows and token count; a
run's packed merged model loads without transformers' warning about the stub ``config.json``; lm-eval's progress
ends with the true count of requests."""
from __future__ import annotations

import json
import logging
import re

import pytest
import torch

import qaft
from qaft import progress
from qaft.models import load_causal_lm


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory):
    """A run folder as qaft-train leaves it: an integer merge, saved packed with its tokenizer."""
    from qaft.deploy.merged import save_merged

    base, tokenizer = load_causal_lm("tiny-llama")
    merged = qaft.merge_model(qaft.apply_method(base, qaft.config_for("l4q", bits=4, group_size=32)))
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    run_dir.mkdir()
    save_merged(merged, run_dir / "merged_model", tokenizer)
    (run_dir / "config.yaml").write_text("model: {name_or_path: tiny-llama}\n")
    (run_dir / "record.json").write_text(json.dumps({"status": "ok", "model": "tiny-llama", "bits": 4, "group_size": 32,
                                                     "metrics": {"merged_model_path": "merged_model"}}))
    return run_dir


def _cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    from qaft.evaluation.app import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("eval", overrides=["perplexity.seq_len=32", "perplexity.max_tokens=128", "model.dtype=float32",
                                          *overrides])


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_tasks_alone_score_no_perplexity_and_the_request_count_is_true(packed_run, capsys):
    from qaft.evaluation.app import evaluate, summary

    kept = _Kept()
    logger = logging.getLogger("transformers.configuration_utils")
    logger.addHandler(kept)
    try:
        with progress.reporting(True, 0):
            results = evaluate(_cfg(f"run_dir={packed_run}", "tasks=[quiz_mc]", "lm_eval.limit=4",
                                    "lm_eval.batch_size=4"))
    finally:
        logger.removeHandler(kept)
    assert "perplexity" not in results and results["headline"]
    assert not [m for m in kept.messages if "qaft-packed" in m]  # the tokenizer is read with the real config
    done = [line for line in capsys.readouterr().out.splitlines() if re.match(r"lm-eval \w+: done", line)]
    assert done and all(re.search(r"done, (\d+)/\1 requests", line) for line in done), done
    assert "perplexity" not in "\n".join(summary(results))


def test_a_perplexity_is_shown_with_its_windows_and_nothing_asked_is_refused(packed_run, tmp_path):
    from qaft.evaluation.app import evaluate, summary

    results = evaluate(_cfg("model=tiny-llama", "tasks=[]", f"output={tmp_path / 'eval.json'}"))
    p = results["perplexity"]
    assert (p["seq_len"], p["tokens"]) == (32, 128) and torch.isfinite(torch.tensor(p["value"]))
    assert summary(results)[1] == f"  perplexity: {p['value']:.4f} (austen test, 32-token windows, 128 tokens)"
    with pytest.raises(ValueError, match="nothing to score"):
        evaluate(_cfg(f"run_dir={packed_run}", "tasks=[]", "perplexity.enabled=false",
                      f"output={tmp_path / 'none.json'}"))
    assert not (tmp_path / "none.json").exists()


def test_bf16_scoring_is_recorded_close_to_float32_and_another_precision_is_refused(tmp_path):
    from qaft.evaluation.app import evaluate

    plain = evaluate(_cfg("model=tiny-llama", "tasks=[]", f"output={tmp_path / 'fp32.json'}"))
    bf16 = evaluate(_cfg("model=tiny-llama", "tasks=[]", "autocast=bf16", f"output={tmp_path / 'bf16.json'}"))
    assert "autocast" not in plain and bf16["autocast"] == "bf16"
    assert bf16["perplexity"]["value"] == pytest.approx(plain["perplexity"]["value"], rel=1e-2)
    with pytest.raises(ValueError, match=r"^autocast='fp16' must be null \(float32\) or bf16$"):
        evaluate(_cfg("model=tiny-llama", "tasks=[]", "autocast=fp16", f"output={tmp_path / 'no.json'}"))
    assert not (tmp_path / "no.json").exists()
