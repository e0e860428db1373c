"""What a run record promises, tested on real processes: exact resume after SIGKILL at several points, SIGTERM
and SIGINT as resumable interruptions, a kill in the middle of a checkpoint write, identity from the whole
config, divergence recorded as such, one process per run folder, and nothing read from a run folder that can
run code."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, run_qaft_train, signal_at_step, start_qaft_train, tiny_run_overrides, wait_for

STEPS = 12
# L4Q with a LoRA warm-up (a phase change at step 6) and LoRA dropout during it (the RNG must resume too).
SCHEDULE = [f"trainer.max_steps={STEPS}", "checkpoint.every_n_steps=5", "method.warmup_steps=6",
            "method.dropout=0.1", "save_model=true"]


def args(root: Path, *extra: str) -> list[str]:
    return [*tiny_run_overrides(root, steps=STEPS), *SCHEDULE, *extra]


def only_run(root: Path) -> Path:
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    return folder


def strict_json(path: Path) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{path} holds bare {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"], r["lr/lora"]) for r in rows]


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical: every trained and deployed tensor, every logged loss, every final metric."""
    ra, rb = strict_json(a / "record.json"), strict_json(b / "record.json")
    assert rb["status"] == "ok" and rb["metrics"]["global_step"] == STEPS
    assert losses(b) == losses(a) and [s for s, _, _ in losses(b)] == list(range(1, STEPS + 1))
    for key in ("final_train_loss", "ppl_trained", "ppl_merged"):
        assert rb["metrics"][key] == ra["metrics"][key], key
    ta, tb = load_file(a / "merged_model" / "model.safetensors"), load_file(b / "merged_model" / "model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    proc = run_qaft_train(args(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return only_run(root)


# 3: before the first checkpoint; 7: checkpoint 5 (below half the run, not dividing the 7 steps left: Lightning's
# own resume ended such runs early); 11: checkpoint 10, after the phase change.
@pytest.mark.parametrize("kill_at", [3, 7, 11])
def test_sigkill_then_rerun_is_bit_identical_to_an_uninterrupted_run(kill_at, clean, tmp_path):
    root = tmp_path / "runs"
    killed = signal_at_step(args(root), kill_at, signal.SIGKILL, tmp_path / "paused")
    assert killed.returncode == -signal.SIGKILL
    run_dir = only_run(root)
    assert not (run_dir / "record.json").exists()
    assert run_dir.name == clean.name  # the probe callback is not part of the run's identity
    rerun = run_qaft_train(args(root))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_run(clean, run_dir)


def test_sigterm_checkpoints_at_the_step_and_resumes_exactly(clean, tmp_path):
    root = tmp_path / "runs"
    # the signal arrives while step 8 waits to start: step 8 finishes, is checkpointed, and the run stops
    stopped = signal_at_step(args(root), 7, signal.SIGTERM, tmp_path / "paused", pause=3.0)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    run_dir = only_run(root)
    record = strict_json(run_dir / "record.json")
    assert record["status"] == "interrupted" and "SIGTERM at step 8" in record["error"]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    assert [line for line in stopped.stderr.splitlines() if line.startswith("qaft-train: interrupted")] == [
        "qaft-train: interrupted by SIGTERM at step 8; rerun the same command to resume"]
    rerun = run_qaft_train(args(root))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_run(clean, run_dir)
    # the record's timings are the resuming process's, and it says so; an uninterrupted run's say nothing
    assert strict_json(run_dir / "record.json")["timings"]["resumed_at_step"] == 8
    assert "resumed_at_step" not in strict_json(clean / "record.json")["timings"]


def test_sigint_is_an_interruption_not_a_traceback(tmp_path):
    root = tmp_path / "runs"
    stopped = signal_at_step(tiny_run_overrides(root, steps=4), 2, signal.SIGINT, tmp_path / "paused", pause=2.0)
    assert stopped.returncode == 128 + signal.SIGINT
    assert "Traceback" not in stopped.stderr and "SystemExit" not in stopped.stderr, stopped.stderr[-2000:]
    assert strict_json(only_run(root) / "record.json")["status"] == "interrupted"


def test_a_kill_during_a_checkpoint_write_keeps_the_last_checkpoint_and_leaves_no_debris(clean, tmp_path):
    root, tmp = tmp_path / "runs", tmp_path / "system_tmp"
    tmp.mkdir()
    marker = tmp_path / "writing"
    heavy = f"+callbacks.heavy={{_target_: run_probes.HeavyCheckpoint, mb: 768, marker: '{marker}', from_step: 10}}"
    os.environ["TMPDIR"] = str(tmp)  # inherited by the child: anything written to the system temp folder lands here
    try:
        proc = start_qaft_train([*args(root), heavy])
        wait_for(marker, proc)
        ckpt_dir = only_run(root) / "checkpoints"
        partial = []
        while proc.poll() is None and not partial:
            partial = [p for p in ckpt_dir.iterdir() if p.name != "last.ckpt"]
        proc.kill()
        proc.communicate()
    finally:
        del os.environ["TMPDIR"]
    assert partial and partial[0].name.startswith(".last.ckpt.tmp-"), partial
    assert not [p for p in tmp.iterdir() if p.is_file()]  # (torch.compile's cache folder may be there)
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 5  # the previous one, whole
    rerun = run_qaft_train(args(root))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert [p.name for p in ckpt_dir.iterdir()] == ["last.ckpt"]  # the killed writer's file is gone
    assert_same_run(clean, only_run(root))


def test_identity_covers_the_data_and_resume_refuses_another_config(tmp_path):
    files = {}
    for name, text in (("a", "Hello there, said the cat."), ("b", "Goodbye now, said the dog.")):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"instruction": f"{text} {i}", "input": "", "output": text}) + "\n"
                                       for i in range(40)))
    root = tmp_path / "runs"
    common = ["model=tiny-llama", f"runs_root={root}", "trainer.max_steps=3", "trainer.accelerator=cpu",
              "trainer.enable_progress_bar=false", "data=json", "data.datamodule.max_length=48",
              "data.datamodule.batch_size=2", "data.datamodule.max_eval_samples=8", "eval.max_batches=2",
              "eval.baselines=false", "save_model=false", "optim.warmup_steps=1"]
    for name in ("a", "b"):
        proc = run_qaft_train([*common, f"data.source={files[name]}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    assert len(folders) == 2  # same command, other data: another run
    records = [strict_json(f / "record.json") for f in folders]
    assert all(r["status"] == "ok" and r["metrics"]["global_step"] == 3 for r in records)
    # the same file edited is other data too
    files["a"].write_text(files["a"].read_text().replace("cat", "owl"))
    ckpt = folders[0] / "checkpoints" / "last.ckpt"
    refused = run_qaft_train([*common, f"data.source={files['b']}", f"resume='{ckpt}'", "trainer.max_steps=4"])
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.startswith("qaft-train:")]
    assert len(lines) == 1 and "another config" in lines[0] and "trainer.max_steps: 3 -> 4" in lines[0], lines
    assert ckpt.is_file() and len([p for p in root.iterdir() if p.is_dir()]) == 2  # the refusal left nothing
    rerun_a = run_qaft_train([*common, f"data.source={files['a']}"])
    assert rerun_a.returncode == 0
    assert len([p for p in root.iterdir() if p.is_dir()]) == 3


def test_a_finished_run_is_not_run_again(tmp_path):
    root = tmp_path / "runs"
    first = run_qaft_train(tiny_run_overrides(root, steps=2))
    assert first.returncode == 0, first.stderr[-3000:]
    record = (only_run(root) / "record.json").read_text()
    again = run_qaft_train([*tiny_run_overrides(root, steps=2), "logger=wandb", "logger.mode=offline"])
    assert again.returncode == 0 and "already finished" in again.stdout
    assert (only_run(root) / "record.json").read_text() == record
    assert not (only_run(root) / "wandb").exists()  # no wandb run started, so none resumed or overwritten


def assert_diverged(proc, run_dir: Path, reason: str) -> None:
    assert proc.returncode == 3, proc.stderr[-3000:]
    record = strict_json(run_dir / "record.json")
    assert record["status"] == "diverged" and reason in record["error"], record["error"]
    assert not (run_dir / "merged_model").exists()
    lines = [line for line in proc.stderr.splitlines() if line.startswith("qaft-train:")]
    assert len(lines) == 1 and "diverged" in lines[0] and reason in lines[0]
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists():  # the last checkpoint is the last sound state
        state = torch.load(last, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values())
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))


