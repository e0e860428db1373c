"""The CLIs as a user's shell runs them: exit statuses and one-line errors."""
from __future__ import annotations

import os
import subprocess
import sys

import qaft
from qaft.models import build_tiny_llama

from helpers import fake_run_folder


def test_hub_task_offline_fails_with_one_clear_message(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "qaft.evaluation.cli", "model=tiny-llama", "perplexity.source=null", "tasks=[arc_easy]",
         f"output={tmp_path / 'out.json'}"], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("qaft-eval:")]
    assert len(lines) == 1 and "not reachable" in lines[0] and "arc_easy" in lines[0]


def test_qaft_export_console_script_exit_status_and_names_with_equals(tmp_path):
    """Success exits 0, a bad argument exits 2 with one line; run folders named with '=' (older qaft put the
    command-line overrides into the name) are taken as the run folder, not as options."""
    float_model = build_tiny_llama()
    run_dir = tmp_path / "l4q-w4g32__trainer.max_steps=4"
    fake_run_folder(run_dir, qaft.ptq_model(float_model, 4, 32))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    ok = subprocess.run(["qaft-export", str(run_dir), "format=qaft", f"out={tmp_path / 'out'}"], capture_output=True,
                        text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "out" / "quantization.json").is_file() and f"wrote {tmp_path / 'out'}" in ok.stdout
    bad = subprocess.run(["qaft-export", str(run_dir), "format=onnx"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert bad.returncode == 2 and "qaft-export: format='onnx' must be one of" in bad.stderr
