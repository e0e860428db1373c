"""experiments/bench/device_check.py at the tiny shape on CPU (what a GPU run does, in seconds), in one
subprocess in which hydra, omegaconf, wandb, datasets, lm_eval, gguf and torchao cannot be imported: the air-gapped
GPU machine it is written for has none of them, so the script, the modules it imports and the cuda tests it
collects must run without them."""
import json
import subprocess
import sys

from helpers import ROOT, _env

SCRIPT = ROOT / "experiments" / "bench" / "device_check.py"
ABSENT = ("hydra", "omegaconf", "wandb", "datasets", "lm_eval", "gguf", "torchao")
# The finder that imports from sys.path, replaced by one that finds nothing of ABSENT (as if not installed:
# importlib.util.find_spec answers None, so optional imports, transformers' among them, see them missing).
AIR_GAP = f"""
import importlib.machinery, runpy, sys
ABSENT = {ABSENT!r}
class Absent(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)
sys.meta_path[:] = [Absent if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
sys.argv = [{str(SCRIPT)!r}, *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
print("imported:", sorted({{m.partition(".")[0] for m in sys.modules}} & set(ABSENT)))
"""


def test_device_check_runs_on_cpu_at_the_tiny_shape_without_the_packages_a_gpu_cluster_lacks(tmp_path):
    out = tmp_path / "device_check.json"
    proc = subprocess.run([sys.executable, "-c", AIR_GAP, "--device", "cpu", "--shape", "tiny", "--steps", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "imported: []" in proc.stdout
    result = json.loads(out.read_text())
    tests = result["tests"]
    assert tests["status"] == "ran" and tests["exit_code"] == 0  # all skipped on CPU: pytest's "ok"
    assert tests["counts"]["skipped"] == len(tests["outcomes"]) > 0
    assert {node.split("::")[0] for node in tests["outcomes"]} == {
        "tests/cuda/test_kernels_cuda.py", "tests/cuda/test_training_cuda.py", "tests/cuda/test_distributed_cuda.py",
        "tests/unit/test_lowrank_backward.py", "tests/unit/test_quant.py", "tests/unit/test_zero_point.py"}
    rows = result["training"]["rows"]
    assert list(rows) == ["LoRA", "QLoRA", "QA-LoRA", "L4Q", "DL-QAT", "full QAT", "LLM-QAT"]
    assert all(r["status"] == "ok" and r["step_s"] > 0 and r["trainable"] > 0 for r in rows.values())
    assert set(result["training"]["ratios_to_lora"]) == set(rows)
    inference = result["inference"]
    assert inference["int4_backends"] == {"Int4Linear": 14}
    assert all(inference[k][v] > 0 for k in ("decode_tok_s", "prefill_tok_s") for v in ("bf16", "int4"))
    assert inference["int4/bf16 decode"] > 0 and inference["int4/bf16 prefill"] > 0
    assert result["machine"]["device"] == "cpu" and result["setup"]["shape"] == "tiny"


def test_cuda_requested_without_a_gpu_is_one_line_and_writes_nothing(tmp_path):
    import importlib.util

    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--json", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2 and not (tmp_path / "x.json").exists()
