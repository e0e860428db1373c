"""Deployed scoring speed: a merged int4 model's prefill against the bf16 model's, and where the difference goes.

Scoring a deployed model (held-out perplexity, lm-eval log-likelihoods) is one forward over whole windows, so
its speed is prefill speed. For each batch size (``--batches``; 1 is the serving prefill of
``experiments/bench/inference.py``, 4 the batch ``conf/scale/tiny.yaml`` scores with) and ``--tokens`` tokens per
row, bf16 and int4 (round-to-nearest PTQ, groups of 64, the int4 layers of :mod:`qaft.deploy.kernels`) run
round-robin, ``--rounds`` times, median tokens/s, each prefill timed as ``inference.py`` times its own. The int4
layers' prefill path is checked first, in float32 (where accumulation order hardly shows), against the same
integer weights dequantized once into a plain model. Then one profiled prefill of each, its self CPU time sorted
into the GEMMs, attention, the int4 layers' unpacking (every op inside :meth:`Int4Linear.dense_weight`, labelled with
``record_function`` here, not in the library) and everything else, per prefill.

    HF_HUB_OFFLINE=1 python experiments/bench/prefill_profile.py --json results/bench_prefill.json
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from inference import prefill, seconds  # the serving benchmark's prefill and timer (a sibling script)

import qaft
from qaft.deploy import prepare_for_inference
from qaft.deploy.kernels import Int4Linear
from qaft.models import load_causal_lm

UNPACK = "int4 unpack (Int4Linear.dense_weight)"
GROUPS = {"GEMM": ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int4pack_mm_for_cpu"),
          "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",)}


@contextmanager
def labelled_unpack() -> Iterator[None]:
    """Every unpack inside a profiler range named :data:`UNPACK` (restored on exit)."""
    original = Int4Linear.dense_weight

    def dense_weight(self: Int4Linear) -> torch.Tensor:
        with torch.profiler.record_function(UNPACK):
            return original(self)

    Int4Linear.dense_weight = dense_weight
    try:
        yield
    finally:
        Int4Linear.dense_weight = original


def models(name: str) -> tuple[dict[str, torch.nn.Module], int]:
    base, tok = load_causal_lm(name)
    merged = qaft.apply_method(copy.deepcopy(base), qaft.config_for("ptq", bits=4, group_size=64))
    built = {"bf16": prepare_for_inference(copy.deepcopy(base), torch.bfloat16),
             "int4": prepare_for_inference(copy.deepcopy(merged), torch.bfloat16, "kernel"),
             "int4 fp32": prepare_for_inference(copy.deepcopy(merged), torch.float32, "kernel"),
             "int4 dequantized fp32": prepare_for_inference(merged, torch.float32, "dequant")}
    return built, len(tok)


@torch.inference_mode()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, use_cache=False).logits


def speeds(runs: dict[str, Callable[[], object]], tokens: int, rounds: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            samples[key].append(tokens / seconds(run))
    return {k: round(statistics.median(v), 1) for k, v in samples.items()}


def profile_ms(run: Callable[[], object]) -> dict[str, float]:
    """Self CPU ms of one call, by group; the unpack range's ops count as unpacking, not under their own names."""
    with labelled_unpack(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        wall = seconds(run)
    events = prof.events()
    inside = {id(e) for r in events if r.name == UNPACK for e in _descendants(r)}
    out = dict.fromkeys([*GROUPS, UNPACK, "other"], 0.0)
    for e in events:
        group = UNPACK if id(e) in inside or e.name == UNPACK else next(
            (g for g, ops in GROUPS.items() if e.name in ops), "other")
        out[group] += e.self_cpu_time_total / 1e3
    return {k: round(v, 1) for k, v in out.items()} | {"wall (profiler on)": round(wall * 1e3, 1)}


def _descendants(event: object) -> Iterator[object]:
    for child in getattr(event, "cpu_children", []):
        yield child
        yield from _descendants(child)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="qaft model name (tiny-llama: a quick check)")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    built, vocab = models(args.model)
    out: dict[str, object] = {"setup": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                              "loadavg_start": round(os.getloadavg()[0], 2)}
    for batch in args.batches:
        ids = torch.randint(0, vocab, (batch, args.tokens), generator=torch.Generator().manual_seed(0))
        out_logits = {k: logits(m, ids) for k, m in built.items()}  # also the warm-up
        runs = {k: functools.partial(prefill, built[k], ids) for k in ("bf16", "int4")}
        tok_s = speeds(runs, batch * args.tokens, args.rounds)
        out[f"batch {batch}"] = {
            "int4 layers vs dequantized weights in fp32, max |logit difference| / max |logit|": _relative(
                out_logits["int4 fp32"], out_logits["int4 dequantized fp32"]),
            "tokens_per_s": tok_s, "int4/bf16": round(tok_s["int4"] / tok_s["bf16"], 3),
            "profile_ms": {k: profile_ms(run) for k, run in runs.items()}}
    out["loadavg_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
