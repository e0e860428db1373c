"""A run's identity comes from the data it reads, on real ``qaft-train`` processes: a local file rewritten with
its old modification time restored (``cp -p``, ``rsync -a``) is other data, trained on as it now reads; a file that
any config key names is in the identity (``qaft.training.identity`` walks them all), and a data module told to read
a file other than ``data.source`` (which the run is evaluated and recorded on) is refused before anything runs."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from helpers import run_qaft_train


def qa_lines(word: str) -> str:
    return "".join(json.dumps({"instruction": f"Name a {word}, number {i}.", "output": word}) + "\n" for i in range(16))


def rewrite_keeping_mtime(path: Path, text: str) -> None:
    st = path.stat()
    path.write_text(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def train(root: Path, *extra: str) -> bool:
    """A seconds-long instruction run; whether it said it had already finished (instead of running)."""
    proc = run_qaft_train(["model=tiny-llama", f"runs_root={root}", "trainer.max_steps=2", "trainer.accelerator=cpu",
                           "trainer.enable_progress_bar=false", "data=json", "data.datamodule.max_length=48",
                           "data.datamodule.batch_size=2", "data.datamodule.max_eval_samples=4", "eval.max_batches=1",
                           "eval.baselines=false", "save_model=false", "optim.warmup_steps=1", *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return "already finished" in proc.stdout


def folders(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime_ns)


def record(folder: Path) -> dict:
    return json.loads((folder / "record.json").read_text())


def test_a_file_rewritten_under_its_old_mtime_is_a_new_run_that_trains_on_the_new_contents(tmp_path):
    data, root = tmp_path / "x.jsonl", tmp_path / "runs"
    data.write_text(qa_lines("cat"))
    train(root, f"data.source={data}")
    rewrite_keeping_mtime(data, qa_lines("owl"))  # same size, same mtime: datasets' cache key would not change
    assert not train(root, f"data.source={data}")
    old, new = folders(root)
    assert record(old)["status"] == record(new)["status"] == "ok"
    # trained on what the file now holds: another loss, and the identity it ran under hashes the new bytes
    assert record(new)["metrics"]["final_train_loss"] != record(old)["metrics"]["final_train_loss"]
    identity = torch.load(new / "checkpoints" / "last.ckpt", weights_only=True)["qaft"]["identity"]
    assert identity["files_sha256"] == {str(data): hashlib.sha256(data.read_bytes()).hexdigest()}


def test_a_datamodule_reading_another_file_than_data_source_is_refused(tmp_path):
    named, read, root = tmp_path / "x.jsonl", tmp_path / "other.jsonl", tmp_path / "runs"
    named.write_text(qa_lines("cat"))
    read.write_text(qa_lines("dog"))
    proc = run_qaft_train(["model=tiny-llama", f"runs_root={root}", "data=json", f"data.source={named}",
                           f"data.datamodule.source={read}"])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "data.datamodule.source" in lines[0], proc.stderr[-2000:]
    assert not root.exists()


def test_every_local_file_a_config_names_is_in_the_identity(tmp_path):
    from qaft.training.identity import FILES_KEY, identity_config

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one")
    cfg = {"data": {"source": "austen"}, "eval": {"corpus": {"source": str(corpus)}}, "extra": {"x": [str(corpus)]}}
    before = identity_config(cfg)[FILES_KEY]
    corpus.write_text("two")
    after = identity_config(cfg)[FILES_KEY]
    assert set(before) == {str(corpus)} and before != after
