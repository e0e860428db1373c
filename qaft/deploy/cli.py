"""``qaft-export``: a finished run folder -> a deployable artifact (Hugging Face, compressed-tensors, packed qaft
folder or GGUF).

    qaft-export runs/<run> format=hf    [out=PATH] [dtype=float32|bfloat16|float16]
                                                       # folder transformers loads (torchao), no qaft needed
    qaft-export runs/<run> format=qaft  [out=PATH]     # folder: model.safetensors + quantization.json
    qaft-export runs/<run> format=gguf  [out=PATH]     # one .gguf file (<=4-bit g%32 layers as Q4_1)
                [approximate=true | allow_float=true]   # other layouts: closest GGUF type / F16
    qaft-export runs/<run> format=compressed-tensors [out=PATH] [dtype=...]
                                                       # vLLM / transformers pack-quantized folder
                [approximate=true]                      # float offsets: their nearest integer-zero grid
                [overwrite=true]                        # replace an existing export / out=PATH

Reads the run folder's ``merged_model/`` (:func:`qaft.deploy.merged.load_merged`, safetensors only): an
integer model as it is, a float-merged one as the run deployed it (round-to-nearest PTQ at the record's
``bits`` / ``group_size``: :func:`qaft.deploy.merged.deploy_merged`).
A folder written by ``save_quantized`` (with ``quantization.json``) is accepted as the run folder too. Options
are ``key=value`` (``--key value`` works as well); the first other argument is the run folder, whatever
characters its name holds.

An export is written whole or not at all (:func:`qaft.files.atomic_folder` / :func:`~qaft.files.atomic_file`):
killed midway, it leaves the previous export or none, and its debris is removed by the next export of the run.
The destination is checked before the model is loaded: an existing one (the default ``export_*`` slot or
``out=``), or a path in the run folder that is not an export slot (``checkpoints/``, ``config.yaml``, ...), is
refused in one line (exit 2) unless ``overwrite=true``; the run's record and merged model, and any folder holding
them, are refused even then.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from qaft import cli_help
from qaft.quiet import silence_third_party_noise

if TYPE_CHECKING:  # torch and the model code load only once an export is asked for: --help answers without them
    import torch

silence_third_party_noise()  # known library noise out of the output (qaft.quiet)
SLOTS = {"qaft": "export_qaft", "hf": "export_hf", "gguf": "export.gguf", "compressed-tensors": "export_ct"}  # each format's place in the run folder
FORMATS = tuple(SLOTS)
HF_DTYPES = ("float32", "bfloat16", "float16")
FLAGS = ("approximate", "allow_float")  # gguf: how layers with no exact GGUF type are written (ct: approximate)
SWITCHES = (*FLAGS, "overwrite")
USAGE = ("usage: qaft-export RUN_DIR [format=qaft|hf|gguf|compressed-tensors] [out=PATH] [overwrite=true] "
         "[dtype=float32|bfloat16|float16 (format=hf|compressed-tensors)] [approximate=true] "
         "(format=gguf|compressed-tensors) [allow_float=true] (format=gguf)")
KEYS = {  # qaft-export --help: one line per argument
    "RUN_DIR": "a finished run folder (or a packed folder written by save_quantized); the first non-key argument",
    "format": "qaft (packed folder, default) | hf (folder transformers loads, with torchao) | gguf (one .gguf file) "
              "| compressed-tensors (pack-quantized folder that transformers and vLLM load)",
    "out": f"where to write (default: the format's slot in the run folder: {', '.join(SLOTS.values())})",
    "dtype": "format=hf|compressed-tensors: float32 (default) | bfloat16 | float16, for the layers kept in float",
    "approximate": "format=gguf: true writes layers with no exact GGUF type as the closest type; "
                   "format=compressed-tensors: true writes a float-offset grid on the nearest integer-zero grid "
                   "(its measured error in the export's metadata)",
    "allow_float": "format=gguf only: true writes layers with no exact GGUF type as F16",
    "overwrite": "true replaces an existing export at out= (never the run's record or merged model)",
}


def help_text() -> str:
    """``qaft-export --help``: usage, each argument on one line, the README's examples."""
    keys = [f"{key:<12} {text}" for key, text in KEYS.items()]
    return cli_help.page(USAGE, cli_help.section("Arguments (key=value, or --key value)", keys),
                         cli_help.examples_section("qaft-export"))


def load_run(run_dir: Path) -> tuple[torch.nn.Module, object | None]:
    """The deployed model of a run folder (its integer merge, or its float merge after the run's RTN) and its
    tokenizer; a folder written by ``save_quantized`` is accepted as it is."""
    from qaft.deploy.merged import load_deployed
    from qaft.deploy.packed import QUANT_FILE, load_folder_tokenizer, load_quantized

    if (run_dir / QUANT_FILE).is_file():
        return load_quantized(run_dir), load_folder_tokenizer(run_dir)
    model, tokenizer, _, _ = load_deployed(run_dir)
    return model, tokenizer


