"""What two cuts in a tiny run's time save, each measured side by side in one process on SmolLM2-135M.

* ``peak-memory``: a training step of DL-QAT (4 bits, groups of 64, batch 4 x 128) with the CPU peak-memory
  sampler watching (``mallinfo2`` after every block's forward and backward: what every step paid before; now
  only the first two steps of a run and of each phase are watched, :mod:`qaft.training.peak_memory`) against
  the same step unwatched. Two models, their steps round-robin, so both see the same machine and heap; the
  median of ``--steps`` rounds after one warm-up.
* ``gptq``: GPTQ of the whole model (``--calib-batches`` random batches) with the Hessian of an input that
  several linears read accumulated once (q/k/v, gate/up; :mod:`qaft.methods.gptq_model`) against once per
  linear, alternating, ``--rounds`` each; the two must give the same codes bit for bit (checked).
* ``bf16``: a cut not taken: a held-out forward and a DL-QAT step in float32 against bf16 autocast.

    HF_HUB_OFFLINE=1 python experiments/bench/tiny_run_cuts.py --json results/bench_tiny_run_cuts.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from training_cost import Trainee

from qaft.methods import gptq_model
from qaft.models import load_causal_lm
from qaft.quant.linear import QuantizedLinear
from qaft.training.peak_memory import PeakMemory


def peak_memory_cost(args: argparse.Namespace) -> dict[str, float]:
    shape = argparse.Namespace(rank=16, bits=4, group_size=64, batch=4, seq=128)
    watched, plain = Trainee("smollm2-135m", "dlqat", shape), Trainee("smollm2-135m", "dlqat", shape)
    memory = PeakMemory()
    memory.start(watched.model)  # watches every forward and backward from now on
    times: dict[str, list[float]] = {"watched": [], "unwatched": []}
    for round_ in range(args.steps + 1):
        for name, trainee in (("watched", watched), ("unwatched", plain)):
            seconds = trainee.step()
            if round_:
                times[name].append(seconds)
    memory.stop()
    median = {name: statistics.median(t) for name, t in times.items()}
    return {"watched_s": median["watched"], "unwatched_s": median["unwatched"],
            "watched/unwatched": median["watched"] / median["unwatched"]}


def _gptq(model: torch.nn.Module, calib: list[torch.Tensor], shared: bool) -> tuple[float, dict]:
    owner = gptq_model._Shared.owner
    if not shared:
        gptq_model._Shared.owner = lambda self, name, x: name  # one accumulator per linear, as before
    try:
        start = time.perf_counter()
        quantized = gptq_model.gptq_quantize_model(model, calib, 4, 64)
        seconds = time.perf_counter() - start
    finally:
        gptq_model._Shared.owner = owner
    codes = {n: m.codes() for n, m in quantized.named_modules() if isinstance(m, QuantizedLinear)}
    return seconds, codes


def gptq_cost(args: argparse.Namespace) -> dict[str, float]:
    model = load_causal_lm("smollm2-135m")[0]
    generator = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, model.config.vocab_size, (4, 128), generator=generator)
             for _ in range(args.calib_batches)]
    times: dict[bool, list[float]] = {True: [], False: []}
    reference = None
    for _ in range(args.rounds):
        for shared in (True, False):
            seconds, codes = _gptq(model, calib, shared)
            times[shared].append(seconds)
            reference = reference or codes
            assert all(torch.equal(codes[n], reference[n]) for n in reference), "shared Hessians changed a code"
    shared_s, alone_s = statistics.median(times[True]), statistics.median(times[False])
    return {"shared_s": shared_s, "per_linear_s": alone_s, "shared/per_linear": shared_s / alone_s}


def _median_round_robin(calls: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(rounds + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bf16_cost(args: argparse.Namespace) -> dict[str, float]:
    """Not taken (yet): a held-out forward ([4, 512] tokens, what perplexity scoring runs) and a DL-QAT training
    step, float32 against bf16 autocast (this CPU's avx512_bf16), side by side."""
    model = load_causal_lm("smollm2-135m")[0].eval()
    ids = torch.randint(0, model.config.vocab_size, (4, 512), generator=torch.Generator().manual_seed(0))

    def forward(dtype: torch.dtype | None) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                model(ids).logits.float()
        return call

    shape = argparse.Namespace(rank=16, bits=4, group_size=64, batch=4, seq=128)
    fp32, bf16 = Trainee("smollm2-135m", "dlqat", shape), Trainee("smollm2-135m", "dlqat", shape,
                                                                   autocast=torch.bfloat16)
    eval_s = _median_round_robin({"fp32": forward(None), "bf16": forward(torch.bfloat16)}, args.rounds)
    step_s = _median_round_robin({"fp32": fp32.step, "bf16": bf16.step}, args.steps)
    return {"eval_forward_fp32_s": eval_s["fp32"], "eval_forward_bf16_s": eval_s["bf16"],
            "eval bf16/fp32": eval_s["bf16"] / eval_s["fp32"], "dlqat_step_fp32_s": step_s["fp32"],
            "dlqat_step_bf16_s": step_s["bf16"], "step bf16/fp32": step_s["bf16"] / step_s["fp32"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parts = ["peak-memory", "gptq", "bf16"]
    p.add_argument("--parts", nargs="+", default=parts, choices=parts)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    parts = {"peak-memory": peak_memory_cost, "gptq": gptq_cost, "bf16": bf16_cost}
    result = {"threads": torch.get_num_threads(), **{part: parts[part](args) for part in args.parts}}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
