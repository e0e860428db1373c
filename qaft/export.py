"""``qaft-export``: a finished run folder -> a deployable artifact (packed qaft checkpoint or GGUF).

    qaft-export runs/<run> format=qaft  [out=PATH]     # folder: model.safetensors + quantization.json
    qaft-export runs/<run> format=gguf  [out=PATH]     # one .gguf file (4-bit g%32 layers as Q4_1)

Reads what ``qaft.pipeline.save_merged`` leaves in the run folder: ``merged_model.pt`` (integer models:
state dict, HF config dict and the method config) or ``merged_model/`` (float-merged methods, deployed by
round-to-nearest PTQ at the run's ``method.bits`` / ``method.group_size`` from ``config.yaml``). A folder
written by ``save_quantized`` (with ``quantization.json``) is accepted as the run folder too.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM

from qaft.deploy.checkpoint import QUANT_FILE, build_skeleton, load_quantized, save_quantized
from qaft.models import load_tokenizer


def _from_state(path: Path) -> torch.nn.Module:
    saved = torch.load(path, map_location="cpu", weights_only=False)
    state, bits = saved["state_dict"], int(saved["qaft"]["bits"])
    config = AutoConfig.for_model(**saved["config"])
    skeleton = build_skeleton(config, {})
    layers = {}
    for key in (k for k in state if k.endswith(".qweight")):
        name = key[: -len(".qweight")]
        in_f = skeleton.get_submodule(name).in_features  # packed width does not say it for 3 bits
        layers[name] = {"bits": bits, "group_size": in_f // state[f"{name}.scale"].shape[1], "in_features": in_f,
                        "out_features": state[key].shape[0], "bias": f"{name}.bias" in state}
    model = build_skeleton(config, layers)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def load_run(run_dir: Path) -> tuple[torch.nn.Module, object | None]:
    """The merged integer model of a run folder and its tokenizer (if it can be found)."""
    if (run_dir / QUANT_FILE).is_file():
        return load_quantized(run_dir), load_tokenizer(str(run_dir))
    cfg = OmegaConf.load(run_dir / "config.yaml")
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    if (run_dir / "merged_model.pt").is_file():
        return _from_state(run_dir / "merged_model.pt"), tokenizer
    if (run_dir / "merged_model").is_dir():
        import qaft
        model = AutoModelForCausalLM.from_pretrained(str(run_dir / "merged_model"), dtype=torch.float32)
        return qaft.ptq_model(model, int(cfg.method.bits), int(cfg.method.group_size)), tokenizer
    raise FileNotFoundError(f"{run_dir}: no merged model (run with save_model=true) and no {QUANT_FILE}")


def main(argv: list[str] | None = None) -> Path:
    # Accept Hydra-style key=value as well as --key value.
    argv = [f"--{a}" if "=" in a and not a.startswith("-") else a for a in (sys.argv[1:] if argv is None else argv)]
    p = argparse.ArgumentParser(prog="qaft-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--format", choices=("qaft", "gguf"), default="qaft")
    p.add_argument("--out", type=Path, default=None, help="default: <run_dir>/export_<format>[.gguf]")
    args = p.parse_args(argv)
    model, tokenizer = load_run(args.run_dir)
    if args.format == "qaft":
        out = save_quantized(model, args.out or args.run_dir / "export_qaft", tokenizer)
    else:
        from qaft.deploy.gguf_export import export_gguf
        out = export_gguf(model, args.out or args.run_dir / "export.gguf", name=args.run_dir.name)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
