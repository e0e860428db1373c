"""What each part of the compiled decode loop buys: int4 SmolLM2, fused, side by side in one process.

Variants of the same prepared int4 model (bf16 activations, fused q/k/v and gate/up), each decoded by
:func:`qaft.deploy.greedy_generate` (compiled):

* ``all``: as shipped (plain attention in the compiled steps, the output projection as ``OneRowLinear``);
* ``sdpa steps``: the compiled steps keep the model's SDPA attention;
* ``plain output``: the output projection back to a plain ``nn.Linear`` (the same weight);
* ``neither``: both.

Also times the prompt's output projection eagerly: ``F.linear`` on the (1, 1, d) last-position view HF passes
(the prompt's strides) vs on the same input flattened to 2-D, as ``OneRowLinear`` does. Round-robin, median.

    HF_HUB_OFFLINE=1 python experiments/bench/decode_ablation.py [--new-tokens 64 --rounds 3 --json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

import qaft
from qaft.deploy import decode, greedy_generate, prepare_for_inference
from qaft.models import load_causal_lm

VARIANTS = {"all": (True, True), "sdpa steps": (False, True), "plain output": (True, False), "neither": (False, False)}


def build(quantized: torch.nn.Module, row_output: bool) -> torch.nn.Module:
    """A prepared copy of the int4 model (each variant keeps its own compiled step)."""
    model = prepare_for_inference(copy.deepcopy(quantized), torch.bfloat16, fuse=True)
    if not row_output:
        head = model.get_output_embeddings()
        plain = torch.nn.Linear(head.in_features, head.out_features, bias=False)
        plain.weight = head.weight
        model.set_output_embeddings(plain)
    return model


def attention_in_steps(plain: bool) -> contextlib.AbstractContextManager:
    """As shipped (plain attention in the compiled steps), or the compiled steps keeping the model's SDPA."""
    return contextlib.nullcontext() if plain else _sdpa_steps()


@contextlib.contextmanager
def _sdpa_steps() -> Iterator[None]:
    saved = decode._step_attention
    decode._step_attention = lambda *args: contextlib.nullcontext()
    try:
        yield
    finally:
        decode._step_attention = saved


def prompt_projection_ms(base: torch.nn.Module, prompt_len: int = 6, repeats: int = 20) -> dict[str, float]:
    weight = base.get_output_embeddings().weight.detach().to(torch.bfloat16)
    x = torch.randn(1, prompt_len, weight.shape[1], dtype=torch.bfloat16)[:, -1:, :]
    cases = {"F.linear on the (1, 1, d) view": lambda: F.linear(x, weight),
             "F.linear on it flattened": lambda: F.linear(x.reshape(-1, x.shape[-1]), weight)}
    out = {}
    with torch.inference_mode():
        for name, fn in cases.items():
            fn()
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start)
            out[name] = round(statistics.median(samples) * 1e3, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    base, tok = load_causal_lm("smollm2-135m")
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    quantized = qaft.ptq_model(copy.deepcopy(base), 4, 64)
    models, compile_s = {}, {}
    for name, flags in VARIANTS.items():
        model = build(quantized, flags[1])
        start = time.perf_counter()
        with attention_in_steps(flags[0]):
            greedy_generate(model, prompt, args.new_tokens)  # compiles this model's step
        compile_s[name] = round(time.perf_counter() - start, 1)
        models[name] = model, flags
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, (model, flags) in models.items():
            with attention_in_steps(flags[0]):
                start = time.perf_counter()
                greedy_generate(model, prompt, args.new_tokens)
                speeds[name].append(args.new_tokens / (time.perf_counter() - start))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; decode tok/s (median of {args.rounds})")
    print("| variant | plain attention in steps | OneRowLinear output | tok/s | vs neither | first call, s |")
    print("|---|---|---|---|---|---|")
    ref = statistics.median(speeds["neither"])
    for name, (_, flags) in models.items():
        tps = statistics.median(speeds[name])
        print(f"| {name} | {flags[0]} | {flags[1]} | {tps:.1f} | {tps / ref:.2f} | {compile_s[name]} |")
    prompt_ms = prompt_projection_ms(base)
    print("prompt's output projection, ms:", json.dumps(prompt_ms))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tok_s": speeds, "first_call_s": compile_s, "prompt_projection_ms": prompt_ms,
                       "torch": torch.__version__, "threads": torch.get_num_threads()}, f, indent=1)


if __name__ == "__main__":
    main()
