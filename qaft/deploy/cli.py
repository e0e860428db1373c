"""``qaft-export``: a finished run folder -> a deployable artifact (Hugging Face, packed qaft checkpoint or GGUF).

    qaft-export runs/<run> format=hf    [out=PATH] [dtype=float32|bfloat16|float16]
                                                       # folder transformers loads (torchao), no qaft needed
    qaft-export runs/<run> format=qaft  [out=PATH]     # folder: model.safetensors + quantization.json
    qaft-export runs/<run> format=gguf  [out=PATH]     # one .gguf file (<=4-bit g%32 layers as Q4_1)
                [approximate=true | allow_float=true]   # other layouts: closest GGUF type / F16

Reads the run folder's ``merged_model/`` (:func:`qaft.deploy.checkpoint.load_merged`, safetensors only): an
integer model as it is, a float-merged one as the run deployed it (round-to-nearest PTQ at the run's
``method.bits`` / ``method.group_size`` from ``config.yaml``: :func:`qaft.deploy.checkpoint.deploy_merged`).
A folder written by ``save_quantized`` (with ``quantization.json``) is accepted as the run folder too. Options are ``key=value`` (``--key value`` works as well); the first other
argument is the run folder, whatever characters its name holds.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from qaft.deploy.checkpoint import (
    QUANT_FILE,
    deploy_merged,
    load_merged,
    load_quantized,
    merged_model_dir,
    read_run,
    save_quantized,
)
from qaft.deploy.hf_export import check_exportable, export_hf
from qaft.models import load_tokenizer
from qaft.quiet import silence_third_party_noise

silence_third_party_noise()  # known library noise out of the output (qaft.quiet)
FORMATS = ("qaft", "hf", "gguf")
HF_DTYPES = ("float32", "bfloat16", "float16")
FLAGS = ("approximate", "allow_float")  # gguf only: how layers with no exact GGUF type are written
USAGE = ("usage: qaft-export RUN_DIR [format=qaft|hf|gguf] [out=PATH] [dtype=float32|bfloat16|float16 (format=hf)] "
         "[approximate=true] [allow_float=true] (format=gguf)")


def load_run(run_dir: Path) -> tuple[torch.nn.Module, object | None]:
    """The merged integer model of a run folder and its tokenizer (if it can be found)."""
    if (run_dir / QUANT_FILE).is_file():
        return load_quantized(run_dir), load_tokenizer(str(run_dir))
    cfg = OmegaConf.load(run_dir / "config.yaml")
    model = load_merged(merged_model_dir(run_dir, read_run(run_dir)))
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    return deploy_merged(model, int(cfg.method.bits), int(cfg.method.group_size))[0], tokenizer


def parse_args(argv: list[str]) -> tuple[Path, dict[str, str | None]]:
    """``RUN_DIR`` and the ``key=value`` options (``ValueError`` with a one-line reason on anything else)."""
    options: dict[str, str | None] = {"format": "qaft", "out": None, "dtype": "float32",
                                      **dict.fromkeys(FLAGS, "false")}
    run_dir, rest = None, list(argv)
    while rest:
        arg = rest.pop(0)
        match = re.fullmatch(r"(?:--)?(format|out|dtype|approximate|allow_float)(?:=(.*))?", arg)
        if match and (match.group(2) is not None or arg.startswith("--")):
            options[match.group(1)] = match.group(2) if match.group(2) is not None else (rest.pop(0) if rest else "")
        elif run_dir is None and not arg.startswith("-"):
            run_dir = Path(arg)
        else:
            raise ValueError(f"unexpected argument {arg!r}")
    if run_dir is None:
        raise ValueError("missing RUN_DIR")
    if options["format"] not in FORMATS:
        raise ValueError(f"format={options['format']!r} must be one of {FORMATS}")
    if options["dtype"] not in HF_DTYPES:
        raise ValueError(f"dtype={options['dtype']!r} must be one of {HF_DTYPES}")
    for flag in FLAGS:
        if options[flag] not in ("true", "false"):
            raise ValueError(f"{flag}={options[flag]!r} must be true or false")
    return run_dir, options


def main(argv: list[str] | None = None) -> int:
    """Console entry point; 0 on success, 2 on a usage error or an unreadable run folder."""
    try:
        run_dir, options = parse_args(sys.argv[1:] if argv is None else argv)
        model, tokenizer = load_run(run_dir)
        if options["format"] == "hf":
            check_exportable(model)
    except (ValueError, FileNotFoundError) as err:
        print(f"qaft-export: {err}\n{USAGE}", file=sys.stderr)
        return 2
    out = Path(options["out"]) if options["out"] else None
    if options["format"] == "qaft":
        written = save_quantized(model, out or run_dir / "export_qaft", tokenizer)
    elif options["format"] == "hf":
        written, zeros = export_hf(model, out or run_dir / "export_hf", tokenizer, getattr(torch, options["dtype"]))
        kind = "integer" if all(zeros.values()) else "float" if not any(zeros.values()) else "integer/float"
        print(f"{len(zeros)} integer layers as torchao IntxUnpackedToInt8Tensor ({kind} zero point), codes exact")
    else:
        from qaft.deploy.gguf_export import export_gguf
        flags = {flag: options[flag] == "true" for flag in FLAGS}
        try:
            written = export_gguf(model, out or run_dir / "export.gguf", tokenizer, name=run_dir.name, **flags)
        except ValueError as err:  # a layout or architecture GGUF cannot hold: one line, nothing written
            print(f"qaft-export: {err}", file=sys.stderr)
            return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
