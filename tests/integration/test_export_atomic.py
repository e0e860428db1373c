"""``qaft-export`` writes whole exports or none, and never replaces what it must not.

A real export process is killed (SIGKILL, which no ``finally`` survives) while its export is half written: the
process runs the real CLI with one library writer wrapped to stop, once it has written its part, until killed,
so the kill lands at a known point instead of racing a millisecond-long write of the tiny model.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from qaft.deploy import load_quantized
from qaft.deploy.cli import main as export_main
from qaft.files import HOST, TMP_MARK, remove_stale_temporaries

from helpers import TESTS, run_qaft_train, tiny_run_overrides

# Runs qaft-export with argv[1] ("module:attribute.path") wrapped to report and wait for the kill once it returns.
STALLED_EXPORT = """
import importlib, sys, time
module, _, attr = sys.argv[1].partition(":")
*path, name = attr.split(".")
owner = importlib.import_module(module)
for part in path:
    owner = getattr(owner, part)
original = getattr(owner, name)
def stalled(*args, **kwargs):
    result = original(*args, **kwargs)
    print("stalled", flush=True)
    time.sleep(300)
    return result
setattr(owner, name, stalled)
from qaft.deploy.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One tiny trained run (L4Q w4 g64: an integer merge, exact in GGUF) with its merged model saved."""
    root = tmp_path_factory.mktemp("runs")
    proc = run_qaft_train([*tiny_run_overrides(root, steps=1), "save_model=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    return folder


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(f".*{TMP_MARK}*"))


def killed_export(run_dir: Path, writer: str, args: list[str], log: Path) -> list[Path]:
    """Start ``qaft-export RUN ARGS`` with ``writer`` stalled after it wrote, SIGKILL it there, reap it; returns
    the temporaries it left in the run folder."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", STALLED_EXPORT, writer, str(run_dir), *args],
                                stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        try:
            while (line := proc.stdout.readline()) not in ("stalled\n", ""):
                pass
            assert line, f"the export ended ({proc.wait()}) before its writer stalled:\n{log.read_text()[-3000:]}"
        finally:
            proc.kill()
            proc.wait()  # reaped: an unreaped child still counts as a live writer
    return temporaries(run_dir)


def test_a_killed_export_leaves_none_and_the_next_export_removes_its_debris(run_dir, tmp_path):
    target = run_dir / "export_qaft"
    debris = killed_export(run_dir, "qaft.deploy.packed:save_file", ["format=qaft"], tmp_path / "log")
    assert not target.exists()
    # killed after the weights and before quantization.json: what used to be left as export_qaft/
    assert [p.name.split(TMP_MARK)[0] for p in debris] == [".export_qaft"]
    assert (debris[0] / "model.safetensors").is_file() and not (debris[0] / "quantization.json").exists()
    assert export_main([str(run_dir), "format=qaft"]) == 0
    assert temporaries(run_dir) == []
    assert load_quantized(target).config.model_type == "llama"


def test_a_killed_overwrite_keeps_the_previous_export_whole(run_dir, tmp_path, capsys):
    target = run_dir / "export.gguf"
    assert export_main([str(run_dir), "format=gguf"]) == 0
    before = target.read_bytes()
    debris = killed_export(run_dir, "gguf:GGUFWriter.write_kv_data_to_file", ["format=gguf", "overwrite=true"],
                           tmp_path / "log")
    assert [p.name.split(TMP_MARK)[0] for p in debris] == [".export.gguf"]  # header and metadata, no tensors
    assert target.read_bytes() == before
    capsys.readouterr()
    assert export_main([str(run_dir), "format=gguf"]) == 2  # the slot holds an export: replaced only when asked
    assert capsys.readouterr().err == f"qaft-export: {target} exists; pass overwrite=true to replace it\n"
    assert export_main([str(run_dir), "format=gguf", "overwrite=true"]) == 0
    assert temporaries(run_dir) == [] and gguf.GGUFReader(str(target)).tensors


@pytest.mark.parametrize("out, overwrite", [
    ("merged_model", True), ("merged_model/model.safetensors", True), ("record.json", True), (".", True),
    ("..", True), ("checkpoints", False), ("config.yaml", False), ("notes.gguf", False)])
def test_destinations_an_export_may_not_replace_are_refused_in_one_line(run_dir, capsys, out, overwrite):
    """The run's record and merged model (and folders holding them) even with overwrite=true; the rest of the
    run folder only with it."""
    before = {p: p.stat().st_mtime_ns for p in run_dir.parent.rglob("*")}
    argv = [str(run_dir), "format=gguf", f"out={run_dir / out}", *(["overwrite=true"] if overwrite else [])]
    capsys.readouterr()
    assert export_main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("qaft-export: out=") and ("even with overwrite=true" if overwrite else
                                                      "pass overwrite=true") in line
    assert {p: p.stat().st_mtime_ns for p in run_dir.parent.rglob("*")} == before


def test_an_existing_out_is_replaced_only_with_overwrite(run_dir, tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("keep")
    capsys.readouterr()
    assert export_main([str(run_dir), "format=qaft", f"out={out}"]) == 2
    assert capsys.readouterr().err == f"qaft-export: {out} exists; pass overwrite=true to replace it\n"
    assert out.read_text() == "keep"
    assert export_main([str(run_dir), "format=qaft", f"out={out}", "overwrite=true"]) == 0  # a file -> a folder
    (out / "stray.txt").write_text("from before")
    assert export_main([str(run_dir), "format=qaft", f"out={out}", "overwrite=true"]) == 0
    assert (out / "quantization.json").is_file() and not (out / "stray.txt").exists()  # replaced, not merged
    assert temporaries(tmp_path) == []


def test_an_export_that_fails_midway_leaves_the_previous_one(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "hf"
    assert export_main([str(run_dir), "format=hf", f"out={out}"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("qaft.deploy.hf_export.quantization_config", fail)  # after the weights are written
    with pytest.raises(RuntimeError, match="disk full"):
        export_main([str(run_dir), "format=hf", f"out={out}", "overwrite=true"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and temporaries(tmp_path) == []


def test_stale_temporaries_are_those_of_dead_writers(tmp_path):
    live = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        names = {"live": f".a{TMP_MARK}{live.pid}@{HOST}", "dead": f".a{TMP_MARK}{dead.pid}@{HOST}",
                 "old": f".a~old{TMP_MARK}{dead.pid}@{HOST}", "other host": f".a{TMP_MARK}{dead.pid}@elsewhere",
                 "other target": f".b{TMP_MARK}{dead.pid}@{HOST}"}
        for kind, name in names.items():  # the displaced old version of a folder is a folder, the rest files
            (tmp_path / name).mkdir() if kind == "old" else (tmp_path / name).write_text(kind)
        removed = remove_stale_temporaries(tmp_path, ["a"])
        assert sorted(p.name for p in removed) == sorted([names["dead"], names["old"]])
        left = remove_stale_temporaries(tmp_path, owned=True)  # the folder's owner: all but its own are stale
        assert sorted(p.name for p in left) == sorted([names["live"], names["other host"], names["other target"]])
    finally:
        live.kill()
        live.wait()
