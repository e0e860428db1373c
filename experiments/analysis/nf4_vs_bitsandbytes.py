"""qaft's NF4 (plain and double quantized) against bitsandbytes, the QLoRA paper's implementation.

bitsandbytes is only the oracle here (qaft never imports it). For each weight kind and shape the table gives
the largest relative weight difference ``max |ours - bnb| / |bnb|`` over the entries where ``bnb != 0`` (NF4
codes agree, so this is the largest relative difference of a block's absmax constant), and the number of
double-quantized absmax codes that differ, against two bitsandbytes paths:

* ``native``: ``quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)`` as installed, whose
  CPU 8-bit kernel (used for the nested absmax step) looks codes up in a 65536-entry table over [-1, 1] instead
  of taking the nearest map value;
* ``reference``: the same call with the nested 8-bit step run by bitsandbytes' backend-neutral PyTorch kernel
  (its "default" backend: nearest map value at float32 midpoints, the rule of its CUDA kernel).

    python experiments/analysis/nf4_vs_bitsandbytes.py
    git show HEAD:qaft/quant/nf4.py > /tmp/nf4_before.py
    python experiments/analysis/nf4_vs_bitsandbytes.py --nf4-file /tmp/nf4_before.py   # an earlier qaft
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from unittest import mock

import torch

SHAPES = ((256, 512), (1000, 448), (4096, 4160))
REFERENCE_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def load_nf4(path: str | None):
    if path is None:
        import qaft.quant.nf4 as nf4
        return nf4
    spec = importlib.util.spec_from_file_location("nf4_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def weights(kind: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(*shape, generator=g)
    # Student-t, 2 degrees of freedom: normal / sqrt(chi2_2 / 2), chi2_2 = -2 log(uniform).
    chi2 = -2 * torch.rand(*shape, generator=g).clamp_min(1e-12).log()
    return torch.randn(*shape, generator=g) / (chi2 / 2).sqrt()


def bnb_nf4(w: torch.Tensor, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' double-quantized NF4 of ``w``: (dequantized weight, uint8 absmax codes)."""
    import bitsandbytes.functional as F

    original = F.quantize_blockwise

    def reference(A, code=None, absmax=None, out=None, blocksize=4096, nested=False):
        _, state = original(A, code=code, blocksize=blocksize, nested=nested)
        codes, state.absmax = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
            REFERENCE_KEYS, A, state.code, blocksize)
        return codes, state

    with mock.patch.object(F, "quantize_blockwise", reference if path == "reference" else original):
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    return F.dequantize_4bit(packed, state), state.absmax


def max_rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    nonzero = ref != 0
    return ((ours - ref).abs()[nonzero] / ref.abs()[nonzero]).max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nf4-file", help="an nf4.py to measure instead of qaft.quant.nf4")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    nf4 = load_nf4(args.nf4_file)
    import bitsandbytes.functional as F
    print("| weights | shape | absmax blocks | rel. diff vs native | codes differing vs native "
          "| rel. diff vs reference | codes differing vs reference | plain NF4 rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in ("gaussian", "student-t df=2"):
        for shape in SHAPES:
            w = weights(kind, shape, args.seed)
            t = nf4.nf4_quantize(w, double_quant=True)
            ours = nf4.nf4_dequantize(t)
            cells = []
            for path in ("native", "reference"):
                expected, codes = bnb_nf4(w, path)
                same_kind = t.absmax_codes.dtype == codes.dtype
                differing = f"{(t.absmax_codes != codes).sum().item()}" if same_kind else "n/a (int8 codes)"
                cells += [f"{max_rel(ours, expected):.2e}", differing]
            packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
            plain = max_rel(nf4.nf4_dequantize(nf4.nf4_quantize(w)), F.dequantize_4bit(packed, state))
            print(f"| {kind} | {shape[0]}x{shape[1]} | {w.numel() // 64} | " + " | ".join(cells) + f" | {plain:.2e} |")


if __name__ == "__main__":
    main()
