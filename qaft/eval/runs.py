"""Models to evaluate: a qaft-train run's merged model, any HF model (optionally after PTQ), and where results go.

``qaft.pipeline.save_merged`` saves a float merged model as a Hugging Face folder (``merged_model/``) and an
integer one as ``merged_model.pt`` (state dict, HF config, qaft method config). The integer one is rebuilt here
by putting a ``QuantizedLinear`` of the right shape wherever the state dict has packed codes, so loading needs
neither the method's training layers nor calibration data.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qaft.data import lm_blocks, load_lm_texts, tokenize_texts
from qaft.methods.deploy import QuantizedLinear
from qaft.models import load_causal_lm, load_tokenizer

RECORD = "record.json"


def read_run(run_dir: Path | str) -> dict[str, Any]:
    path = Path(run_dir) / RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run_dir must be a qaft-train run folder")
    return json.loads(path.read_text())


def _integer_model(path: Path, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    saved = torch.load(path, map_location="cpu", weights_only=False)
    config = dict(saved["config"])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config), dtype=dtype)
    state, bits = saved["state_dict"], int(saved["qaft"]["bits"])
    for name, module in list(model.named_modules()):
        if f"{name}.qweight" in state and isinstance(module, nn.Linear):
            codes = torch.zeros(module.out_features, module.in_features, dtype=torch.int8)
            bias = state.get(f"{name}.bias")
            layer = QuantizedLinear(codes, state[f"{name}.scale"], state[f"{name}.offset"], bits, bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
    model.load_state_dict(state, strict=True)
    model.qaft_merged = True
    return model.eval()


def load_run_model(run_dir: Path | str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any, dict]:
    """``(merged model, tokenizer, record)`` of a finished qaft-train run."""
    record = read_run(run_dir)
    saved = record.get("metrics", {}).get("merged_model_path")
    if record.get("status") != "ok" or not saved:
        raise ValueError(f"run {run_dir} has no saved merged model (status={record.get('status')!r}; "
                         "train with save_model=true)")
    path = Path(saved) if Path(saved).is_absolute() else Path(run_dir) / Path(saved).name
    if path.suffix == ".pt":
        return _integer_model(path, dtype), load_tokenizer(record["model"]), record
    model, tokenizer = load_causal_lm(str(path), dtype)
    return model, tokenizer, record


def calibration_batches(tokenizer: Any, source: str, config: str | None, n_batches: int,
                        seq_len: int) -> list[torch.Tensor]:
    """``n_batches`` consecutive ``[1, seq_len]`` token blocks of a corpus's *training* split (GPTQ's data)."""
    texts = load_lm_texts(source, config)["train"]
    blocks = lm_blocks(tokenize_texts(tokenizer, texts, n_batches * seq_len), seq_len)
    if len(blocks) < n_batches:
        raise ValueError(f"{source} has only {len(blocks)} calibration blocks of {seq_len} tokens")
    return [b.unsqueeze(0) for b in blocks[:n_batches]]


def apply_ptq(model: nn.Module, tokenizer: Any, ptq: dict[str, Any], source: str, config: str | None) -> nn.Module:
    """RTN or GPTQ (``ptq.algorithm``) of a float model at ``ptq.bits`` / ``ptq.group_size``."""
    import qaft
    from qaft.methods.gptq_model import gptq_quantize_model

    bits, group_size = int(ptq["bits"]), int(ptq["group_size"])
    if ptq.get("algorithm", "rtn") == "rtn":
        return qaft.ptq_model(model, bits, group_size, ptq.get("init", "minmax"), inplace=True)
    calib = calibration_batches(tokenizer, ptq.get("calib_source") or source, config,
                                int(ptq.get("calib_batches", 16)), int(ptq.get("calib_seq_len", 512)))
    return gptq_quantize_model(model, calib, bits, group_size, act_order=bool(ptq.get("act_order", False)),
                               percdamp=float(ptq.get("percdamp", 0.01)), init=ptq.get("init", "minmax"),
                               inplace=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic write: a record must never be left half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def add_eval_to_record(run_dir: Path | str, key: str, results: dict[str, Any]) -> Path:
    """Put ``results`` under ``record["eval"][key]``, keeping everything else in the record."""
    record = read_run(run_dir)
    record.setdefault("eval", {})[key] = results
    path = Path(run_dir) / RECORD
    write_json(path, record)
    return path


__all__ = ["add_eval_to_record", "apply_ptq", "calibration_batches", "load_run_model", "read_run", "write_json"]
