"""Bytes on disk of every export of one run: ``format=qaft``, ``hf``, ``gguf`` and ``compressed-tensors``.

Each export is written by ``qaft-export`` (:func:`qaft.deploy.cli.main`) into a temporary folder, then measured:
the weights (``*.safetensors`` / the ``.gguf`` file) and everything the export holds (configs, tokenizer). A run
with float offsets is written to compressed-tensors with ``approximate=true`` (same size: the layout does not
depend on the zero point's values; the table says so). Codes per byte: ``format=qaft`` and compressed-tensors pack
``8 / bits`` codes per byte (compressed-tensors in int32 words), ``format=hf`` stores one int8 per code, GGUF's Q4_1
a nibble per code plus fp16 scale and offset per block of 32.

    python experiments/bench/export_sizes.py runs/<run> [--dtype bfloat16] [--json results/export_sizes.json]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path

from qaft.deploy.cli import FORMATS
from qaft.deploy.cli import main as export_main

WEIGHT_SUFFIXES = (".safetensors", ".gguf")


def _bytes(path: Path) -> tuple[int, int]:
    """``(weight bytes, total bytes)`` of an export (a folder or one file)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    weights = sum(p.stat().st_size for p in files if p.suffix in WEIGHT_SUFFIXES)
    return weights, sum(p.stat().st_size for p in files)


def export_sizes(run_dir: Path, formats: tuple[str, ...] = FORMATS, dtype: str = "float32") -> dict[str, dict]:
    """Per format: ``weights_bytes``, ``total_bytes`` and the exporter's own line, or ``error`` where it refused.
    ``dtype``: the float tensors' dtype of ``format=hf`` and compressed-tensors (the others have their own)."""
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in formats:
            out = Path(tmp) / (f"{fmt}.gguf" if fmt == "gguf" else fmt)
            args = [str(run_dir), f"format={fmt}", f"out={out}"]
            if fmt in ("hf", "compressed-tensors"):
                args.append(f"dtype={dtype}")
            if fmt == "compressed-tensors":
                args.append("approximate=true")
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                code = export_main(args)
            if code:
                sizes[fmt] = {"error": stderr.getvalue().strip().splitlines()[-1]}
                continue
            weights, total = _bytes(out)
            said = [line for line in stdout.getvalue().splitlines() if line and not line.startswith("wrote ")]
            sizes[fmt] = {"weights_bytes": weights, "total_bytes": total, "note": said[0] if said else ""}
    return sizes


def markdown(sizes: dict[str, dict]) -> str:
    lines = ["| format | weights, MB | whole export, MB | exporter says |", "|---|---|---|---|"]
    for fmt, row in sizes.items():
        if "error" in row:
            lines.append(f"| {fmt} | refused | | {row['error']} |")
        else:
            lines.append(f"| {fmt} | {row['weights_bytes'] / 1e6:.2f} | {row['total_bytes'] / 1e6:.2f} | {row['note']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="float tensors of format=hf and compressed-tensors (default: float32, their default)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    sizes = export_sizes(args.run_dir, dtype=args.dtype)
    print(markdown(sizes))
    if args.json:
        args.json.write_text(json.dumps({"run": args.run_dir.name, "dtype": args.dtype, "sizes": sizes}, indent=1) + "\n")


if __name__ == "__main__":
    main()
