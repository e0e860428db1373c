"""Records that cannot lie, round two: what an adversarial user did to a run store, each on a real ``qaft-*``
process (and a real signal where the case is about one). One tiny run is trained once; each case works on a copy
of its folder, in the state the attack leaves (a kill during evaluation leaves the checkpoint and no record)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import _env, run_qaft_train, start_qaft_train, tiny_run_overrides
from qaft.run_folder import RunFolder

STEPS = 4


def args(root: Path, *extra: str) -> list[str]:
    return [*tiny_run_overrides(root, steps=STEPS), "checkpoint.every_n_steps=2", "save_model=true", *extra]


def only_run(root: Path) -> Path:
    (folder,) = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return folder


def qaft(tool: str, *argv: str) -> subprocess.CompletedProcess:
    module = {"eval": "qaft.evaluation.cli", "export": "qaft.deploy.cli", "report": "qaft.reporting.cli"}[tool]
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, env=_env(),
                          timeout=600)


def one_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code and len(lines) == 1, (proc.returncode, proc.stderr[-2000:])
    return lines[0]


def last_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """A refusal found once training has started (after Lightning's own lines): qaft's one line, last."""
    assert proc.returncode == code and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr[-2000:])
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    proc = run_qaft_train(args(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.fixture
def copy(trained: Path, tmp_path: Path) -> Path:
    """A copy of the finished run store; the run folder keeps its name (the identity ignores runs_root)."""
    shutil.copytree(trained, tmp_path / "runs", symlinks=True)
    return tmp_path / "runs"


def killed_during_evaluation(root: Path) -> Path:
    """What a SIGKILL after the last step and before the ok record leaves: checkpoint, metrics, no record."""
    run = only_run(root)
    RunFolder(run).remove_record()
    shutil.rmtree(run / "merged_model")
    return run


@pytest.mark.parametrize("setting", ["trainer.fast_dev_run=true", "+trainer.limit_train_batches=1",
                                     "+trainer.overfit_batches=2"])
def test_settings_that_train_less_than_configured_are_refused(tmp_path, setting):
    line = one_line(run_qaft_train([*args(tmp_path / "runs"), setting]))
    assert setting.split("=")[0].lstrip("+") in line and not (tmp_path / "runs").exists()


def test_a_rerun_with_nothing_left_to_train_records_every_final_metric(trained, copy):
    before = RunFolder(only_run(trained)).record()["metrics"]
    run = killed_during_evaluation(copy)
    proc = run_qaft_train(args(copy))
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = RunFolder(run).record()["metrics"]
    finals = {k for k in before if k.startswith("final_")}
    assert finals >= {"final_train_loss"} and {k: after[k] for k in finals} == {k: before[k] for k in finals}
    assert after["ppl_merged"] == before["ppl_merged"] and after["global_step"] == STEPS


def _edit_checkpoint(run: Path, edit, redigest: bool) -> None:
    from qaft.training.module import checkpoint_digest

    path = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    if redigest:  # as a buggy writer would leave it: whole, but not what this run trains
        ckpt["qaft"]["sha256"] = checkpoint_digest(ckpt)
    torch.save(ckpt, path)


def test_a_checkpoint_missing_a_trained_tensor_is_refused_naming_it(copy):
    run = killed_during_evaluation(copy)
    dropped = []
    _edit_checkpoint(run, lambda c: dropped.append(c["state_dict"].pop(sorted(c["state_dict"])[0])), redigest=True)
    line = last_line(run_qaft_train(args(copy)))
    assert "lacks" in line and "tensor" in line and not RunFolder(run).has_record()


def test_a_checkpoint_edited_in_place_is_refused(copy):
    run = killed_during_evaluation(copy)
    _edit_checkpoint(run, lambda c: next(iter(c["state_dict"].values())).zero_(), redigest=False)
    line = one_line(run_qaft_train(args(copy)))
    assert "cannot be trusted" in line and not RunFolder(run).has_record()


def test_a_garbled_metrics_row_blocks_the_resume_in_one_line(copy):
    run = killed_during_evaluation(copy)
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([rows[0], '{"step": 2, "train/lo', *rows[2:]]) + "\n")
    assert "metrics.jsonl line 2" in one_line(run_qaft_train(args(copy)))
    (run / "metrics.jsonl").write_text("\n".join([rows[0], '{"train/loss": 1.0}', *rows[2:]]) + "\n")
    assert "metrics.jsonl line 2" in one_line(run_qaft_train(args(copy)))


def test_debris_of_killed_writers_is_removed_by_the_next_start(copy):
    run = only_run(copy)
    shutil.copytree(run / "merged_model", run / "..merged_model.pending.tmp-999999")  # a killed model save
    (run / ".record.json.tmp-999999").write_text('{"status": "o')  # a killed qaft-eval
    proc = run_qaft_train(args(copy))
    assert proc.returncode == 0 and "already finished" in proc.stdout, proc.stderr[-2000:]
    assert not [p.name for p in run.iterdir() if ".tmp-" in p.name or p.name.endswith(".pending")]


def test_an_edited_merged_model_or_record_is_not_scored(copy):
    run = only_run(copy)
    weights = run / "merged_model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "changed since the run wrote it" in one_line(qaft("export", str(run), "format=qaft"))
    record = (run / "record.json").read_text()
    (run / "record.json").write_text(record.replace('"steps": 4,', '"steps": 40,'))
    assert "digest" in one_line(qaft("export", str(run), "format=qaft"))


def test_a_merged_model_linked_to_another_run_is_refused(copy, trained):
    run = only_run(copy)
    shutil.rmtree(run / "merged_model")
    os.symlink(only_run(trained) / "merged_model", run / "merged_model")
    assert "symbolic link" in one_line(qaft("export", str(run), "format=qaft"))


def test_save_model_after_a_run_without_it_trains_again(tmp_path):
    root = tmp_path / "runs"
    assert run_qaft_train(args(root, "save_model=false")).returncode == 0
    proc = run_qaft_train(args(root))
    assert proc.returncode == 0 and "already finished" not in proc.stdout, proc.stderr[-2000:]
    assert (only_run(root) / "merged_model").is_dir()


def test_a_signal_after_the_ok_record_does_not_downgrade_it(tmp_path):
    root = tmp_path / "runs"
    proc = start_qaft_train(args(root))
    record = None
    while proc.poll() is None:  # SIGTERM as soon as the ok record is there (while the final table prints)
        found = list(root.glob("*/record.json")) if root.is_dir() else []
        if found and '"ok"' in found[0].read_text():
            proc.send_signal(signal.SIGTERM)
            record = found[0]
            break
    proc.communicate(timeout=300)
    record = record or next(root.glob("*/record.json"))
    assert RunFolder(record.parent).record()["status"] == "ok"


def test_qaft_report_marks_ill_typed_records_and_configs_corrupt(copy, tmp_path):
    good = only_run(copy)
    bad = {"metrics_list": ('{"status": "ok", "metrics": [1]}', None), "garbled": (None, "method: [unclosed"),
           "list_config": (None, "- 1\n- 2\n")}
    for name, (record, config) in bad.items():
        folder = copy / name
        folder.mkdir()
        if record is not None:
            (folder / "record.json").write_text(record)
        if config is not None:
            (folder / "config.yaml").write_text(config)
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: t\nrows: [method]\ncolumns: {ppl: metrics.deployed}\n")
    proc = qaft("report", f"spec={spec}", f"runs={copy}", f"out={tmp_path / 'out'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(name in proc.stderr for name in bad) and "Traceback" not in proc.stderr
    table = (tmp_path / "out" / "t.csv").read_text()
    assert "l4q" in table and good.exists()


def test_a_bad_safetensors_header_is_one_line_naming_the_tensor(tmp_path):
    """A packed folder whose header declares a float32 scale as I32 (same bytes): refused, not run."""
    from helpers import tiny_llama

    import qaft
    from qaft.deploy import load_quantized, save_quantized
    from qaft.deploy.packed import TensorMismatch

    merged = qaft.merge_model(qaft.apply_method(tiny_llama(), qaft.config_for("ptq", bits=4, group_size=32)))
    folder = save_quantized(merged, tmp_path / "packed")
    weights = folder / "model.safetensors"
    raw = weights.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    name = next(k for k in header if k.endswith(".scale"))
    header[name]["dtype"] = "I32"
    text = json.dumps(header, separators=(",", ":")).encode().ljust(size)
    weights.write_bytes(raw[:8] + text + raw[8 + size:])
    with pytest.raises(TensorMismatch, match=name.replace(".", r"\.")):
        load_quantized(folder)

