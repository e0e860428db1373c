"""Models to evaluate: a qaft-train run's merged model, any HF model (optionally after PTQ), and where results go.

A run folder's merged model is read by :func:`qaft.deploy.checkpoint.load_merged` from the folder's own
``merged_model/`` (safetensors only: a downloaded run folder cannot run code). The record names it by a path
relative to the folder, so a copied or moved run folder is scored with its own model, never another run's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from qaft.data import lm_blocks, load_lm_texts, tokenize_texts
from qaft.deploy.checkpoint import (
    RUN_RECORD,
    deploy_merged,
    is_integer_model,
    load_merged,
    merged_model_dir,
    read_run,
)
from qaft.files import write_json
from qaft.methods import DEFAULT_TARGETS, GPTQOptions, gptq_quantize_model, ptq_model
from qaft.methods.act_kv import install_act_kv
from qaft.methods.smoothquant import check_alpha, smoothquant_quantize_model
from qaft.models import load_tokenizer
from qaft.quant.activation import OFF


def load_run_model(run_dir: Path | str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any, dict]:
    """``(merged model, tokenizer, record)`` of a finished qaft-train run."""
    record = read_run(run_dir)
    path = merged_model_dir(run_dir, record)
    model = load_merged(path, dtype)
    tokenizer = load_tokenizer(str(path)) if (path / "tokenizer_config.json").is_file() else load_tokenizer(
        record["model"])
    return model, tokenizer, record


def load_deployed(run_dir: Path | str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any, dict, dict]:
    """``(deployed model, tokenizer, record, form)``: the model the run's record scored as deployed (a float
    merge quantized by :func:`qaft.deploy.checkpoint.deploy_merged` at the record's bits and group size)."""
    model, tokenizer, record = load_run_model(run_dir, dtype)
    bits, group_size = record.get("bits"), record.get("group_size")
    if (bits is None or group_size is None) and not is_integer_model(model):
        raise ValueError(f"{run_dir}: record.json names no bits / group_size, so the deployed (+PTQ) form of its "
                         "float merge cannot be rebuilt")
    model, form = deploy_merged(model, bits or 0, group_size or 0)
    return model, tokenizer, record, form


def calibration_batches(tokenizer: Any, source: str, config: str | None, n_batches: int,
                        seq_len: int) -> list[torch.Tensor]:
    """``n_batches`` consecutive ``[1, seq_len]`` token blocks of a corpus's *training* split (GPTQ's data)."""
    texts = load_lm_texts(source, config)["train"]
    blocks = lm_blocks(tokenize_texts(tokenizer, texts, n_batches * seq_len), seq_len)
    if len(blocks) < n_batches:
        raise ValueError(f"{source} has only {len(blocks)} calibration blocks of {seq_len} tokens")
    return [b.unsqueeze(0) for b in blocks[:n_batches]]


def apply_ptq(model: nn.Module, tokenizer: Any, ptq: dict[str, Any], source: str, config: str | None) -> nn.Module:
    """RTN, GPTQ or SmoothQuant (``ptq.algorithm``) of a float model at ``ptq.bits`` / ``ptq.group_size``
    (``conf/eval.yaml``). ``ptq.act_bits`` / ``ptq.kv_bits`` below 16 first install the per-token activation / KV
    quantizers (SmoothQuant's W8A8 / W4A8KV8 rows), as ``qaft.apply_method`` does for a PTQ config."""
    bits, group_size, init, zero = int(ptq["bits"]), int(ptq["group_size"]), ptq["init"], ptq["zero_point"]
    alpha = check_alpha(ptq.get("smooth_alpha", 0.5))  # before any data is read
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in
               DEFAULT_TARGETS]
    install_act_kv(model, targets, int(ptq.get("act_bits", OFF)), int(ptq.get("kv_bits", OFF)))
    if ptq["algorithm"] == "rtn":
        return ptq_model(model, bits, group_size, init, inplace=True, zero_point=zero)
    options = GPTQOptions(**ptq["gptq"])
    # SmoothQuant takes the same data as GPTQ: ptq.gptq.calib_batches blocks of ptq.calib_seq_len tokens
    calib = calibration_batches(tokenizer, ptq.get("calib_source") or source, config, options.calib_batches,
                                int(ptq["calib_seq_len"]))
    if ptq["algorithm"] == "smoothquant":
        return smoothquant_quantize_model(model, calib, bits, group_size, alpha, init, zero_point=zero, inplace=True)
    return gptq_quantize_model(model, calib, bits, group_size, act_order=options.act_order,
                               percdamp=options.percdamp, init=init, inplace=True, zero_point=zero)


def add_eval_to_record(run_dir: Path | str, key: str, results: dict[str, Any]) -> Path:
    """Put ``results`` under ``record["eval"][key]``, keeping everything else in the record."""
    record = read_run(run_dir)
    record.setdefault("eval", {})[key] = results
    path = Path(run_dir) / RUN_RECORD
    write_json(path, record)
    return path


__all__ = ["add_eval_to_record", "apply_ptq", "calibration_batches", "load_deployed", "load_run_model", "read_run", "write_json"]
