"""experiments/bench/inference.py runs with any subset of ``--harnesses``: a ratio whose reference was not measured
(e.g. unfused prefill when every harness is fused) is left out of the ratios and shown as n/a, never a crash."""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import subprocess
import sys

from helpers import ROOT

BENCH = ROOT / "experiments" / "bench" / "inference.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_inference", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(bench, harnesses: list[str], llama_cpp: bool, monkeypatch) -> tuple[dict, argparse.Namespace]:
    """Made-up speeds keyed exactly as ``measure`` keys them (its own ``build_all``, with models not built)."""
    monkeypatch.setattr(bench, "build", lambda base, label, fuse, work, merged: (object(), 1000 + len(label)))
    args = argparse.Namespace(variants=["fp32", "bf16", "int4"], harnesses=harnesses)
    models, prefill_models, sizes, _ = bench.build_all(args, None, None)
    decode = {key: [10.0 + i] for i, key in enumerate(models)}
    prefill = {key: [100.0 + 7 * i] for i, key in enumerate(prefill_models)}
    sizes[bench.LLAMA_CPP] = 600
    if llama_cpp:
        decode[bench.LLAMA_CPP, "own"], prefill[bench.LLAMA_CPP, "own"] = [50.0], [500.0]
    res = {"decode_tok_s": bench._nest(decode), "prefill_tok_s": bench._nest(prefill), "bytes": sizes,
           "int4_decode_profile": {}, "gemv_us": {}, "machine": {k: "-" for k in (
               "torch", "threads", "cpu_capability", "llama_cpp", "loadavg_start", "loadavg_end")}}
    res["ratios"], res["targets"] = bench.ratios(res, harnesses), bench.targets(res, harnesses)
    return res, args


def test_every_harness_subset_reports(monkeypatch, capsys):
    bench = _bench()
    names = list(bench.HARNESSES)
    for size, llama_cpp in itertools.product(range(1, len(names) + 1), (False, True)):
        for subset in itertools.combinations(names, size):
            res, args = _results(bench, list(subset), llama_cpp, monkeypatch)
            bench.print_report(res, args)
            kinds = {"fuse" if bench.HARNESSES[h][0] else "plain" for h in subset}
            pre, ratios = res["prefill_tok_s"], res["ratios"]
            for kind, suffix in (("plain", ""), ("fuse", "+fuse")):
                key = f"int4/fp32 prefill{suffix}"
                assert (key in ratios) == (kind in kinds), (subset, key)
                if kind in kinds:
                    assert ratios[key] == round(pre["int4"][kind] / pre["fp32"][kind], 3)
                    assert (f"{bench.LLAMA_CPP}/fp32 prefill{suffix}" in ratios) == llama_cpp
                # the standard-stack targets: int4 prefill over bf16's, int4 decode over llama.cpp's
                assert (f"int4/bf16 prefill [{kind}]" in ratios) == (kind in kinds)
                assert (f"prefill {kind}" in res["targets"]) == (kind in kinds)
            assert {h for h in res["targets"] if not h.startswith("prefill ")} == set(subset)
            for h in subset:
                assert ("int4 >= 1.0x llama.cpp" in res["targets"][h]) == llama_cpp
                if llama_cpp:
                    assert ratios[f"int4/llama.cpp decode [{h}]"] == round(res["decode_tok_s"]["int4"][h] / 50.0, 3)
            assert ("| n/a" in capsys.readouterr().out) == (len(kinds) == 1)


def test_fused_harnesses_alone_run_end_to_end_on_the_tiny_model(tmp_path):
    """The subset that crashed (no unfused model, so no unfused prefill to divide by), on tiny-llama."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--model", "tiny-llama", "--variants", "fp32", "int4",
                           "--harnesses", "hf+fuse", "static+fuse", "--new-tokens", "4", "--prefill", "16",
                           "--rounds", "1", "--no-llama-cpp", "--json", str(out)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratios = json.loads(out.read_text())["ratios"]
    assert "int4/fp32 prefill+fuse" in ratios and "int4/fp32 prefill" not in ratios
    assert "int4/fp32 decode [static+fuse]" in ratios
