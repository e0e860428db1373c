"""The run folder has one owner (qaft.run_folder): its file names and statuses are spelled nowhere else in qaft, and
its readers refuse what is ill-typed, linked or cut short instead of guessing."""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

import qaft
from qaft import run_folder
from qaft.run_folder import CorruptRun, RunFolder, Status

PACKAGE = Path(qaft.__file__).parent
OWNED = {run_folder.RECORD_FILE, run_folder.CONFIG_FILE, run_folder.METRICS_FILE, run_folder.MERGED_MODEL,
         run_folder.CHECKPOINTS, run_folder.LAST_CHECKPOINT, run_folder.LOCK_FILE, run_folder.EVAL_FILE,
         *(s.value for s in Status)}
# (file, literal): the same word meaning something else
ALLOWED = {("reporting/wandb_runs.py", "failed")}  # a wandb run state, the key of its mapping to ours


def _literals(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found |= {word for word in OWNED if node.value == word or f"/{word}" in node.value
                      or node.value.endswith(f" {word}")}
    return found


def test_run_folder_names_and_statuses_are_spelled_only_in_run_folder():
    owners = {"run_folder.py", "run_lock.py", "item_scores.py"}  # the run folder's module and the two it imports
    spelled = {(str(p.relative_to(PACKAGE)), word) for p in PACKAGE.rglob("*.py") if p.name not in owners
               for word in _literals(p)}
    assert spelled - ALLOWED == set()


def test_the_check_sees_a_literal(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('"""record.json in a docstring is prose."""\nSTATUS = "ok"\nPATH = "runs/x/record.json"\n')
    assert _literals(probe) == {"ok", "record.json"}


def _record(**fields):
    return {"status": "ok", "metrics": {"ppl_merged": 3.0}, "method": "l4q", "bits": 4, **fields}


@pytest.mark.parametrize("bad", [[1], "text", {"status": "done"}, _record(metrics=[1]), _record(bits="4"),
                                 _record(seed=True), _record(eval=[]), _record(method_config=3)])
def test_ill_typed_records_are_corrupt(tmp_path, bad):
    (tmp_path / run_folder.RECORD_FILE).write_text(json.dumps(bad))
    with pytest.raises(CorruptRun, match="record.json"):
        RunFolder(tmp_path).read_record()
    assert RunFolder(tmp_path).status() == Status.CORRUPT


@pytest.mark.parametrize("text", ["{not json", "- a\n- list\n", "\x00\xff"])
def test_unreadable_or_non_mapping_config_is_corrupt(tmp_path, text):
    (tmp_path / run_folder.CONFIG_FILE).write_text(text, errors="surrogateescape")
    with pytest.raises(CorruptRun):
        RunFolder(tmp_path).read_config()


def test_an_ok_record_is_final(tmp_path):
    folder = RunFolder(tmp_path)
    folder.write_record(_record())
    with pytest.raises(PermissionError, match="already says ok"):
        folder.write_record(_record(status="interrupted"))
    assert folder.record()["status"] == "ok"
    folder.write_record(_record(metrics={"ppl_merged": 2.0}))  # ok over ok (qaft-eval adding results) is fine
    folder.add_eval("merged", {"perplexity": 1.0})
    assert folder.record()["eval"] == {"merged": {"perplexity": 1.0}}


def test_symlinks_in_a_run_folder_are_refused(tmp_path):
    other = tmp_path / "other"
    (other / run_folder.MERGED_MODEL).mkdir(parents=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    os.symlink(other / run_folder.MERGED_MODEL, mine / run_folder.MERGED_MODEL)
    RunFolder(mine).write_record(_record(metrics={"merged_model_path": run_folder.MERGED_MODEL}))
    with pytest.raises(CorruptRun, match="symbolic link"):
        RunFolder(mine).merged_model()


def test_metrics_rows_are_never_dropped_silently(tmp_path):
    folder = RunFolder(tmp_path)
    for step in (1, 2, 3):
        folder.append_metrics({"step": step, "train/loss": 1.0 / step})
    assert [r["step"] for r in folder.read_metrics()] == [1, 2, 3]
    folder.trim_metrics(2)
    assert [r["step"] for r in folder.read_metrics()] == [1, 2]
    with folder.metrics_path.open("a") as f:
        f.write('{"step": 3, "train/lo\n')
    with pytest.raises(CorruptRun, match="line 3"):
        folder.read_metrics()
    folder.metrics_path.write_text('{"step": 1}\n{"train/loss": 2.0}\n')
    with pytest.raises(CorruptRun, match="line 2"):
        folder.read_metrics()


def test_debris_of_killed_writers_is_removed(tmp_path):
    folder = RunFolder(tmp_path)
    (tmp_path / ".record.json.tmp-123").write_text("{")
    (tmp_path / "..merged_model.pending.tmp-99").mkdir()
    (tmp_path / ".merged_model.pending").mkdir()
    (tmp_path / run_folder.CHECKPOINTS).mkdir()
    (tmp_path / run_folder.CHECKPOINTS / ".last.ckpt.tmp-5").write_bytes(b"x")
    folder.write_record(_record())
    assert len(folder.remove_debris()) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [run_folder.CHECKPOINTS, run_folder.RECORD_FILE]


def test_a_hand_edited_record_is_corrupt(tmp_path):
    folder = RunFolder(tmp_path)
    folder.write_record(_record(status="failed"))
    assert folder.record()["sha256"]
    edited = folder.record_path.read_text().replace('"failed"', '"ok"')
    folder.record_path.write_text(edited)
    with pytest.raises(CorruptRun, match="digest"):
        folder.read_record()
    legacy = {k: v for k, v in json.loads(edited).items() if k != "sha256"}  # records from before the digest
    folder.record_path.write_text(json.dumps(legacy))
    assert folder.record()["status"] == "ok"


def test_written_files_get_the_umask_mode_whatever_their_writer_chose(tmp_path):
    """safetensors and tempfile create 0600 / 0700; what qaft renames into place is readable as the umask says."""
    import torch
    from safetensors.torch import save_file

    from qaft.files import atomic_folder, atomic_write, umask_modes

    old = os.umask(0o022)
    try:
        assert umask_modes() == (0o644, 0o755)
        with atomic_folder(tmp_path / "model") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "x").write_text("x")
            os.chmod(tmp / "sub" / "x", 0o600)
        atomic_write(tmp_path / "one.bin", lambda f: f.write(b"1"))
        modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
        assert modes == {"model": 0o755, "model/model.safetensors": 0o644, "model/sub": 0o755,
                         "model/sub/x": 0o644, "one.bin": 0o644}
        os.umask(0o077)
        atomic_write(tmp_path / "private.bin", lambda f: f.write(b"1"))
        assert (tmp_path / "private.bin").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_a_released_lock_names_no_process(tmp_path):
    """While held, the lock file names its holder (the refusal of a second process quotes it); released, it is
    empty, and a second holder can take it."""
    from qaft.run_lock import RunBusy, RunLock

    lock = RunLock(tmp_path).acquire()
    assert lock.path.read_text().strip() == str(os.getpid())
    with pytest.raises(RunBusy, match=f"process {os.getpid()}"):
        RunLock(tmp_path).acquire()
    lock.release()
    assert lock.path.read_text() == ""
    with RunLock(tmp_path) as again:
        assert again.path.read_text().strip() == str(os.getpid())
    assert lock.path.read_text() == ""
