"""Where the CPU int4 layer should leave its kernel for the dense GEMM, and what unpacking costs.

For each SmolLM2 projection shape and row count, side by side in one process (round-robin, median of
``--repeats``), bf16 activations: the dense bf16 GEMM on a materialised weight (the float model's cost), the
int4 kernel (``_weight_int4pack_mm_for_cpu``), :meth:`qaft.deploy.kernels.Int4Linear.dense_weight` followed by
the dense GEMM (qaft's prefill path), and the unpack alone; ratios are against the dense GEMM.

    python experiments/bench/int4_unpack.py [--rows 64 128 256 512 1024] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from qaft.deploy.kernels import Int4Linear
from qaft.quant.linear import rtn_quantize_linear

SHAPES = ((576, 576), (576, 1536), (1536, 576), (576, 3072))  # (in, out): q/o, gate/up, down, fused gate_up


def _median_ms(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def measure(in_f: int, out_f: int, rows: int, group_size: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    layer = Int4Linear(rtn_quantize_linear(torch.nn.Linear(in_f, out_f, bias=False), 4, group_size), torch.bfloat16)
    dense_w = layer.dense_weight()
    x = torch.randn(rows, in_f, dtype=torch.bfloat16)
    cases = {
        "dense": lambda: F.linear(x, dense_w),
        "kernel": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.weight, group_size,
                                                                      layer.scales_and_zeros),
        "unpack+dense": lambda: F.linear(x, layer.dense_weight()),
        "unpack": layer.dense_weight,
    }
    for fn in cases.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(3):  # round-robin, so drifting load hits every case alike
        for name, fn in cases.items():
            times[name].append(_median_ms(fn, repeats))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms (median), ratio = case / dense")
    print("| in x out | rows | dense | kernel | unpack+dense | unpack | kernel/dense | (unpack+dense)/dense |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for in_f, out_f in SHAPES:
        for rows in args.rows:
            t = measure(in_f, out_f, rows, args.group_size, args.repeats)
            results.append({"in": in_f, "out": out_f, "rows": rows, **t})
            print(f"| {in_f} x {out_f} | {rows} | {t['dense']:.2f} | {t['kernel']:.2f} | {t['unpack+dense']:.2f} "
                  f"| {t['unpack']:.2f} | {t['kernel'] / t['dense']:.2f} | {t['unpack+dense'] / t['dense']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
