"""Training cost per method on the same model and batch: seconds per step, peak memory, trainable parameters.

Two measurements, each built so that its ratios to LoRA hold on a noisy machine:

* Time: one process holds every method's model and runs their AdamW steps round-robin (forward with
  labels, backward, optimizer step on a fixed random batch), one warm-up round then ``--steps`` timed
  rounds; seconds per step is each method's median. A slowdown of the machine hits every method alike.
* Memory: each method in a fresh subprocess (as in ``memory.py``, whose helpers this reuses): the peak RSS
  above the pre-model baseline over a warm-up and one more step (model, gradients and AdamW state included).

The ``dlqat-pc`` and ``dlqat-pc-a8kv8`` rows are DL-QAT Table 4's per-channel rows: weight-only, and with the
8-bit per-token activation and KV-cache quantizers (W/A/KV 4-8-8); their ratio is what quantizing activations and
the KV cache adds to training. ``llm_qat-a8kv8`` is LLM-QAT's 4-8-8 row (full QAT per channel), its step with the
teacher forward its logit distillation needs (the loss the shared training module computes). ``efficientqat`` is
EfficientQAT's trained phase (E2E-QP: only the scales train, on frozen int8 codes), its Block-AP run on the bench
batch before the measurement (a calibration step, not a training step). ``peqa`` and the ``lr_qat`` rows are the
L4Q reviewers' baselines: LR-QAT's claim is training memory near LoRA's, below L4Q's (its base is ``W0 / s0`` in
8 bits instead of ``W0``) and far below full QAT's.

The ``floor`` row is LoRA plus, in backward, one ``G = grad^T x`` GEMM (out x in) per adapted layer and
nothing else: the arithmetic any exact backward of LoRA-inside-the-quantizer (L4Q, DL-QAT) must add to
LoRA, since ``dA``, ``dB``, ``ds``, ``db`` and ``dm`` are masked or group-summed products of ``G``. A method's
step time over the floor's is what its own elementwise quantizer work costs; ``+compile`` rows run that
work through ``torch.compile`` (``method.compile_backward=true``).

    python experiments/bench/training_cost.py --json results/bench_training_cost.json
"""
from __future__ import annotations

import argparse
import itertools
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
from memory import _peak_rss_bytes, _reset_peak_rss, _rss_bytes, _warm_up_optimizer

import qaft
from qaft.methods.distill import distilled_loss
from qaft.models import load_causal_lm

# row -> (method, extra config fields)
METHODS = {
    "lora": ("lora", {}), "floor": ("lora", {}), "qlora": ("qlora", {}), "qalora": ("qalora", {}),
    "l4q": ("l4q", {}), "l4q+compile": ("l4q", {"compile_backward": True}),
    "dlqat": ("dlqat", {"quant_steps": 0}), "dlqat+compile": ("dlqat", {"quant_steps": 0, "compile_backward": True}),
    "qat": ("qat", {}),
    # DL-QAT Table 4's per-channel rows: weight-only, and weights + 8-bit activations and KV cache (W/A/KV)
    "dlqat-pc": ("dlqat", {"quant_steps": 0, "group_size": -1}),
    "dlqat-pc-a8kv8": ("dlqat", {"quant_steps": 0, "group_size": -1, "act_bits": 8, "kv_bits": 8}),
    # LLM-QAT's 4-8-8 row: full QAT, per channel, with its teacher forward (logit distillation) in every step
    "llm_qat-a8kv8": ("llm_qat", {"group_size": -1, "act_bits": 8, "kv_bits": 8}),
    # EfficientQAT's trained phase, E2E-QP (scales only, codes frozen), after its Block-AP on the bench batch
    "efficientqat": ("efficientqat", {"calib_batches": 1}),
    # The QAT family around L4Q: PEQA (scales only), LR-QAT (fixed-point-8 base by default; bf16 base; and plain
    # autograd of its formula, what its custom backward saves against)
    "peqa": ("peqa", {}), "lr_qat": ("lr_qat", {}), "lr_qat-bf16": ("lr_qat", {"downcast": "bf16"}),
    "lr_qat-naive": ("lr_qat", {"memory_efficient": False}),
    # LLM-QAT weight-only at the bench's bits and groups (Table 1's row; its teacher forward in every step)
    "llm_qat": ("llm_qat", {}),
}
MODELS = ("smollm2-135m", "wide-llama")


