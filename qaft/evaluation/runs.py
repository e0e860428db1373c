"""Models to evaluate: a qaft-train run's deployed model, or any HF model (optionally after PTQ).

A run folder's merged model is read by :func:`qaft.deploy.merged.load_run_model` from the folder's own
``merged_model/`` (safetensors only: a downloaded run folder cannot run code), checked against the digests its
record holds, so a copied or moved run folder is scored with its own model, never another run's or an edited one.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qaft.data import lm_blocks, load_lm_texts, tokenize_texts
from qaft.deploy.merged import load_deployed, load_run_model
from qaft.methods import DEFAULT_TARGETS, GPTQOptions, gptq_quantize_model, ptq_model
from qaft.methods.act_kv import install_act_kv
from qaft.methods.smoothquant import check_alpha, smoothquant_quantize_model
from qaft.methods.targets import resolve_targets
from qaft.quant.activation import OFF


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
    targets = list(resolve_targets(model, DEFAULT_TARGETS).quantized)
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


__all__ = ["apply_ptq", "calibration_batches", "load_deployed", "load_run_model"]
