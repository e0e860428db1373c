r"""Inference speed and size of SmolLM2-135M (``--model``): float vs merged integer models vs llama.cpp, side by side.

Decode: batch 1, greedy, ``--new-tokens`` tokens after a short prompt, under one or more *harnesses*:

* ``hf``: HF ``generate`` (dynamic cache, forced length via ``min_new_tokens``), the model as prepared;
* ``hf+fuse``: the same on the model prepared with ``fuse=True`` (q/k/v and gate/up fused);
* ``static+fuse``: :func:`qaft.deploy.greedy_generate` eagerly (static KV cache, no compile), fused;
* ``compiled``, ``compiled+fuse``: ``greedy_generate`` with the decode step compiled by ``torch.compile``;
* ``compiled-cpp+fuse``: the same with inductor's C++ wrapper (``cpp_wrapper=True``; slower first compile).

Every harness runs every variant (float baselines too), so ratios inside a harness are like for like.
Prefill: one forward over ``--prefill`` tokens, unfused and fused model. Variants and harnesses are
measured round-robin (``--rounds`` times, median kept) so that load from other processes hits all alike.
Integer models: round-to-nearest PTQ (``qaft.ptq_model``, min-max), prepared with the variant's compute
dtype and backend. llama.cpp (when llama-cpp-python is installed): the Q4_1 GGUF of the int4 variant's own
weights (``qaft.deploy.export_gguf``; exact, each 64-group is two Q4_1 blocks), decoded by a minimal greedy
loop over ``Llama.eval`` (no sampler).
``int4-hf``: the int4 model's ``format=hf`` export as transformers + torchao load it. Bytes on disk:
safetensors (float), the packed qaft checkpoint (integer), the GGUF file, the hf export. Also profiles where
int4 decode time goes (matmul kernels vs the rest, and the top entries by self CPU time).

    HF_HUB_OFFLINE=1 python experiments/bench/inference.py --variants fp32 bf16 int4 int3 int8 w8a8 int4-hf \
        --harnesses hf compiled+fuse --new-tokens 64 --prefill 512 --rounds 3 --gemv --json results/bench_inference.json
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import save_file

import qaft
from qaft.deploy import backend_counts, greedy_generate, prepare_for_inference, save_quantized
from qaft.deploy.packed import packed_bytes, unique_tensors
from qaft.models import load_causal_lm

# label -> (bits, group_size, compute dtype, backend); bits None = the float model itself
VARIANTS = {
    "fp32": (None, None, torch.float32, None),
    "bf16": (None, None, torch.bfloat16, None),
    "int4": (4, 64, torch.bfloat16, "kernel"),
    "int3": (3, 64, torch.bfloat16, "kernel"),
    "int8": (8, -1, torch.bfloat16, "kernel"),
    "int4-fp32act": (4, 64, torch.float32, "kernel"),  # the fp32-activation int4 kernel (slow on CPU)
    "int4-auto-fp32": (4, 64, torch.float32, "auto"),  # what backend="auto" picks for fp32
    # W8A8 (8-bit per-token activations too): torch._int_mm, against the same model fake-quantized + dense bf16
    "w8a8": (8, -1, torch.bfloat16, "kernel"),
    "w8a8-dequant": (8, -1, torch.bfloat16, "dequant"),
    # the int4 weights exported with format=hf and loaded by transformers + torchao (no qaft code at run time);
    # unfused harnesses only (fusing is qaft's, on qaft's layers)
    "int4-hf": (4, 64, torch.bfloat16, "hf-export"),
}
ACT_BITS = {"w8a8": 8, "w8a8-dequant": 8}  # variants whose linears also quantize their input per token
DEFAULT_VARIANTS = ["fp32", "bf16", "int4", "int3", "int8"]
# harness -> (fuse, loop); loop: "hf" = model.generate, "static"/"compiled" = greedy_generate
HARNESSES = {"hf": (False, "hf"), "hf+fuse": (True, "hf"), "static+fuse": (True, "static"),
             "compiled": (False, "compiled"), "compiled+fuse": (True, "compiled"),
             "compiled-cpp+fuse": (True, "compiled-cpp")}
LINEAR_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int4pack_mm_for_cpu",
              "aten::_weight_int8pack_mm", "aten::_int_mm")
LLAMA_CPP = "llama.cpp-q4_1"


def quantization(label: str) -> tuple[int, int, int]:
    """A variant's (bits, group size, activation bits): variants that share it share one PTQ model."""
    bits, group = VARIANTS[label][:2]
    return bits, group, ACT_BITS.get(label, 16)


