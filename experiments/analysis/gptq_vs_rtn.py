"""GPTQ's layer output error relative to round-to-nearest, on random layers and on SmolLM2's own layers.

For a linear layer with calibration inputs ``X`` the error of a quantized weight ``Q`` is ``||X (W - Q)^T||_F``;
with ``H = 2 X^T X / n`` this is ``sqrt(n / 2 * sum((W - Q) H (W - Q)^T))``, so only Hessians are kept. Each
cell is the mean over layers of ``err(GPTQ) / err(RTN)`` (below 1: GPTQ helps), RTN being min-max
round-to-nearest on the same grid. Two Hessians per layer: the calibration one GPTQ sees ("calib") and one of
other inputs ("held-out": fresh samples for random layers, the next text blocks for SmolLM2).

* random layers: 256 x 512 Gaussian weights, correlated inputs with uneven feature scales (as in real
  activations), 2,048 calibration rows;
* SmolLM2-135M: q_proj, up_proj, down_proj of a few blocks, inputs from the float model on Austen's training
  text (``--blocks`` blocks of 512 tokens for calibration, as many again held out).

``--before PATH`` adds the columns of another ``gptq.py`` (e.g. a copy of an earlier version) beside the
current one; ``--zero-point int`` also compares the integer-zero grid (its RTN and GPTQ, relative to float RTN).

    python experiments/analysis/gptq_vs_rtn.py --before /tmp/before/gptq.py --zero-point int
"""
from __future__ import annotations

import argparse
import importlib.util
from typing import Callable

import torch

from qaft.quant import dequantize, init_scale_offset, quantize
from qaft.quant.gptq import HessianAccumulator, gptq_quantize_weight

# (name, weight, calibration Hessian, held-out Hessian)
Layer = tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]


def output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    """``||X (W - Q)^T||_F`` up to the constant ``sqrt(n / 2)``, from ``H``."""
    d = (w - wq).double()
    return float(((d @ h) * d).sum().sqrt())


def _random_inputs(n: int, d: int, gen: torch.Generator, mix: torch.Tensor) -> torch.Tensor:
    x = torch.randn(n, d, generator=gen) @ mix + 0.3 * torch.randn(n, d, generator=gen)
    return x * torch.linspace(0.1, 3.0, d)


def random_layers(count: int) -> list[Layer]:
    layers = []
    for seed in range(count):
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(256, 512, generator=gen)
        mix = torch.randn(512, 512, generator=gen) / 512**0.5
        hs = []
        for _ in range(2):
            acc = HessianAccumulator(512)
            acc.add(_random_inputs(2048, 512, gen, mix))
            hs.append(acc.hessian)
        layers.append((f"random{seed}", w, *hs))
    return layers


@torch.no_grad()
def smollm2_layers(blocks: list[int], n_batches: int) -> list[Layer]:
    """Weights and input Hessians (calibration and held-out text) of a few SmolLM2 linears."""
    from qaft.data import load_lm_texts
    from qaft.data.lm import lm_blocks, tokenize_texts
    from qaft.models import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2-135m")
    ids = lm_blocks(tokenize_texts(tokenizer, load_lm_texts("austen")["train"], 2 * n_batches * 512), 512)
    names = [f"model.layers.{b}.{n}" for b in blocks for n in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")]
    accs = {(n, part): HessianAccumulator(model.get_submodule(n).in_features) for n in names for part in range(2)}
    part = [0]
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda mod, args, out, n=n: accs[(n, part[0])].add(args[0])) for n in names]
    for i in range(2 * n_batches):
        part[0] = i // n_batches
        model(ids[i:i + 1])
    for h in hooks:
        h.remove()
    return [(n, model.get_submodule(n).weight.detach().float(), accs[(n, 0)].hessian, accs[(n, 1)].hessian)
            for n in names]


def _rtn(w: torch.Tensor, bits: int, g: int, zero_point: str) -> torch.Tensor:
    s, b = init_scale_offset(w, bits, g, zero_point=zero_point)
    return dequantize(quantize(w, s, b, bits), s, b)


def _load_gptq(path: str) -> Callable:
    spec = importlib.util.spec_from_file_location("gptq_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.gptq_quantize_weight


def ratios(layers: list[Layer], bits: int, g: int, variants: dict[str, Callable]) -> dict[str, tuple[float, float]]:
    """Per variant, the mean over layers of (calib, held-out) error relative to float-grid RTN. Layers that RTN
    quantizes exactly (SmolLM2's offline weights are Q4_1: 4 bits, groups of 32) have no ratio; NaN if all."""
    sums = {k: [0.0, 0.0] for k in variants}
    counted = 0
    for _, w, h_cal, h_out in layers:
        rtn = _rtn(w, bits, g, "float")
        base = (output_error(w, rtn, h_cal), output_error(w, rtn, h_out))
        if min(base) == 0:
            continue
        counted += 1
        for key, quantizer in variants.items():
            wq = quantizer(w, h_cal, bits, g)
            sums[key][0] += output_error(w, wq, h_cal) / base[0]
            sums[key][1] += output_error(w, wq, h_out) / base[1]
    n = counted or float("nan")
    return {k: (v[0] / n, v[1] / n) for k, v in sums.items()}


def variants_of(before: str | None, zero_point_int: bool) -> dict[str, Callable]:
    def gptq_with(fn: Callable, zero_point: str | None) -> Callable:
        extra = {} if zero_point is None else {"zero_point": zero_point}

        def run(w, h, bits, g):
            return dequantize(*fn(w, h, bits, g, **extra))
        return run

    out: dict[str, Callable] = {}
    if before:
        out["GPTQ before"] = gptq_with(_load_gptq(before), None)
    out["GPTQ"] = gptq_with(gptq_quantize_weight, "float")
    if zero_point_int:
        out["RTN int-zero"] = lambda w, h, bits, g: _rtn(w, bits, g, "int")
        out["GPTQ int-zero"] = gptq_with(gptq_quantize_weight, "int")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--random", type=int, default=3, help="random layers (0: none)")
    p.add_argument("--blocks", type=int, nargs="*", default=[0, 15, 29], help="SmolLM2 blocks (none: skip)")
    p.add_argument("--batches", type=int, default=16, help="512-token calibration blocks (as many held out)")
    p.add_argument("--before", help="path of another gptq.py to compare")
    p.add_argument("--zero-point", choices=["float", "int"], default="float",
                   help="int: add integer-zero RTN and GPTQ columns")
    args = p.parse_args()
    sets = {"random": random_layers(args.random) if args.random else [],
            "smollm2": smollm2_layers(args.blocks, args.batches) if args.blocks else []}
    variants = variants_of(args.before, args.zero_point == "int")
    heads = [f"{k} {part}" for k in variants for part in ("calib", "held-out")]
    print("error / float RTN error, mean over layers (below 1: better than RTN)\n")
    print("| layers | bits | g | " + " | ".join(heads) + " |")
    print("|---|---|---|" + "---|" * len(heads))
    for name, layers in sets.items():
        if not layers:
            continue
        for bits in args.bits:
            for g in args.group_sizes:
                r = ratios(layers, bits, g, variants)
                cells = " | ".join(f"{r[k][0]:.3f} | {r[k][1]:.3f}" for k in variants)
                print(f"| {name} ({len(layers)}) | {bits} | {g} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
