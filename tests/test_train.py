"""qaft-train end to end on the tiny model: every method, bad configs, resume, sweeps, the real model (slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_qaft_train, tiny_run_overrides
from qaft.methods import available


def run_main(overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``qaft-train OVERRIDES`` in this process (saves the seconds a fresh interpreter spends importing)."""
    from qaft.train import main

    monkeypatch.setattr(sys, "argv", ["qaft-train", *overrides])
    main()


def records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("record.json"))]


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]




@pytest.mark.parametrize("method", available())
def test_every_method_fast_dev_run(method, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    run_main([*tiny_run_overrides(root), f"method={method}", "trainer.fast_dev_run=true", "save_model=true"], monkeypatch)
    (record,) = records(root)
    assert record["status"] == "ok" and record["method"] == method
    assert (record["bits"], record["group_size"], record["model"], record["data"]) == (4, 64, "tiny-llama", "austen")
    run_dir = Path(record["run_dir"])
    assert run_dir.name.startswith(f"{method}-w4g64") and "-s0-tiny-llama-austen" in run_dir.name
    assert (run_dir / "config.yaml").is_file() and Path(record["metrics"]["merged_model_path"]).exists()
    ppl = record["metrics"]
    if method != "ptq":
        assert ppl["global_step"] == 1 and metric_rows(run_dir)[0]["step"] == 1
    if "ppl_merged_ptq" not in ppl:  # integer methods: the deployed model is the trained one
        assert ppl["ppl_merged"] == pytest.approx(ppl["ppl_trained"], rel=1e-3)


BAD = {
    "unknown method (group option)": ["method=nope"],
    "unknown method (name)": ["method.name=nope"],
    "bits 5": ["method.bits=5"],
    "group size not dividing the widths": ["method.group_size=48"],
    "missing model path": ["model=hf", "model.name_or_path=/no/such/model"],
    "unknown schedule": ["optim.schedule=linear"],
    "missing data file": ["data=json", "data.source=/no/such/data.jsonl"],
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_config_fails_fast_with_one_message_and_no_record(name, tmp_path, monkeypatch, capsys):
    root = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_info:
        run_main(["model=tiny-llama", f"runs_root={root}", *BAD[name]], monkeypatch)
    assert exit_info.value.code not in (0, None)
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "GPU available" not in out.out + out.err  # no Trainer, no model
    assert "qaft-train: invalid config" in out.err or "Could not find 'method/nope'" in out.err, out.err
    assert not root.exists() or not any(root.iterdir()), list(root.rglob("*"))


def test_bad_config_exit_status_from_the_console_script(tmp_path):
    root = tmp_path / "runs"
    proc = subprocess.run(["qaft-train", "model=tiny-llama", f"runs_root={root}", "method.bits=5"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    message = [line for line in proc.stderr.splitlines() if line.startswith("qaft-train:")]
    assert message == ["qaft-train: invalid config: bits must be one of (2, 3, 4, 8), got 5"], proc.stderr
    assert "Traceback" not in proc.stderr and not root.exists()


def test_resume_after_a_kill_ends_with_the_same_metrics(tmp_path, monkeypatch):
    steps = ["trainer.max_steps=6", "checkpoint.every_n_steps=2", "method.warmup_steps=3"]
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    run_main([*tiny_run_overrides(clean), *steps], monkeypatch)
    killed = run_qaft_train([*tiny_run_overrides(resumed), *steps, "debug.crash_after_steps=4"])
    assert killed.returncode != 0 and not records(resumed), killed.stderr[-2000:]
    (run_dir,) = [p.parent.parent for p in resumed.rglob("last.ckpt")]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    # small: only what trains (A, B, s, b of each layer) is in it, never the frozen base weights
    assert all(k.rsplit(".", 1)[-1] in {"lora_A", "lora_B", "scale", "offset"} for k in ckpt["state_dict"])
    run_main([*tiny_run_overrides(resumed), *steps], monkeypatch)
    (a,), (b,) = records(clean), records(resumed)
    assert a["status"] == b["status"] == "ok"
    for key in ("final_train_loss", "ppl_trained", "ppl_merged", "global_step"):
        assert b["metrics"][key] == pytest.approx(a["metrics"][key], rel=1e-6, abs=1e-7), key
    rows_a, rows_b = (metric_rows(Path(d["run_dir"])) for d in (a, b))
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a] == [1, 2, 3, 4, 5, 6]
    assert [r["train/loss"] for r in rows_b] == pytest.approx([r["train/loss"] for r in rows_a], rel=1e-6)


def test_sweep_names_each_run_from_its_config(tmp_path):
    root = tmp_path / "runs"
    proc = run_qaft_train(["-m", *tiny_run_overrides(root), "trainer.fast_dev_run=true", "method.bits=4,3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(Path(r["run_dir"]).name for r in records(root))
    assert len(names) == 2 and names[0].startswith("l4q-w3g64-r16-s0") and names[1].startswith("l4q-w4g64-r16-s0")


@pytest.mark.slow
def test_real_smollm2_trains_a_few_steps(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    run_main([f"runs_root={root}", "trainer.max_steps=3", "trainer.enable_progress_bar=false",
              "data.datamodule.max_train_tokens=8192", "eval.max_tokens=1024", "save_model=false"], monkeypatch)
    (record,) = records(root)
    m = record["metrics"]
    assert record["status"] == "ok" and m["global_step"] == 3
    assert m["ppl_float"] < m["ppl_ptq"] and m["ppl_merged"] == pytest.approx(m["ppl_trained"], rel=1e-3)


def test_end_of_run_lm_eval_on_the_merged_model(tmp_path, monkeypatch):
    """eval.tasks runs lm-eval on the deployed model at the end of a run and records the harness settings."""
    root = tmp_path / "runs"
    run_main([*tiny_run_overrides(root), "method=l4q", "trainer.fast_dev_run=true",
              "eval.tasks=[quiz_mc]", "eval.lm_eval.limit=4", "eval.lm_eval.batch_size=4"], monkeypatch)
    (record,) = records(root)
    result = record["metrics"]["lm_eval"]
    assert result["harness"]["model_form"] == "merged" and result["harness"]["limit"] == 4
    (entry,) = result["results"].values()
    assert 0.0 <= entry["scores"]["acc"] <= 1.0
