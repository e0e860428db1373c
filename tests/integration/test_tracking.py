"""What a run tells the world besides its folder, on real processes: progress lines on a piped stdout (training,
perplexity, GPTQ, lm-eval), and, with ``logger=wandb`` (offline), a wandb run that reads back as the run's record,
whatever its status, so that a table comes out the same from wandb as from the run folders."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from qaft.reporting.tables import build_table, load_runs, load_wandb_runs
from qaft.reporting.wandb_runs import local_records

from helpers import run_qaft_train, tiny_run_overrides

SPEC = {"name": "tracked", "rows": ["method"], "expect": {"method": ["l4q", "lora"]},
        "columns": {"merged": "metrics.ppl_merged", "ptq+gptq": "metrics.ppl_ptq_gptq",
                    "quiz": {"keys": "metrics.lm_eval.results.quiz_mc:0.scores.acc", "factor": 100}}}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> dict:
    """An ok L4Q run with GPTQ and lm-eval at the end, and a sweep of two diverging LoRA runs in one process,
    all with ``logger=wandb`` offline and stdout piped (``capture_output``), as a SLURM job writes a file."""
    tmp = tmp_path_factory.mktemp("tracked")
    root = tmp / "runs"
    with pytest.MonkeyPatch.context() as env:
        for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            env.setenv(name, str(tmp / name.lower()))
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        ok = run_qaft_train([*tiny_run_overrides(root, steps=6), "logger=wandb", "progress.every_n_steps=2",
                             "eval.baselines=true", "eval.gptq=true", "eval.gptq_options.calib_batches=2",
                             "eval.tasks=[quiz_mc]", "eval.lm_eval.limit=4"])
        diverged = run_qaft_train(["-m", *tiny_run_overrides(root, steps=4), "logger=wandb", "method=lora",
                                   "optim.warmup_steps=0", "optim.lr.lora=1e30,1e31"])
    return {"root": root, "ok": ok, "diverged": diverged}


def _folders(root: Path, method: str) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.name.startswith(f"{method}-"))


def test_training_and_evaluation_print_progress_lines_when_piped(tracked):
    proc = tracked["ok"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = re.findall(r"^train: step (\d+)/6, loss [\d.]+, \d+ tokens/s, \d+s, ETA \d+s$", proc.stdout, re.M)
    assert steps == ["1", "2", "4", "6"], proc.stdout  # every 2 steps, and the first
    # L4Q's merge is bit-exact: its trained model is scored on the first batch, to compare with the merged one
    for phase in ("perplexity [trained, first batch]", "perplexity [merged]", "perplexity [ptq_gptq]", "GPTQ w4 g64",
                  "lm-eval loglikelihood"):
        assert f"{phase}: started" in proc.stdout and f"{phase}: done" in proc.stdout, (phase, proc.stdout)
    assert re.search(r"^GPTQ w4 g64: done, 2/2 blocks in \d+s$", proc.stdout, re.M)  # tiny-llama: two blocks
    assert "lm-eval: quiz_mc at 0 shots, limit 4" in proc.stdout
    assert "\r" not in proc.stdout  # no progress bar redrawn in a file


def test_an_offline_wandb_run_reads_back_as_the_run_record(tracked):
    (run_dir,) = _folders(tracked["root"], "l4q")
    record = json.loads((run_dir / "record.json").read_text())
    (files,) = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    (tracked_record,) = local_records(files.parent)
    assert tracked_record["status"] == "ok" and tracked_record["run_dir"] == run_dir.name
    assert tracked_record["metrics"] == record["metrics"]  # every perplexity and the nested lm-eval results
    assert tracked_record["metrics"]["lm_eval"]["results"]["quiz_mc:0"]["scores"]["acc"] >= 0
    assert tracked_record["config"] == yaml.safe_load((run_dir / "config.yaml").read_text())  # resolved config
    for key in ("method", "bits", "group_size", "seed", "model", "data", "identity", "timings", "finished"):
        assert tracked_record[key] == record[key], key


def test_each_run_of_a_sweep_is_its_own_wandb_run_with_its_true_status(tracked):
    assert tracked["diverged"].returncode != 0
    folders = _folders(tracked["root"], "lora")
    assert len(folders) == 2
    for run_dir in folders:
        record = json.loads((run_dir / "record.json").read_text())
        (files,) = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
        (tracked_record,) = local_records(files.parent)
        assert tracked_record["run_dir"] == run_dir.name and tracked_record["status"] == "diverged"
        assert tracked_record["error"] == record["error"] and "non-finite loss" in record["error"]


def test_a_table_from_wandb_equals_the_table_from_the_run_folders(tracked):
    from_folders = build_table(load_runs(tracked["root"]), SPEC)
    from_wandb = build_table(load_wandb_runs(tracked["root"]), SPEC)
    assert from_wandb.equals(from_folders), (from_wandb, from_folders)
    cells = from_folders.set_index("method")
    assert cells.loc["lora", "merged"] == "diverged" and cells.loc["l4q", "merged"] != "diverged"
    assert len(load_runs(tracked["root"])) == 3  # wandb's own files inside the run folders are no runs
