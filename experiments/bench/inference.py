"""Inference speed and size of SmolLM2-135M: float vs merged integer models, measured side by side.

Decode: batch 1, greedy, ``--new-tokens`` tokens after a short prompt (HF ``generate``, forced length).
Prefill: one forward over ``--prefill`` tokens. Variants are measured round-robin (``--rounds`` times,
median kept) so that load from other processes on the machine hits all of them alike. Integer models
are round-to-nearest PTQ (``qaft.ptq_model``, min-max) and go through ``qaft.deploy.prepare_for_inference``
with the backend named in the variant. Bytes on disk: the safetensors file (float) or the packed qaft
checkpoint (integer), and the Q4_1 GGUF for int4 g32. Also reports where decode time goes (profiler: share
of self CPU time in the linear kernels vs everything else, i.e. per-token Python and small-op overhead).

    python experiments/bench/inference.py --json results/bench_inference.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import qaft
from qaft.deploy import export_gguf, prepare_for_inference, save_quantized
from qaft.deploy.checkpoint import _unique_tensors, checkpoint_bytes
from qaft.models import load_causal_lm

# label -> (bits, group_size, compute dtype, backend); bits None = the float model itself
VARIANTS = {
    "fp32": (None, None, torch.float32, None),
    "bf16": (None, None, torch.bfloat16, None),
    "int4": (4, 64, torch.float32, "kernel"),
    "int4-bf16": (4, 64, torch.bfloat16, "kernel"),
    "int4-auto": (4, 64, torch.float32, "auto"),
    "int3": (3, 64, torch.float32, "kernel"),
    "int8": (8, -1, torch.bfloat16, "kernel"),
}
LINEAR_OPS = ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::_weight_int4pack_mm_for_cpu",
              "aten::_weight_int8pack_mm", "aten::bmm")


def build(base: torch.nn.Module, label: str, workdir: Path) -> tuple[torch.nn.Module, int]:
    """The variant's model and its bytes on disk."""
    bits, group, dtype, backend = VARIANTS[label]
    if bits is None:
        model = copy.deepcopy(base).to(dtype)
        save_file(_unique_tensors(model), str(workdir / f"{label}.safetensors"))
        return model.eval(), (workdir / f"{label}.safetensors").stat().st_size
    merged = qaft.ptq_model(base, bits, group)
    size = checkpoint_bytes(save_quantized(merged, workdir / label))
    return prepare_for_inference(merged, dtype, backend), size


@torch.inference_mode()
def decode_seconds(model, prompt: torch.Tensor, new_tokens: int, cache: str | None) -> float:
    kwargs = {"cache_implementation": cache} if cache else {}
    t = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
    return time.perf_counter() - t


@torch.inference_mode()
def prefill_seconds(model, ids: torch.Tensor) -> float:
    t = time.perf_counter()
    model(ids, use_cache=False)
    return time.perf_counter() - t


@torch.inference_mode()
def linear_share(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Share of decode self-CPU time spent in matmul kernels (the rest is per-token overhead)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in LINEAR_OPS) / total


def measure(args: argparse.Namespace) -> dict:
    base, tok = load_causal_lm("smollm2-135m")
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    prefill_ids = torch.randint(0, len(tok), (1, args.prefill))
    work = Path(tempfile.mkdtemp())
    models, sizes = {}, {}
    for label in args.variants:
        models[label], sizes[label] = build(base, label, work)
    gguf_bytes = export_gguf(qaft.ptq_model(base, 4, 32), work / "int4g32.gguf").stat().st_size
    decode = {k: [] for k in models}
    prefill = {k: [] for k in models}
    for label, model in models.items():  # warm-up: first calls allocate and, for a static cache, build it
        decode_seconds(model, prompt, 4, args.cache)
        prefill_seconds(model, prefill_ids[:, :64])
    for _ in range(args.rounds):
        for label, model in models.items():
            decode[label].append(args.new_tokens / decode_seconds(model, prompt, args.new_tokens, args.cache))
            prefill[label].append(args.prefill / prefill_seconds(model, prefill_ids))
    share = {k: linear_share(m, prompt, 16) for k, m in models.items() if k in ("fp32", "int4")}
    return {"decode_tok_s": {k: statistics.median(v) for k, v in decode.items()},
            "prefill_tok_s": {k: statistics.median(v) for k, v in prefill.items()},
            "bytes": sizes | {"int4g32.gguf": gguf_bytes}, "decode_linear_share": share}


def ratios(res: dict) -> dict[str, float]:
    out = {}
    for num in res["decode_tok_s"]:
        for den in ("fp32", "bf16"):
            if num != den and den in res["decode_tok_s"]:
                for kind in ("decode", "prefill"):
                    out[f"{num}/{den} {kind}"] = round(res[f"{kind}_tok_s"][num] / res[f"{kind}_tok_s"][den], 3)
        if "fp32" in res["bytes"]:
            out[f"{num}/fp32 bytes"] = round(res["bytes"][num] / res["bytes"]["fp32"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cache", default=None, help="cache_implementation for generate, e.g. static")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    res = measure(args)
    res["ratios"] = ratios(res)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, cache={args.cache}, llama.cpp: not installed")
    print(f"| {'variant':<10} | {'decode tok/s':>12} | {'prefill tok/s':>13} | {'MB on disk':>10} |")
    print(f"|{'-' * 12}|{'-' * 14}|{'-' * 15}|{'-' * 12}|")
    for k in res["decode_tok_s"]:
        print(f"| {k:<10} | {res['decode_tok_s'][k]:>12.2f} | {res['prefill_tok_s'][k]:>13.1f} | "
              f"{res['bytes'][k] / 1e6:>10.1f} |")
    print(f"int4 g32 Q4_1 GGUF: {res['bytes']['int4g32.gguf'] / 1e6:.1f} MB")
    print("decode self-CPU share in matmul kernels:", {k: round(v, 3) for k, v in res["decode_linear_share"].items()})
    print(json.dumps(res["ratios"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": vars(args), **res}, indent=2, default=str))


if __name__ == "__main__":
    main()
