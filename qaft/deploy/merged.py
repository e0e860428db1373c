"""A run's merged model on disk, and the one rule for which model a run deploys.

A method merges either into integer layers (L4Q, DL-QAT, QA-LoRA, PTQ, QAT: :func:`is_integer_model`; the merged
model *is* the deployed one) or into a float model (LoRA, QLoRA, LoftQ, QAT-LoRA), deployed by round-to-nearest
PTQ at the run's bits and group size (:data:`FLOAT_MERGE_PTQ`, the papers' "+PTQ" rows): :func:`deploy_merged`,
which the end of a run, ``qaft-eval run_dir=...`` and ``qaft-export`` all apply.

:func:`save_merged` writes an integer model as the packed format (:mod:`qaft.deploy.packed`) and a float one with
``save_pretrained`` (safetensors, plus ``activations.json`` where it quantizes activations or the KV cache), into a
temporary folder renamed into place, and returns the SHA-256 of every file it wrote; :func:`load_merged` reads it
back (safetensors only: nothing here reads a pickle) and, given those digests (the run record keeps them), refuses
a folder whose files changed since.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from qaft.deploy.packed import QUANT_FILE, is_integer_model, load_folder_tokenizer, load_quantized, save_quantized
from qaft.files import atomic_folder, sha256_file
from qaft.methods import ptq_model
from qaft.methods.act_kv import act_kv_layout, has_act_kv, restore_act_kv
from qaft.models import load_tokenizer
from qaft.run_folder import RunFolder

ACTIVATIONS_FILE = "activations.json"  # beside a float (save_pretrained) model that quantizes activations / KV
# A float merge (LoRA, QLoRA, LoftQ, QAT-LoRA) is deployed by round-to-nearest PTQ at the run's bits and group
# size, min-max scale and float offset: the papers' "+PTQ" rows, scored at the end of a run as ``merged_ptq``.
FLOAT_MERGE_PTQ = {"algorithm": "rtn", "init": "minmax", "zero_point": "float"}
MERGED_FORM, MERGED_PTQ_FORM = "merged", "merged+ptq"  # the deployed forms' names in records and qaft-eval
MERGED_DIGESTS = "merged_model_sha256"  # the record's metrics key: {file name: sha256} of the saved model


class ModelChanged(ValueError):
    """A merged model folder whose files are not the ones the run wrote (one line, naming the file)."""


def folder_digests(path: Path) -> dict[str, str]:
    """``{file name: sha256}`` of every file directly in ``path``."""
    return {p.name: sha256_file(p) for p in sorted(Path(path).iterdir()) if p.is_file()}


def save_merged(merged: PreTrainedModel, path: str | Path, tokenizer: Any = None) -> dict[str, str]:
    """Write a merged model as a folder (packed for an integer model, ``save_pretrained`` for a float one),
    beside ``path`` and renamed into place, so a kill never leaves a half-written model; returns
    :func:`folder_digests` of what was written."""
    with atomic_folder(path) as tmp:
        if is_integer_model(merged):
            save_quantized(merged, tmp, tokenizer)
        else:
            merged.save_pretrained(str(tmp), safe_serialization=True)
            if has_act_kv(merged):
                (tmp / ACTIVATIONS_FILE).write_text(json.dumps(act_kv_layout(merged), indent=1))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        digests = folder_digests(tmp)
    return digests


def check_digests(path: Path, digests: dict[str, str]) -> None:
    """Every file the run wrote is there and unchanged (:class:`ModelChanged` names the first that is not)."""
    for name, digest in digests.items():
        file = path / name
        if not file.is_file() or file.is_symlink():
            raise ModelChanged(f"{file}: missing from the run's merged model")
        if sha256_file(file) != digest:
            raise ModelChanged(f"{file}: changed since the run wrote it (its SHA-256 is not the record's)")


def load_merged(path: str | Path, dtype: torch.dtype = torch.float32,
                digests: dict[str, str] | None = None) -> PreTrainedModel:
    """Read what :func:`save_merged` wrote (safetensors only), in eval mode; with ``digests`` (what
    :func:`save_merged` returned), only if every file is unchanged."""
    path = Path(path)
    if digests:
        check_digests(path, digests)
    if (path / QUANT_FILE).is_file():
        return load_quantized(path)
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path}: no safetensors model (qaft never reads pickled weights: they can run code)")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
    if (path / ACTIVATIONS_FILE).is_file():
        restore_act_kv(model, json.loads((path / ACTIVATIONS_FILE).read_text()))
    return model.eval()


def load_run_model(run_dir: Path | str, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, Any, dict]:
    """``(merged model, tokenizer, record)`` of a finished run: the folder's own ``merged_model/``, checked against
    the digests its record holds (records written before digests existed are read without that check)."""
    folder = RunFolder(run_dir)
    record = folder.record()
    path = folder.merged_model(record)
    model = load_merged(path, dtype, record["metrics"].get(MERGED_DIGESTS))
    saved_tokenizer = (path / "tokenizer_config.json").is_file()
    return model, load_folder_tokenizer(path) if saved_tokenizer else load_tokenizer(record["model"]), record


def load_deployed(run_dir: Path | str, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, Any, dict, dict]:
    """``(deployed model, tokenizer, record, form)``: the model the run's record scored as deployed (a float
    merge quantized by :func:`deploy_merged` at the record's bits and group size)."""
    model, tokenizer, record = load_run_model(run_dir, dtype)
    bits, group_size = record.get("bits"), record.get("group_size")
    if (bits is None or group_size is None) and not is_integer_model(model):
        raise ValueError(f"{run_dir}: its record names no bits / group_size, so the deployed (+PTQ) form of its "
                         "float merge cannot be rebuilt")
    model, form = deploy_merged(model, bits or 0, group_size or 0)
    return model, tokenizer, record, form


def deployed_form(integer_merge: bool, bits: int, group_size: int) -> dict[str, Any]:
    """What a run deploys, as its record and ``qaft-eval`` name it: ``merged``, or ``merged+ptq`` and how."""
    if integer_merge:
        return {"form": MERGED_FORM}
    return {"form": MERGED_PTQ_FORM, "ptq": {**FLOAT_MERGE_PTQ, "bits": int(bits), "group_size": int(group_size)}}


def deploy_merged(merged: PreTrainedModel, bits: int, group_size: int) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The deployed model of a merged one (a float merge is quantized in place) and its :func:`deployed_form`."""
    form = deployed_form(is_integer_model(merged), bits, group_size)
    if "ptq" in form:
        merged = ptq_model(merged, int(bits), int(group_size), FLOAT_MERGE_PTQ["init"], inplace=True,
                           zero_point=FLOAT_MERGE_PTQ["zero_point"])
    return merged, form


__all__ = [
    "ACTIVATIONS_FILE", "FLOAT_MERGE_PTQ", "MERGED_DIGESTS", "MERGED_FORM", "MERGED_PTQ_FORM", "ModelChanged",
    "check_digests", "deploy_merged", "deployed_form", "folder_digests", "load_deployed", "load_merged",
    "load_run_model", "save_merged",
]
