"""The training-cost benchmark's pieces run: a memory child process and round-robin step times (under bf16 autocast,
as `--autocast bf16` runs them)."""
import argparse
import importlib.util
import sys

from helpers import ROOT

BENCH = ROOT / "experiments" / "bench" / "training_cost.py"


def _bench():
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("training_cost", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_child_and_round_robin_steps_on_the_wide_model():
    bench = _bench()
    args = argparse.Namespace(rows=["lora", "floor", "l4q", "dlqat-pc-a8kv8", "llm_qat-a8kv8", "llm_qat"], batch=1, seq=8,
                              steps=1, rank=4, bits=4,
                              group_size=64, autocast="bf16", json=None, child=None, models=["wide-llama"])
    memory = bench._child("wide-llama", "l4q", args)
    assert memory["peak_bytes"] > 0 and memory["trainable"] > 0
    times = bench.step_times("wide-llama", args.rows, args)
    assert set(times) == set(args.rows) and all(t > 0 for t in times.values())
