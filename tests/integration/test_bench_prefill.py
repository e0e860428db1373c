"""experiments/bench/prefill_profile.py on the tiny model: the int4 prefill path is checked against the dequantized
weights, and its profile puts the unpacking in its own group (int4 only), and the library's method is restored after."""
from __future__ import annotations

import importlib.util
import json
import sys

from helpers import ROOT

BENCH = ROOT / "experiments" / "bench" / "prefill_profile.py"


def test_prefill_profile_runs_and_separates_the_unpack(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))  # it imports its sibling inference.py, as when run as a script
    spec = importlib.util.spec_from_file_location("bench_prefill", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "prefill.json"
    monkeypatch.setattr(sys, "argv", ["prefill_profile.py", "--model", "tiny-llama", "--tokens", "128",
                                      "--batches", "1", "--rounds", "1", "--json", str(out)])
    bench.main()
    res = json.loads(out.read_text())["batch 1"]
    assert res["int4 layers vs dequantized weights in fp32, max |logit difference| / max |logit|"] < 1e-5
    speeds = res["tokens_per_s"]
    assert res["int4/bf16"] == round(speeds["int4"] / speeds["bf16"], 3)
    profile = res["profile_ms"]
    assert profile["bf16"][bench.UNPACK] == 0 and profile["int4"][bench.UNPACK] > 0
    for model in ("bf16", "int4"):
        assert profile[model]["GEMM"] > 0
    assert bench.Int4Linear.dense_weight.__qualname__ == "Int4Linear.dense_weight"  # the label was removed
