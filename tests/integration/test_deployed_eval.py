"""The deployed model of a float-merged run: ``qaft-eval run_dir=...`` scores the run's +PTQ model (and says so), and
``lm_eval --model hf`` on its ``qaft-export format=hf`` folder, and on an integer run's ``format=compressed-tensors``
export, scores what ``qaft-eval`` scores."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import qaft
from qaft.deploy.cli import main as export_main
from qaft.evaluation.tasks import write_local_tasks
from qaft.models import load_causal_lm

from helpers import ASSERT_NO_QAFT, fake_run_folder, move_trainables, plain_python

LIMIT = 40  # quiz_mc documents: enough for a score that random weights would not match by chance
# ``python -m lm_eval`` that fails if anything it ran imported qaft (the export must stand on its own).
LM_EVAL_WITHOUT_QAFT = """
import runpy, sys
sys.argv = ["lm_eval", *sys.argv[1:]]
try:
    runpy.run_module("lm_eval", run_name="__main__", alter_sys=True)
finally:
    """ + ASSERT_NO_QAFT


def _evaluate(run_dir, *overrides):
    from hydra import compose, initialize_config_dir

    from qaft.evaluation.app import CONF_DIR, evaluate

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=[f"run_dir={run_dir}", "perplexity.seq_len=64", "perplexity.max_tokens=256",
                                         "model.dtype=float32", *overrides])
    return evaluate(cfg)


def _lm_eval_quiz(folder, tmp_path) -> dict:
    """``lm_eval --model hf`` 's quiz_mc scores of an exported folder, in a process without qaft on its path."""
    done = plain_python(
        "-c", LM_EVAL_WITHOUT_QAFT, "--model", "hf", "--model_args", f"pretrained={folder}", "--tasks", "quiz_mc",
        "--include_path", str(write_local_tasks(tmp_path / "tasks")), "--limit", str(LIMIT), "--batch_size", "1",
        "--output_path", str(tmp_path / "out"), timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["quiz_mc"]


@pytest.fixture
def float_run(tmp_path):
    """A LoRA run folder (a float merge, deployed by RTN at w4 g32) and its merged model."""
    base, _ = load_causal_lm("tiny-llama")
    model = qaft.apply_method(base, qaft.config_for("lora", rank=4))
    for name, p in model.named_parameters():  # a trained adapter: B != 0, so the merge moves the weights
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(0))
    merged = qaft.merge_model(model)
    run_dir = tmp_path / "run"
    fake_run_folder(run_dir, merged)
    record = json.loads((run_dir / "record.json").read_text())
    (run_dir / "record.json").write_text(json.dumps({**record, "model": "tiny-llama", "bits": 4, "group_size": 32}))
    return run_dir, merged


def test_qaft_eval_scores_the_runs_deployed_ptq_model(float_run):
    from qaft.evaluation.perplexity import perplexity

    run_dir, merged = float_run
    results = _evaluate(run_dir, "tasks=[]")
    assert results["form"] == "merged+ptq"
    assert results["ptq"] == {"algorithm": "rtn", "init": "minmax", "zero_point": "float", "bits": 4, "group_size": 32}
    windows = [torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    deployed = qaft.ptq_model(copy.deepcopy(merged), 4, 32)
    from qaft.evaluation.runs import load_deployed

    rebuilt, _, _, form = load_deployed(run_dir)
    assert form["form"] == "merged+ptq"
    assert perplexity(rebuilt, windows) == pytest.approx(perplexity(deployed, windows), rel=1e-6)
    assert perplexity(rebuilt, windows) != pytest.approx(perplexity(merged, windows), rel=1e-6)
    updated = json.loads((run_dir / "record.json").read_text())
    assert updated["eval"]["merged+ptq"]["form"] == "merged+ptq"  # keyed and labelled by the form scored


def test_lm_eval_hf_on_the_export_scores_what_qaft_eval_scores(float_run, tmp_path):
    run_dir, _ = float_run
    ours = _evaluate(run_dir, "tasks=[quiz_mc]", f"lm_eval.limit={LIMIT}", "lm_eval.batch_size=1",
                     "perplexity.source=null")
    assert ours["lm_eval"]["harness"]["model_form"] == "merged+ptq"
    assert export_main([str(run_dir), "format=hf", f"out={tmp_path / 'hf'}"]) == 0
    scores = _lm_eval_quiz(tmp_path / "hf", tmp_path)
    assert scores["acc,none"] == pytest.approx(ours["headline"]["quiz_mc:0/acc"], abs=1e-9)
    assert scores["acc_norm,none"] == pytest.approx(ours["headline"]["quiz_mc:0/acc_norm"], abs=1e-9)


def test_lm_eval_hf_on_the_compressed_tensors_export_scores_what_qaft_eval_scores(tmp_path):
    """An integer run on the integer zero point (exact in compressed-tensors): lm-eval on the export, in a process
    that never imports qaft, scores quiz_mc as ``qaft-eval run_dir=`` scores the run's merged model."""
    base, _ = load_causal_lm("tiny-llama")
    model = qaft.apply_method(base, qaft.config_for("l4q", rank=4, bits=4, group_size=32, zero_point="int"))
    run_dir = tmp_path / "run"
    fake_run_folder(run_dir, qaft.merge_model(move_trainables(model)).eval())
    ours = _evaluate(run_dir, "tasks=[quiz_mc]", f"lm_eval.limit={LIMIT}", "lm_eval.batch_size=1",
                     "perplexity.source=null")
    assert ours["lm_eval"]["harness"]["model_form"] == "merged"
    assert export_main([str(run_dir), "format=compressed-tensors"]) == 0
    folder = run_dir / "export_ct"
    assert json.loads((folder / "qaft_export.json").read_text())["exact"]
    scores = _lm_eval_quiz(folder, tmp_path)
    assert scores["acc,none"] == pytest.approx(ours["headline"]["quiz_mc:0/acc"], abs=1e-9)
    assert scores["acc_norm,none"] == pytest.approx(ours["headline"]["quiz_mc:0/acc_norm"], abs=1e-9)