def build_model(name: str) -> torch.nn.Module:
    if name == "smollm2-135m":
        return in_private_memory(load_causal_lm(name)[0])
    # A wider random LLaMA (hidden 1024): larger layers make per-layer method overhead visible.
    config = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def in_private_memory(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter and buffer copied once out of the file mapping transformers loads safetensors through.
    While any tensor of the file keeps its mapping alive, the pages a method reads stay resident and count in the
    process's RSS: a method that replaces ``W0`` by something smaller (LR-QAT's ``Phi0``) would be charged for the
    float weights it read and dropped (on SmolLM2 most of the file stayed resident after LR-QAT built its
    layers, which made its peak look like L4Q's or above)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        tensor.data = tensor.data.clone()
    return model


def _weight_gradient_gemm(grad: torch.Tensor, x: torch.Tensor) -> None:
    torch.mm(grad.reshape(-1, grad.shape[-1]).T, x.reshape(-1, x.shape[-1]))  # formed, then dropped


def add_weight_gradient_gemm(model: torch.nn.Module) -> None:
    """The floor row: each LoRA layer's backward also forms ``grad^T x`` (out x in); x is the tensor LoRA's
    own backward keeps anyway, so memory is unchanged."""
    def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        out.register_hook(lambda grad, x=args[0]: _weight_gradient_gemm(grad, x))

    for layer in qaft.methods.api.qaft_layers(model):
        layer.register_forward_hook(hook)


class Trainee:
    """One method's model, optimizer and batch; ``step()`` is one timed training step.

    ``model``: a name for :func:`build_model`, or a model to apply the method to (experiments/bench/device_check.py
    passes a random Llama-2-7B-shaped one on CUDA). ``autocast``: run forward under autocast to that dtype (what
    ``trainer.precision=bf16-mixed`` does); ``checkpointing``: transformers' gradient checkpointing (non-reentrant).
    """

    def __init__(self, model: str | torch.nn.Module, row: str, args: argparse.Namespace,
                 device: torch.device | None = None, autocast: torch.dtype | None = None,
                 checkpointing: bool = False) -> None:
        method, extra = METHODS[row]
        self.model = build_model(model) if isinstance(model, str) else model
        wanted = {"rank": args.rank, "bits": args.bits, "group_size": args.group_size}
        known = qaft.methods.config.registered(method).field_names()
        config = qaft.config_for(method, **{**{k: v for k, v in wanted.items() if k in known}, **extra})
        self.ids = torch.randint(0, self.model.config.vocab_size, (args.batch, args.seq),
                                 generator=torch.Generator().manual_seed(1)).to(device or "cpu")
        # A method that calibrates first (EfficientQAT's Block-AP) does so on the bench batch, before any timing.
        qaft.apply_method(self.model, config, calib_batches=[self.ids] if config.calibration_options() else None)
        if row == "floor":
            add_weight_gradient_gemm(self.model)
        if checkpointing:
            self.model.config.use_cache = False
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        params = [p for group in qaft.parameter_groups(self.model).values() for p in group]
        self.opt = torch.optim.AdamW(params, lr=1e-5)
        self.trainable = qaft.count_parameters(self.model)
        self.config, self.device, self.autocast = config, self.ids.device, autocast

    def loss(self) -> torch.Tensor:
        """The training loss the shared Lightning module computes: labels, or distillation where there is a teacher."""
        batch = {"input_ids": self.ids, "attention_mask": torch.ones_like(self.ids), "labels": self.ids}
        teacher = self.config.teacher(self.model)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            return self.model(**batch).loss if teacher is None else distilled_loss(self.model, batch, teacher)

    def step(self) -> float:
        """Seconds of one forward, backward and AdamW step (CUDA: synchronised at both ends)."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        self.loss().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t


def _autocast(args: argparse.Namespace) -> torch.dtype | None:
    return {"none": None, "bf16": torch.bfloat16}[args.autocast]


def peak_memory(model_name: str, row: str, args: argparse.Namespace) -> dict:
    """Runs in a fresh subprocess: peak RSS above the pre-model baseline over two steps."""
    _warm_up_optimizer()
    base = _rss_bytes()
    trainee = Trainee(model_name, row, args, autocast=_autocast(args))
    _reset_peak_rss()
    trainee.step()
    trainee.step()
    return {"peak_bytes": _peak_rss_bytes() - base, "trainable": trainee.trainable}


def step_times(model_name: str, rows: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per step of every row, measured round-robin in this process."""
    trainees = {row: Trainee(model_name, row, args, autocast=_autocast(args)) for row in rows}
    times: dict[str, list[float]] = {row: [] for row in rows}
    for round_ in range(args.steps + 1):
        for row, trainee in trainees.items():
            seconds = trainee.step()
            if round_:  # round 0 warms up (and compiles the +compile rows)
                times[row].append(seconds)
    return {row: statistics.median(t) for row, t in times.items()}


def _child(model_name: str, row: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", f"{model_name}:{row}"] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "json", "models", "rows")]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def _print_table(model_name: str, rows: dict[str, dict], args: argparse.Namespace) -> dict[str, float]:
    lora, ratios = rows["lora"], {}
    print(f"\n{model_name}: batch {args.batch} x {args.seq}, rank {args.rank}, {args.bits}-bit g{args.group_size}; "
          f"autocast {args.autocast}; s/step: median of {args.steps} round-robin steps after 1 warm-up; "
          "CPU peak RSS above start")
    print(f"| {'method':<13} | {'s/step':>7} | {'/ LoRA':>6} | {'peak MiB':>8} | {'/ LoRA':>6} | {'trainable':>11} |")
    print(f"|{'-' * 15}|{'-' * 9}|{'-' * 8}|{'-' * 10}|{'-' * 8}|{'-' * 13}|")
    for row, r in rows.items():
        t, mem = r["step_s"] / lora["step_s"], r["peak_bytes"] / lora["peak_bytes"]
        print(f"| {row:<13} | {r['step_s']:>7.3f} | {t:>6.2f} | {r['peak_bytes'] / 2**20:>8.0f} | {mem:>6.2f} | "
              f"{r['trainable']:>11,} |")
        ratios[f"{model_name} {row}/lora step_time"] = round(t, 3)
        ratios[f"{model_name} {row}/lora peak_memory"] = round(mem, 3)
    return ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--rows", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--autocast", choices=("none", "bf16"), default="none",
                   help="bf16: forward under bf16 autocast, as trainer.precision=bf16-mixed trains")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(peak_memory(*args.child.split(":"), args)))
        return
    rows = list(dict.fromkeys(["lora", *args.rows]))
    results, ratios = {}, {}
    for model_name in args.models:
        memory = {row: _child(model_name, row, args) for row in rows}
        times = step_times(model_name, rows, args)
        results[model_name] = {row: {**memory[row], "step_s": times[row]} for row in rows}
        ratios |= _print_table(model_name, results[model_name], args)
    print(json.dumps(ratios, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": {k: v for k, v in vars(args).items() if k != "child"},
                                               "cpu": torch.backends.cpu.get_cpu_capability(),
                                               "threads": torch.get_num_threads(),
                                               "results": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
