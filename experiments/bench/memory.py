"""Peak training memory of one forward + backward per method, on a stack of wide linear layers.

Each configuration runs in a fresh subprocess, so its peak is its own: on CUDA the allocator's
``max_memory_allocated``; on CPU the process's peak resident set (VmHWM, reset once the model is built)
minus the resident set measured just before the model is built. Large tensors are mmap'd and returned to
the OS when freed, so the resident set follows the live tensors. The model's own memory counts (QLoRA's
NF4 base is smaller than LoRA's float one); building it does not. Ratios are against LoRA, same run.

    python experiments/bench/memory.py                      # 8 x 2048x2048, 4096 tokens
    python experiments/bench/memory.py --json results/bench_memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch
from torch import nn

import qaft

ROWS = {  # row label -> (method, extra fields)
    "LoRA": ("lora", {}),
    "QLoRA (NF4)": ("qlora", {}),
    "QA-LoRA": ("qalora", {}),
    "L4Q (custom backward)": ("l4q", {}),
    "L4Q (naive autograd)": ("l4q", {"memory_efficient": False}),
    "DL-QAT": ("dlqat", {"quant_steps": 0}),
    "full QAT (LSQ)": ("qat", {}),
    "PEQA": ("peqa", {}),
    "LR-QAT (fixed-point 8)": ("lr_qat", {}),
    "LR-QAT (bf16 base)": ("lr_qat", {"downcast": "bf16"}),
    "LR-QAT (naive autograd)": ("lr_qat", {"memory_efficient": False}),
}


class Stack(nn.Module):
    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(width, width, bias=False)})
                                    for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block["proj"](x)
        return x


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _warm_up_optimizer() -> None:
    """The first optimizer step imports code worth tens of MB of RSS; pay that before the baseline."""
    p = torch.zeros(1, requires_grad=True)
    p.grad = torch.zeros(1)
    torch.optim.AdamW([p]).step()


def measure(label: str, args: argparse.Namespace) -> int:
    """Peak bytes, model included, of one forward + backward (+ an AdamW step if asked)."""
    method, extra = ROWS[label]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.width, device=device) / args.width**0.5
    _warm_up_optimizer()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else _rss_bytes()
    model = Stack(args.layers, args.width).to(device)
    wanted = {"rank": args.rank, "bits": args.bits, "group_size": args.group_size, "target_modules": ("proj",)}
    known = qaft.methods.config.registered(method).field_names()
    fields = {k: v for k, v in wanted.items() if k in known}
    qaft.apply_method(model, qaft.config_for(method, **fields, **extra))
    params = [p for group in qaft.parameter_groups(model).values() for p in group]
    opt = torch.optim.AdamW(params, lr=1e-4) if args.optimizer_step else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()  # building the model (quantizing, LoftQ's SVDs) is not part of a training step
    model(x).pow(2).mean().backward()
    if opt is not None:
        opt.step()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() - base
    return _peak_rss_bytes() - base


def _suffix(label: str) -> str:
    """What tells a method's variant rows apart in the ratio keys (``l4q_naive``, ``lr_qat_bf16``)."""
    return "".join(f"_{tag}" for tag in ("naive", "bf16") if tag in label)


def _child(label: str, args: argparse.Namespace) -> int:
    cmd = [sys.executable, __file__, "--child", label] + [f"--{k.replace('_', '-')}={v}" for k, v in
                                                          vars(args).items() if k not in ("child", "json")]
    # A fixed mmap threshold stops glibc from keeping freed blocks in its heap, so the resident set
    # follows the live tensors instead of the allocator's high-water mark.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return int(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--optimizer-step", type=int, default=0, help="1: include one AdamW step in the peak")
    p.add_argument("--json", default=None, help="also write the ratios to this JSON file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(measure(args.child, args))
        return
    peaks = {label: _child(label, args) for label in ROWS}
    lora = peaks["LoRA"]
    where = "CUDA max_memory_allocated" if torch.cuda.is_available() else "CPU peak RSS above start"
    print(f"{args.layers} x {args.width}x{args.width} linear, {args.tokens} tokens, rank {args.rank}, "
          f"{args.bits}-bit g{args.group_size}, optimizer step: {bool(args.optimizer_step)}; {where}")
    print(f"| {'method':<24} | {'peak MiB':>9} | {'/ LoRA':>7} |\n|{'-' * 26}|{'-' * 11}|{'-' * 9}|")
    for label, peak in peaks.items():
        print(f"| {label:<24} | {peak / 2**20:>9.1f} | {peak / lora:>7.3f} |")
    if args.json:
        ratios = {f"{ROWS[label][0]}{_suffix(label)}/lora peak_memory": round(peak / lora, 3)
                  for label, peak in peaks.items()}
        with open(args.json, "w") as f:
            json.dump({"setup": {k: v for k, v in vars(args).items() if k not in ("child", "json")},
                       "peak_bytes": peaks, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