def parse_args(argv: list[str]) -> tuple[Path, dict[str, str | None]]:
    """``RUN_DIR`` and the ``key=value`` options (``ValueError`` with a one-line reason on anything else)."""
    options: dict[str, str | None] = {"format": "qaft", "out": None, "dtype": "float32",
                                      **dict.fromkeys(SWITCHES, "false")}
    run_dir, rest = None, list(argv)
    while rest:
        arg = rest.pop(0)
        match = re.fullmatch(r"(?:--)?(format|out|dtype|approximate|allow_float|overwrite)(?:=(.*))?", arg)
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
    for flag in SWITCHES:
        if options[flag] not in ("true", "false"):
            raise ValueError(f"{flag}={options[flag]!r} must be true or false")
    return run_dir, options


def _kept(run_dir: Path) -> list[Path]:
    """What an export never replaces: the run's record and merged model (or a packed folder's own model)."""
    from qaft.deploy.packed import QUANT_FILE, WEIGHTS_FILE
    from qaft.run_folder import RunFolder

    if (run_dir / QUANT_FILE).is_file():
        return [run_dir / QUANT_FILE, run_dir / WEIGHTS_FILE]
    folder = RunFolder(run_dir)
    return [folder.record_path, folder.merged_model()]


def destination(run_dir: Path, options: dict[str, str | None]) -> Path:
    """Where the export goes (``out=`` or the format's slot in the run folder); ``ValueError`` (one line) for a
    destination it may not replace. Checked before the model is loaded."""
    out = Path(options["out"]) if options["out"] else run_dir / SLOTS[str(options["format"])]
    target, run, overwrite = out.resolve(), run_dir.resolve(), options["overwrite"] == "true"
    for kept in _kept(run_dir):
        kept = kept.resolve()
        if target == kept or kept in target.parents or target in kept.parents:
            raise ValueError(f"out={out} would overwrite {kept}, the run's own, which is refused even with "
                             "overwrite=true: choose another path")
    if run in target.parents and target.relative_to(run).parts[0] not in SLOTS.values() and not overwrite:
        raise ValueError(f"out={out} is in the run folder but is not an export slot ({', '.join(SLOTS.values())}); "
                         "pass overwrite=true to write there anyway")
    if os.path.lexists(out) and not overwrite:
        raise ValueError(f"{out} exists; pass overwrite=true to replace it")
    return out


def export(model: torch.nn.Module, tokenizer: object | None, run_dir: Path, out: Path,
           options: dict[str, str | None]) -> Path:
    """Write the export, whole or not at all, after removing what killed exports of this run left behind."""
    import torch

    from qaft.deploy.hf_export import export_hf
    from qaft.deploy.packed import save_quantized
    from qaft.files import atomic_folder, remove_stale_temporaries

    remove_stale_temporaries(run_dir, SLOTS.values())
    remove_stale_temporaries(out.parent, [out.name])
    if options["format"] == "qaft":
        with atomic_folder(out) as tmp:
            save_quantized(model, tmp, tokenizer)
    elif options["format"] == "hf":
        zeros = export_hf(model, out, tokenizer, getattr(torch, str(options["dtype"])))[1]
        kind = "integer" if all(zeros.values()) else "float" if not any(zeros.values()) else "integer/float"
        print(f"{len(zeros)} integer layers as torchao IntxUnpackedToInt8Tensor ({kind} zero point), codes exact")
    elif options["format"] == "compressed-tensors":
        from qaft.deploy.ct_export import export_compressed_tensors

        meta = export_compressed_tensors(model, out, tokenizer, getattr(torch, str(options["dtype"])),
                                         approximate=options["approximate"] == "true")[1]
        error = meta["approximation"] and meta["approximation"]["logit_error"]["relative_rms"]
        print(f"{meta['layers']} integer layers as compressed-tensors {meta['format'].split()[-1]} "
              f"({'symmetric' if meta['symmetric'] else 'integer zero point'}), "
              + ("codes exact" if error is None else f"approximate: logits {error:.2e} relative RMS"))
    else:
        from qaft.deploy.gguf_export import export_gguf
        export_gguf(model, out, tokenizer, name=run_dir.name, **{flag: options[flag] == "true" for flag in FLAGS})
    return out


def main(argv: list[str] | None = None) -> int:
    """Console entry point; 0 on success (or ``--help``), 2 on a usage error (a Hydra flag too), an unreadable run
    folder or a refused ``out=``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if cli_help.wants_help(argv):
        print(help_text(), end="")
        return 0
    if flag := cli_help.hydra_flag(argv):
        print(cli_help.refuse_hydra_flag("qaft-export", flag), file=sys.stderr)
        return 2
    try:
        run_dir, options = parse_args(argv)
    except ValueError as err:
        print(f"qaft-export: {err}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        out = destination(run_dir, options)
        model, tokenizer = load_run(run_dir)
        if options["format"] == "hf":
            from qaft.deploy.hf_export import check_exportable

            check_exportable(model)
        elif options["format"] == "compressed-tensors":
            from qaft.deploy.ct_export import check_exportable as check_ct_exportable

            check_ct_exportable(model)
        written = export(model, tokenizer, run_dir, out, options)
    except (ValueError, FileNotFoundError) as err:  # a layout GGUF cannot hold too: one line, nothing written
        print(f"qaft-export: {err}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