def build(base: torch.nn.Module, label: str, fuse: bool, workdir: Path,
          merged: dict[tuple[int, int, int], tuple[torch.nn.Module, int]]) -> tuple[torch.nn.Module, int]:
    """The variant's model (fused or not, a copy of its own) and its bytes on disk. ``merged`` keeps each PTQ model
    and its checkpoint size by :func:`quantization`, so that quantizing and saving happen once per setting."""
    bits, group, dtype, backend = VARIANTS[label]
    if bits is None:
        path = workdir / f"{label}.safetensors"
        if not path.exists():
            save_file(unique_tensors(copy.deepcopy(base).to(dtype)), str(path))
        return prepare_for_inference(copy.deepcopy(base), dtype, fuse=fuse), path.stat().st_size
    key = quantization(label)
    if key not in merged:
        model = qaft.apply_method(copy.deepcopy(base), qaft.config_for(
            "ptq", bits=bits, group_size=group, act_bits=key[2]))
        merged[key] = model, packed_bytes(save_quantized(model, workdir / "-".join(map(str, key))))
    model, size = merged[key]
    if backend == "hf-export":
        return load_hf_export(model, dtype, workdir / label)
    return prepare_for_inference(copy.deepcopy(model), dtype, backend, fuse=fuse), size


def load_hf_export(model: torch.nn.Module, dtype: torch.dtype, folder: Path) -> tuple[torch.nn.Module, int]:
    """The model as transformers loads its ``format=hf`` export (torchao tensors), and the export's bytes."""
    from transformers import AutoModelForCausalLM

    from qaft.deploy.hf_export import export_hf
    if not (folder / "hf").is_dir():
        export_hf(copy.deepcopy(model), folder / "hf", dtype=dtype)
    size = sum(f.stat().st_size for f in (folder / "hf").glob("*.safetensors"))
    return AutoModelForCausalLM.from_pretrained(str(folder / "hf")).eval(), size


def decoder(model: torch.nn.Module, loop: str) -> Callable[[torch.Tensor, int], None]:
    """A function decoding exactly ``n`` new tokens with the given loop."""
    if loop == "hf":
        return lambda ids, n: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return lambda ids, n: greedy_generate(model, ids, n, compile=loop.startswith("compiled"),
                                          cpp_wrapper=loop == "compiled-cpp")