def test_a_non_finite_loss_is_recorded_as_diverged(tmp_path):
    root = tmp_path / "runs"
    proc = run_qaft_train([*tiny_run_overrides(root, steps=6), "method=lora", "checkpoint.every_n_steps=1",
                           "optim.lr.lora=1e30", "optim.warmup_steps=0", "save_model=true"])
    assert_diverged(proc, only_run(root), "non-finite loss (nan) at step 2")


@pytest.mark.slow
def test_a_loss_worse_than_a_uniform_guess_is_divergence_on_the_real_model(tmp_path):
    """lr 1e6 drives SmolLM2's loss from 4 to about 22 (ln 49152 = 10.8) while every number stays finite."""
    root = tmp_path / "runs"
    proc = run_qaft_train([f"runs_root={root}", "trainer.max_steps=3", "trainer.enable_progress_bar=false",
                           "data.datamodule.seq_len=64", "data.datamodule.batch_size=2",
                           "data.datamodule.max_train_tokens=4096", "eval.max_tokens=256", "eval.baselines=false",
                           "optim.warmup_steps=0", "optim.lr.lora=1e6"])
    assert_diverged(proc, only_run(root), "(worse than a uniform guess)")


def test_two_identical_runs_do_not_share_a_folder_at_once(tmp_path):
    root = tmp_path / "runs"
    marker, release = tmp_path / "paused", tmp_path / "go"
    probe = (f"+callbacks.pause={{_target_: run_probes.PauseAt, step: 1, marker: '{marker}', seconds: 300, "
             f"release: '{release}'}}")
    first = start_qaft_train([*tiny_run_overrides(root, steps=3), probe])
    wait_for(marker, first)
    files = {p: p.read_bytes() for p in only_run(root).rglob("*") if p.is_file()}
    second = run_qaft_train(tiny_run_overrides(root, steps=3))
    assert second.returncode == 4
    lines = [line for line in second.stderr.splitlines() if line.startswith("qaft-train:")]
    assert len(lines) == 1 and "in use by process" in lines[0], second.stderr[-2000:]
    # the refused process changed nothing there (its other command line once rewrote Hydra's .hydra/overrides.yaml)
    assert {p: p.read_bytes() for p in only_run(root).rglob("*") if p.is_file()} == files
    release.write_text("")
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert strict_json(only_run(root) / "record.json")["metrics"]["global_step"] == 3


