"""Why "QLoRA + round-to-nearest PTQ" collapses: NF4's exact zeros sit on RTN ties.

QLoRA's merged weight is ``nf4(W) + BA``. NF4 has an exact 0 level; with blocks of 64 aligned to RTN groups
of 64 the group's min and max are ``-a`` and ``+a`` (the block's absmax is one of them, and NF4's range is
[-1, 1]), so asymmetric min-max RTN has ``s = 2a / (2^n - 1)``, ``b = a / (2^n - 1) = s / 2`` and a zero weight
lands at ``v = -b / s = -1/2``: exactly a tie. Every such zero rounds to the same side, a bias of ``s / 2``
shared by ~9% of the row: an error that adds up coherently instead of averaging out.

This prints, per layer of SmolLM2-135M at B = 0 (the start of QLoRA training; after 16 steps ``BA`` is tiny):
the share of exact zeros in ``nf4(W)``, the share of RTN ties, and the mean over rows of |mean signed RTN
error of the row| in units of the group scale, for RTN of ``nf4(W)`` and of ``W`` itself.

    python experiments/analysis/nf4_rtn_ties.py --bits 4 --group-size 64
"""
from __future__ import annotations

import argparse

import torch

from qaft.models import load_causal_lm
from qaft.quant.affine import _v, dequantize, quantize
from qaft.quant.granularity import grouped
from qaft.quant.init import init_scale_offset
from qaft.quant.nf4 import nf4_dequantize, nf4_quantize


def rtn_stats(w: torch.Tensor, bits: int, group_size: int) -> tuple[float, float]:
    """(share of exact ties, mean over rows of |row-mean signed error| / s) of min-max RTN of ``w``."""
    scale, offset = init_scale_offset(w, bits, group_size, "minmax", False)
    v = _v(w, scale, offset)  # the unrounded codes, as quantize computes them
    ties = ((v - v.floor()) == 0.5).float().mean().item()
    err = grouped(dequantize(quantize(w, scale, offset, bits), scale, offset) - w, scale.shape[-1])
    row_bias = (err / scale.unsqueeze(-1)).flatten(1).mean(-1).abs().mean().item()
    return ties, row_bias


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 3, 15, 29])
    args = p.parse_args()
    model = load_causal_lm("smollm2-135m")[0]
    print("| layer | nf4 zeros | ties nf4(W) | ties W | row bias nf4(W) / s | row bias W / s |")
    print("|---|---|---|---|---|---|")
    for i in args.layers:
        for name in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"):
            w = model.get_submodule(f"model.layers.{i}.{name}").weight.detach().float()
            w_nf4 = nf4_dequantize(nf4_quantize(w))
            zeros = (w_nf4 == 0).float().mean().item()
            (t_nf4, b_nf4), (t_w, b_w) = rtn_stats(w_nf4, args.bits, args.group_size), rtn_stats(w, args.bits,
                                                                                                 args.group_size)
            print(f"| {i}.{name} | {zeros:.3f} | {t_nf4:.3f} | {t_w:.4f} | {b_nf4:.3f} | {b_w:.3f} |")


if __name__ == "__main__":
    main()