class LlamaCpp:
    """llama-cpp-python on a GGUF file: greedy decode over ``eval`` and a prefill of one batch."""

    def __init__(self, path: Path, n_ctx: int) -> None:
        import llama_cpp
        self.cpp = llama_cpp
        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=torch.get_num_threads(),
                                   n_threads_batch=torch.get_num_threads(), verbose=False)

    def _next(self) -> int:
        # Without logits_all, Llama.eval keeps no scores: read the last token's logits from the context.
        logits = self.cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.llm.n_vocab(),))))

    def decode(self, ids: torch.Tensor, n: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(ids[0].tolist())
        out = [self._next()]
        for _ in range(n - 1):  # forced length: no eos check, like min_new_tokens on the torch side
            self.llm.eval(out[-1:])
            out.append(self._next())
        return out

    def prefill(self, ids: torch.Tensor) -> None:
        self.llm.reset()
        self.llm.eval(ids[0].tolist())


def seconds(fn: Callable, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


@torch.inference_mode()
def prefill(model: torch.nn.Module, ids: torch.Tensor) -> None:
    model(ids, use_cache=False)


def profile_decode(run: Callable[[], None], new_tokens: int, top: int = 8) -> dict:
    """Per token: wall ms, ms of self CPU time in matmul kernels vs everything else (profiler on), and the ``top``
    entries by self CPU time (ops, compiled graphs' Python wrappers, dynamo's frame lookup)."""
    for _ in range(2):  # the first profiled call of a compiled step recompiles (the profiler changes guards)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            wall = seconds(run)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    linear = sum(e.self_cpu_time_total for e in events if e.key in LINEAR_OPS) / 1e3
    return {"wall_ms_per_token": wall * 1e3 / new_tokens, "matmul_ms_per_token": linear / new_tokens,
            "other_ms_per_token": (total - linear) / new_tokens,
            "top_self_ms_per_token": {e.key[:90]: round(e.self_cpu_time_total / 1e3 / new_tokens, 3)
                                      for e in events[:top]}}


def output_gemv(base: torch.nn.Module, iters: int = 50) -> dict[str, float]:
    """Microseconds for the output projection of one token in bf16: ``F.linear`` vs :class:`OneRowLinear` compiled
    (the fused multiply-and-sum the compiled decode step uses)."""
    from qaft.deploy.gemv import OneRowLinear
    head = copy.deepcopy(base.get_output_embeddings()).to(torch.bfloat16)
    compiled = torch.compile(OneRowLinear.wrap(head), fullgraph=True, dynamic=False)
    x = torch.randn(1, 1, head.in_features, dtype=torch.bfloat16)
    out = {}
    with torch.inference_mode():
        for name, fn in (("F.linear bf16", head), ("OneRowLinear compiled", compiled)):
            for _ in range(5):
                fn(x)
            out[name] = round(seconds(lambda: [fn(x) for _ in range(iters)]) / iters * 1e6, 1)
    return out | {"shape": f"{head.in_features}x{head.out_features}"}


def gemv_micro(shapes: tuple[tuple[int, int], ...] = ((576, 576), (576, 1536), (1536, 576)),
               iters: int = 300) -> dict[str, dict[str, float]]:
    """Microseconds per single-token product (M=1), per path: dense GEMM vs the int4/int8 kernels, with fp32
    and bf16 activations (the measurement behind ``backend="auto"``'s choice on CPU)."""
    from qaft.deploy import inference_layer
    from qaft.methods.act_kv import quantize_input
    from qaft.quant.linear import rtn_quantize_linear
    out = {}
    for in_f, out_f in shapes:
        lin = torch.nn.Linear(in_f, out_f, bias=False)
        int4, int8 = rtn_quantize_linear(lin, 4, 64), rtn_quantize_linear(lin, 8, -1)
        w8a8 = copy.deepcopy(int8)
        quantize_input(w8a8, 8)
        row = {}
        for dtype in (torch.float32, torch.bfloat16):
            name = "fp32" if dtype == torch.float32 else "bf16"
            paths = {"dense": copy.deepcopy(lin).to(dtype), "int4": inference_layer(int4, dtype, "kernel"),
                     "int8": inference_layer(int8, dtype, "kernel"), "int8x8": inference_layer(w8a8, dtype, "kernel"),
                     "w8a8 dequant": inference_layer(w8a8, dtype, "dequant")}
            x = torch.randn(1, 1, in_f, dtype=dtype)
            for path, layer in paths.items():
                with torch.inference_mode():
                    for _ in range(20):
                        layer(x)
                    row[f"{path} {name}"] = round(seconds(lambda: [layer(x) for _ in range(iters)]) / iters * 1e6, 1)
        out[f"{in_f}x{out_f}"] = row
    return out


def build_all(args: argparse.Namespace, base: torch.nn.Module, work: Path) -> tuple[dict, dict, dict, dict]:
    """Models keyed (variant, harness) (one copy per harness: each keeps its own cache and compiled step),
    unfused/fused models for prefill, bytes on disk, and the integer variants' merged models."""
    models, prefill_models, sizes, merged = {}, {}, {}, {}
    for label in args.variants:
        for harness in args.harnesses:
            fuse = HARNESSES[harness][0]
            if fuse and VARIANTS[label][3] == "hf-export":
                continue
            models[label, harness], sizes[label] = build(base, label, fuse, work, merged)
            prefill_models.setdefault((label, "fuse" if fuse else "plain"), models[label, harness])
    return models, prefill_models, sizes, merged


def measure(args: argparse.Namespace) -> dict:
    from qaft.deploy import export_gguf  # imports gguf: not at module level (device_check.py imports this module)

    base, tok = load_causal_lm(args.model)
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    prefill_ids = torch.randint(0, len(tok), (1, args.prefill), generator=torch.Generator().manual_seed(0))
    work = Path(tempfile.mkdtemp())
    models, prefill_models, sizes, merged = build_all(args, base, work)
    runs = {k: decoder(m, HARNESSES[k[1]][1]) for k, m in models.items()}
    prefills = {k: (lambda m: lambda ids: prefill(m, ids))(m) for k, m in prefill_models.items()}
    # the same weights as the int4 variant (its 64-groups are two exact Q4_1 blocks each)
    int4 = merged[quantization("int4")][0] if quantization("int4") in merged else qaft.ptq_model(
        copy.deepcopy(base), *VARIANTS["int4"][:2])
    gguf = export_gguf(copy.deepcopy(int4), work / "int4.gguf", tok)
    sizes[LLAMA_CPP] = gguf.stat().st_size
    if importlib.util.find_spec("llama_cpp") is not None and not args.no_llama_cpp:
        cpp = LlamaCpp(gguf, n_ctx=max(512, args.prefill + args.new_tokens + prompt.shape[1]))
        runs[LLAMA_CPP, "own"], prefills[LLAMA_CPP, "own"] = cpp.decode, cpp.prefill
    warm = time.perf_counter()
    for key, run in runs.items():  # warm-up: allocation, static caches (same size) and each step's compile
        run(prompt, args.new_tokens)
    for key, run in prefills.items():
        run(prefill_ids[:, :64])
    warm = time.perf_counter() - warm
    decode_s = {k: [] for k in runs}
    prefill_s = {k: [] for k in prefills}
    for _ in range(args.rounds):
        for key, run in runs.items():
            decode_s[key].append(args.new_tokens / seconds(run, prompt, args.new_tokens))
        for key, run in prefills.items():
            prefill_s[key].append(args.prefill / seconds(run, prefill_ids))
    gemv = {f"round {r}": gemv_micro() | {"output": output_gemv(base)} for r in range(2)} if args.gemv else {}
    if (LLAMA_CPP, "own") in runs:
        runs[LLAMA_CPP, "own"].__self__.llm.close()  # before interpreter exit, where its __del__ fails
    profile = {h: profile_decode(lambda: runs["int4", h](prompt, args.new_tokens), args.new_tokens)
               for h in args.harnesses if ("int4", h) in runs}
    return {"decode_tok_s": _nest(decode_s), "prefill_tok_s": _nest(prefill_s), "bytes": sizes,
            "decode_samples": _nest(decode_s, median=False), "int4_decode_profile": profile,
            "backends": {k[0]: backend_counts(m) for k, m in prefill_models.items() if k[1] == "plain"},
            "warmup_and_compile_s": round(warm, 1), "gemv_us": gemv}


def _nest(samples: dict, median: bool = True) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for (label, harness), values in samples.items():
        out.setdefault(label, {})[harness] = statistics.median(values) if median else [round(v, 2) for v in values]
    return out


def ratios(res: dict, harnesses: list[str]) -> dict[str, float]:
    """Decode ratios inside each harness (like for like; llama.cpp, with its own loop, against the baselines
    of each harness), each harness over hf, prefill and bytes over fp32."""
    dec, out = res["decode_tok_s"], {}
    for label, by_h in dec.items():
        for h in harnesses:
            mine = by_h.get(h, by_h.get("own"))
            if mine is None:  # a variant not run under this harness
                continue
            for den in ("fp32", "bf16"):
                if label != den and h in dec.get(den, {}):
                    out[f"{label}/{den} decode [{h}]"] = round(mine / dec[den][h], 3)
            if h != "hf" and h in by_h and "hf" in by_h:
                out[f"{label} decode {h}/hf"] = round(by_h[h] / by_h["hf"], 3)
    out |= prefill_ratios(res["prefill_tok_s"]) | standard_stack_ratios(res)
    for label, size in res["bytes"].items():
        if "fp32" in res["bytes"]:
            out[f"{label}/fp32 bytes"] = round(size / res["bytes"]["fp32"], 3)
    return out


def prefill_ratios(prefill: dict[str, dict[str, float]]) -> dict[str, float]:
    """Prefill over fp32's, unfused and fused models apart (``+fuse``); a harness subset measures only the kind
    it needs (``compiled+fuse`` alone: no unfused model), and a kind fp32 was not measured in has no ratio.
    llama.cpp's own prefill is set against each kind."""
    out = {}
    for kind, suffix in (("plain", ""), ("fuse", "+fuse")):
        reference = prefill.get("fp32", {}).get(kind)
        for label, by_kind in prefill.items():
            mine = by_kind.get(kind, by_kind.get("own"))
            if reference and mine is not None and label != "fp32":
                out[f"{label}/fp32 prefill{suffix}"] = round(mine / reference, 3)
    return out


def targets(res: dict, harnesses: list[str]) -> dict[str, dict[str, bool]]:
    """The targets per harness: int4 decode >= 3x fp32 and >= 1.5x bf16 (where both were measured), int4 decode
    >= 1.0x llama.cpp's on the same weights (where llama.cpp ran); and int4 prefill >= 1.0x bf16, per kind."""
    dec, pre, out = res["decode_tok_s"], res["prefill_tok_s"], {}
    for h in harnesses:
        mine = dec.get("int4", {}).get(h)
        if mine is None:
            continue
        row = {}
        if h in dec.get("fp32", {}) and h in dec.get("bf16", {}):
            row |= {"int4 >= 3x fp32": mine >= 3 * dec["fp32"][h], "int4 >= 1.5x bf16": mine >= 1.5 * dec["bf16"][h]}
        if LLAMA_CPP in dec:
            row["int4 >= 1.0x llama.cpp"] = mine >= dec[LLAMA_CPP]["own"]
        out[h] = row
    for kind in ("plain", "fuse"):
        mine, ref = pre.get("int4", {}).get(kind), pre.get("bf16", {}).get(kind)
        if mine is not None and ref is not None:
            out[f"prefill {kind}"] = {"int4 >= 1.0x bf16": mine >= ref}
    return out


def standard_stack_ratios(res: dict) -> dict[str, float]:
    """The standard-stack targets as ratios: int4 decode over llama.cpp's, int4 prefill over bf16's."""
    dec, pre, out = res["decode_tok_s"], res["prefill_tok_s"], {}
    for h, speed in dec.get("int4", {}).items():
        if LLAMA_CPP in dec:
            out[f"int4/llama.cpp decode [{h}]"] = round(speed / dec[LLAMA_CPP]["own"], 3)
    for kind, speed in pre.get("int4", {}).items():
        if kind in pre.get("bf16", {}):
            out[f"int4/bf16 prefill [{kind}]"] = round(speed / pre["bf16"][kind], 3)
    return out


def print_report(res: dict, args: argparse.Namespace) -> None:
    m = res["machine"]
    print(f"torch {m['torch']}, {m['threads']} threads, CPU capability {m['cpu_capability']}, "
          f"llama.cpp: {m['llama_cpp']}, loadavg start {m['loadavg_start']} end {m['loadavg_end']}")
    cols = [f"decode {h}" for h in args.harnesses] + ["prefill", "prefill+fuse", "MB on disk"]
    print("| variant | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for label, by_h in res["decode_tok_s"].items():
        if label == LLAMA_CPP:
            cells = [f"{by_h['own']:.1f} (own loop)"] + [""] * (len(args.harnesses) - 1)
            pre = [f"{res['prefill_tok_s'][label]['own']:.0f}", ""]
        else:
            cells = [_speed(by_h.get(h), ".1f") for h in args.harnesses]
            pre = [_speed(res["prefill_tok_s"][label].get(k)) for k in ("plain", "fuse")]  # a kind not measured: n/a
        print(f"| {label} | " + " | ".join(cells + pre) + f" | {res['bytes'][label] / 1e6:.1f} |")
    if LLAMA_CPP not in res["decode_tok_s"]:
        print(f"({LLAMA_CPP}: not measured; GGUF file {res['bytes'][LLAMA_CPP] / 1e6:.1f} MB)")
    print("int4 decode profile (ms/token):", json.dumps(
        {h: {k: v if isinstance(v, dict) else round(v, 2) for k, v in p.items()}
         for h, p in res["int4_decode_profile"].items()}))
    if res["gemv_us"]:
        print("single-token GEMV, us:", json.dumps(res["gemv_us"]))
    print("targets:", json.dumps(res["targets"]))
    print(json.dumps(res["ratios"], indent=1))


def _speed(value: float | None, fmt: str = ".0f") -> str:
    return "n/a" if value is None else format(value, fmt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="qaft model name (tiny-llama: a quick check of the script)")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--harnesses", nargs="+", default=["hf", "compiled+fuse"], choices=list(HARNESSES))
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even where installed")
    p.add_argument("--gemv", action="store_true", help="also time single-token products per kernel path")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    machine = {"torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "loadavg_start": round(os.getloadavg()[0], 2),
               "llama_cpp": _llama_cpp_version()}
    res = measure(args)
    res["machine"] = machine | {"loadavg_end": round(os.getloadavg()[0], 2)}
    res["ratios"], res["targets"] = ratios(res, args.harnesses), targets(res, args.harnesses)
    print_report(res, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": vars(args), **res}, indent=2, default=str))


def _llama_cpp_version() -> str:
    if importlib.util.find_spec("llama_cpp") is None:
        return "not installed"
    import llama_cpp
    return f"llama-cpp-python {llama_cpp.__version__}"


if __name__ == "__main__":
    main()