class _Payload:
    """Unpickling this creates a file: the proof that a load ran code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_planted_pickles_in_a_run_folder_never_run(tmp_path):
    from qaft.deploy.cli import main as export
    from qaft.evaluation.runs import load_run_model

    root = tmp_path / "runs"
    proc = run_qaft_train([*tiny_run_overrides(root, steps=2), "checkpoint.every_n_steps=1", "save_model=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir, pwned = only_run(root), tmp_path / "pwned"
    # a resumable run with a planted checkpoint: resume refuses to unpickle it
    (run_dir / "record.json").unlink()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(pickle.dumps({"global_step": _Payload(pwned)}))
    resumed = run_qaft_train([*tiny_run_overrides(root, steps=2), "checkpoint.every_n_steps=1"])
    assert resumed.returncode != 0 and not pwned.exists()
    # a finished run whose merged model was swapped for a pickle: eval and export never read it
    shutil.rmtree(run_dir / "merged_model")
    (run_dir / "merged_model.pt").write_bytes(pickle.dumps(_Payload(pwned)))
    (run_dir / "record.json").write_text(json.dumps({"status": "ok", "model": "tiny-llama",
                                                     "metrics": {"merged_model_path": "merged_model.pt"}}))
    with pytest.raises(ValueError, match="pickle"):
        load_run_model(run_dir)
    assert export([str(run_dir), "format=qaft"]) == 2 and not pwned.exists()


def test_no_unsafe_loads_in_the_package():
    # Lightning's save_checkpoint(weights_only=False) means "the whole training state", and writes: only loads count
    unsafe = re.compile(r"load(?:_checkpoint)?\([^)]*weights_only=False|pickle\.loads?\(")
    package = ROOT / "qaft"
    for path in package.rglob("*.py"):
        assert not unsafe.search(path.read_text()), path


def test_a_moved_run_folder_is_scored_with_its_own_model(tmp_path):
    from qaft.evaluation.runs import load_run_model

    root = tmp_path / "runs"
    proc = run_qaft_train([*tiny_run_overrides(root, steps=2), "save_model=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    moved = tmp_path / "elsewhere"
    shutil.move(str(only_run(root)), moved)
    model, _, record = load_run_model(moved)
    assert record["metrics"]["merged_model_path"] == "merged_model" and not any(root.iterdir())
    ids = torch.randint(0, 1000, (1, 8))
    from qaft.deploy.merged import load_merged

    assert torch.equal(model(ids).logits, load_merged(moved / "merged_model")(ids).logits)
