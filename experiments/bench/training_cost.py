"""Training cost per method on the same model and batch: seconds per step, peak memory, trainable parameters.

Each (model, method) runs in a fresh subprocess (peak memory measured as in ``memory.py``, whose helpers
this reuses): build the model, apply the method, then one warm-up step and ``--steps`` timed AdamW steps
(forward with labels, backward, optimizer step) on a fixed random batch; seconds per step is the median of
the timed steps, peak is the peak RSS above the pre-model baseline over warm-up + timed steps (model,
gradients and AdamW state included). Ratios are against LoRA on the same model, same run.

The ``floor`` row is LoRA plus, in backward, one ``G = grad^T x`` GEMM (out x in) per adapted layer and
nothing else: the arithmetic any exact backward of LoRA-inside-the-quantizer (L4Q, DL-QAT) must add to
LoRA, since ``dA``, ``dB``, ``ds``, ``db`` and ``dm`` are masked or group-summed products of ``G``. A method's
step time over the floor's is what its own elementwise quantizer work costs.

    python experiments/bench/training_cost.py --json results/bench_training_cost.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from memory import _peak_rss_bytes, _reset_peak_rss, _rss_bytes, _warm_up_optimizer  # noqa: E402

import qaft  # noqa: E402
from qaft.models import load_causal_lm  # noqa: E402

METHODS = {"lora": {}, "floor": {}, "qlora": {}, "qalora": {}, "l4q": {}, "dlqat": {"quant_steps": 0}, "qat": {}}
MODELS = ("smollm2-135m", "wide-llama")


def build_model(name: str) -> torch.nn.Module:
    if name == "smollm2-135m":
        return load_causal_lm(name)[0]
    # A wider random LLaMA (hidden 1024): larger layers make per-layer method overhead visible.
    config = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _weight_gradient_gemm(grad: torch.Tensor, x: torch.Tensor) -> None:
    torch.mm(grad.reshape(-1, grad.shape[-1]).T, x.reshape(-1, x.shape[-1]))  # formed, then dropped


def add_weight_gradient_gemm(model: torch.nn.Module) -> None:
    """The floor row: each LoRA layer's backward also forms ``grad^T x`` (out x in); x is the tensor LoRA's
    own backward keeps anyway, so memory is unchanged."""
    def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        out.register_hook(lambda grad, x=args[0]: _weight_gradient_gemm(grad, x))

    for layer in qaft.model.qaft_layers(model):
        layer.register_forward_hook(hook)


def measure(model_name: str, method: str, args: argparse.Namespace) -> dict:
    _warm_up_optimizer()
    base = _rss_bytes()
    model = build_model(model_name)
    wanted = {"rank": args.rank, "bits": args.bits, "group_size": args.group_size}
    name = "lora" if method == "floor" else method
    known = qaft.methods.config.registered(name).field_names()
    qaft.apply_method(model, qaft.config_for(name, **{k: v for k, v in wanted.items() if k in known},
                                             **METHODS[method]))
    if method == "floor":
        add_weight_gradient_gemm(model)
    model.train()
    params = [p for group in qaft.parameter_groups(model).values() for p in group]
    opt = torch.optim.AdamW(params, lr=1e-5)
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    _reset_peak_rss()
    times = []
    for step in range(args.steps + 1):
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:  # step 0 is the warm-up
            times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times), "peak_bytes": _peak_rss_bytes() - base,
            "trainable": qaft.count_parameters(model)}


def _child(model_name: str, method: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", f"{model_name}:{method}"] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "json", "models")]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child.split(":"), args)))
        return
    results, ratios = {}, {}
    for model_name in args.models:
        rows = {m: _child(model_name, m, args) for m in METHODS}
        results[model_name] = rows
        lora = rows["lora"]
        print(f"\n{model_name}: batch {args.batch} x {args.seq}, rank {args.rank}, {args.bits}-bit g{args.group_size}, "
              f"median of {args.steps} steps after 1 warm-up, CPU peak RSS above start")
        print(f"| {'method':<7} | {'s/step':>7} | {'/ LoRA':>6} | {'peak MiB':>8} | {'/ LoRA':>6} | {'trainable':>10} |")
        print(f"|{'-' * 9}|{'-' * 9}|{'-' * 8}|{'-' * 10}|{'-' * 8}|{'-' * 12}|")
        for m, r in rows.items():
            t, mem = r["step_s"] / lora["step_s"], r["peak_bytes"] / lora["peak_bytes"]
            print(f"| {m:<7} | {r['step_s']:>7.2f} | {t:>6.2f} | {r['peak_bytes'] / 2**20:>8.0f} | {mem:>6.2f} | "
                  f"{r['trainable']:>10,} |")
            ratios[f"{model_name} {m}/lora step_time"] = round(t, 3)
            ratios[f"{model_name} {m}/lora peak_memory"] = round(mem, 3)
    print(json.dumps(ratios, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": {k: v for k, v in vars(args).items() if k != "child"},
                                               "results": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
