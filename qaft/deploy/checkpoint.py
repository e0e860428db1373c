"""The packed integer checkpoint: what a merged qaft model is on disk.

A folder holding

* ``model.safetensors``: every tensor of the merged model's state dict. Integer layers contribute
  ``<name>.qweight`` (uint8, packed unsigned codes ``u = q + 2^(n-1)``, ``n`` bits each, see
  :mod:`qaft.quant.packing`), ``<name>.scale`` and ``<name>.offset`` (float32, out x n_groups) and
  ``<name>.bias`` when present; embeddings, norms and float linears are stored as they are. Tied tensors
  are stored once.
* ``quantization.json``: format name and version, the layout in words, and per integer layer its bits,
  group size, shape and whether it has a bias (what is needed to rebuild the modules before loading); for a
  model that quantizes activations or the KV cache (W-A-KV, version 2), ``activations``: ``act_bits``,
  ``kv_bits`` and the layers whose inputs / outputs they quantize (:func:`qaft.methods.act_kv.act_kv_layout`).
* ``hf_config.json`` (the model's transformers config) and, when given, the tokenizer files;
* ``config.json``, a stub that transformers refuses with a message naming this format: its ``model_type``
  says how to load the folder. A plain ``AutoModelForCausalLM.from_pretrained`` (or ``lm_eval --model hf``)
  would otherwise build the architecture, find no ``.weight`` for the integer layers and run with random
  ones, exit status 0; ``qaft-export format=hf`` writes the folder transformers loads. Folders from before
  the stub hold the transformers config in ``config.json``; they still load here.

``load_quantized`` rebuilds the Hugging Face skeleton from ``hf_config.json`` without initialising weights,
installs :class:`~qaft.quant.linear.QuantizedLinear` modules and loads the tensors by assignment, so the
loaded model computes exactly what the saved one did.

A run's merged model (:func:`save_merged` / :func:`load_merged`, the one reader of what ``qaft-train`` saves)
is this folder for an integer model and a ``save_pretrained`` safetensors folder for a float one (plus
``activations.json``, the same ``activations`` record, where a float model quantizes activations or KV). Nothing
here reads a pickle: a downloaded run folder cannot run code.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from qaft.methods import ptq_model
from qaft.methods.act_kv import act_kv_layout, has_act_kv, restore_act_kv
from qaft.quant.linear import QuantizedLinear

FORMAT = "qaft-packed"
VERSION = 2
# Weight-only checkpoints stay version 1, readable by a qaft that predates activation quantization; one that
# quantizes activations is version 2, so such a qaft refuses it rather than run it without its quantizers.
WEIGHT_ONLY_VERSION = 1
ACTIVATIONS_FILE = "activations.json"  # beside a float (save_pretrained) model that quantizes activations / KV
WEIGHTS_FILE = "model.safetensors"
QUANT_FILE = "quantization.json"
HF_CONFIG_FILE = "hf_config.json"  # the transformers config of a packed folder (config.json is the stub)
# What transformers prints when asked to load a packed folder ("... has model type `<this>` but Transformers
# does not recognize this architecture"): the one thing a user of the folder must learn.
STUB_MODEL_TYPE = ("qaft-packed (a qaft integer checkpoint, not a transformers format: load it with "
                   "qaft.deploy.load_quantized, or export the run with 'qaft-export RUN format=hf' for transformers)")
RUN_RECORD = "record.json"  # what qaft-train leaves in a run folder
LAYOUT = (
    "W[o, i] = scale[o, i // group_size] * (u[o, i] - 2^(bits-1)) + offset[o, i // group_size]; "
    "u unsigned, packed big-endian along the input dimension, 8 codes per `bits` bytes "
    "(4 bits: two codes per byte, even column in the high nibble); 8 bits: one code per byte."
)


def _layer_entries(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {name: {"bits": m.bits, "group_size": m.group_size, "in_features": m.in_features,
                   "out_features": m.out_features, "bias": m.bias is not None}
            for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def is_integer_model(model: nn.Module) -> bool:
    """Whether a merged model holds integer layers (else it is a float merge, deployed by PTQ)."""
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared storage (tied embeddings) kept once, under its first name."""
    seen: set[tuple[int, int]] = set()
    tensors = {}
    for name, t in model.state_dict().items():
        if type(t) not in (torch.Tensor, nn.Parameter):  # a tensor subclass (torchao weight) owns no storage
            tensors[name] = t.detach()
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = t.detach().contiguous().cpu()
    return tensors


def save_quantized(model: PreTrainedModel, path: str | Path, tokenizer: Any = None) -> Path:
    """Write a merged model (integer layers as ``QuantizedLinear``) as a packed checkpoint folder."""
    path = Path(path)
    layers = _layer_entries(model)
    if not layers:
        raise ValueError("model holds no QuantizedLinear layers; merge it with qaft.merge_model first "
                         "(float models save with save_pretrained)")
    path.mkdir(parents=True, exist_ok=True)
    save_file(unique_tensors(model), str(path / WEIGHTS_FILE), metadata={"format": "pt", "qaft": FORMAT})
    meta = {"format": FORMAT, "version": WEIGHT_ONLY_VERSION, "layout": LAYOUT, "layers": layers}
    if has_act_kv(model):
        meta.update(version=VERSION, activations=act_kv_layout(model))
    qcfg = getattr(model, "qaft_config", None)
    if qcfg is not None and hasattr(qcfg, "to_dict"):
        meta["method"] = qcfg.to_dict()
    (path / QUANT_FILE).write_text(json.dumps(meta, indent=1, default=str))
    model.config.to_json_file(str(path / HF_CONFIG_FILE))
    (path / "config.json").write_text(json.dumps({"model_type": STUB_MODEL_TYPE, "qaft_format": FORMAT,
                                                  "transformers_config": HF_CONFIG_FILE}, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def read_quantization(path: str | Path) -> dict[str, Any]:
    """The checkpoint's ``quantization.json``, checked for format and version."""
    meta = json.loads((Path(path) / QUANT_FILE).read_text())
    if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
        raise ValueError(f"{path}: not a {FORMAT} v<={VERSION} checkpoint (found {meta.get('format')} "
                         f"v{meta.get('version')})")
    return meta


def _empty_quantized(entry: dict[str, Any]) -> QuantizedLinear:
    """A correctly shaped placeholder; its tensors are replaced when the state dict is assigned."""
    out_f, in_f = entry["out_features"], entry["in_features"]
    n_groups = in_f // entry["group_size"]
    bias = torch.zeros(out_f) if entry["bias"] else None
    return QuantizedLinear(torch.zeros(out_f, in_f, dtype=torch.int8), torch.ones(out_f, n_groups),
                           torch.zeros(out_f, n_groups), entry["bits"], bias)


def build_skeleton(config: Any, layers: dict[str, dict[str, Any]]) -> PreTrainedModel:
    """The causal LM of ``config`` without weight initialisation, integer layers installed."""
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every tensor is overwritten by the checkpoint: skip the random init
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    for name, entry in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, _empty_quantized(entry))
    return model


def _hf_config(path: Path) -> Any:
    """The folder's transformers config (``hf_config.json``; ``config.json`` in folders that predate the stub)."""
    if not (path / HF_CONFIG_FILE).is_file():
        return AutoConfig.from_pretrained(str(path))
    entries = json.loads((path / HF_CONFIG_FILE).read_text())
    return AutoConfig.for_model(entries.pop("model_type"), **entries)


def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> PreTrainedModel:
    """Load a checkpoint written by :func:`save_quantized` (eval mode, on ``device``).

    The tokenizer, when saved, loads with :func:`qaft.models.load_tokenizer` (``path``).
    """
    path = Path(path)
    meta = read_quantization(path)
    model = build_skeleton(_hf_config(path), meta["layers"])
    tensors = load_file(str(path / WEIGHTS_FILE), device=str(device))
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    tied = set(_tied_names(model))
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"{path}: checkpoint does not match its config: missing={sorted(set(missing) - tied)}, "
                           f"unexpected={unexpected}")
    if tied & set(missing):
        model.tie_weights()  # re-point tied tensors (lm_head) at their loaded twin
    restore_act_kv(model, meta.get("activations"))
    return model.to(device).eval()


def _tied_names(model: PreTrainedModel) -> list[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return []
    out = model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if m is out]
    return [f"{n}.weight" for n in names]


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes on disk of a checkpoint folder's weights file."""
    return (Path(path) / WEIGHTS_FILE).stat().st_size


def save_merged(merged: PreTrainedModel, path: str | Path, tokenizer: Any = None) -> Path:
    """A merged model as a folder: packed integer checkpoint (integer layers) or ``save_pretrained`` safetensors.

    Written beside ``path`` and renamed into place, so a kill never leaves a half-written model.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if is_integer_model(merged):
            save_quantized(merged, tmp, tokenizer)
        else:
            merged.save_pretrained(str(tmp), safe_serialization=True)
            if has_act_kv(merged):
                (tmp / ACTIVATIONS_FILE).write_text(json.dumps(act_kv_layout(merged), indent=1))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_merged(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Read what :func:`save_merged` wrote (safetensors only), in eval mode."""
    path = Path(path)
    if (path / QUANT_FILE).is_file():
        return load_quantized(path)
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path}: no safetensors model (qaft never reads pickled weights: they can run code)")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
    if (path / ACTIVATIONS_FILE).is_file():
        restore_act_kv(model, json.loads((path / ACTIVATIONS_FILE).read_text()))
    return model.eval()


# A float merge (LoRA, QLoRA, LoftQ, QAT-LoRA) is deployed by round-to-nearest PTQ at the run's bits and group
# size, min-max scale and float offset: the papers' "+PTQ" rows, scored at the end of a run as ``merged_ptq``.
FLOAT_MERGE_PTQ = {"algorithm": "rtn", "init": "minmax", "zero_point": "float"}


def deployed_form(integer_merge: bool, bits: int, group_size: int) -> dict[str, Any]:
    """What a run deploys, as its record and ``qaft-eval`` name it: ``merged``, or ``merged+ptq`` and how."""
    if integer_merge:
        return {"form": "merged"}
    return {"form": "merged+ptq", "ptq": {**FLOAT_MERGE_PTQ, "bits": int(bits), "group_size": int(group_size)}}


def deploy_merged(merged: PreTrainedModel, bits: int, group_size: int) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The deployed model of a merged one (a float merge is quantized in place) and its :func:`deployed_form`."""
    form = deployed_form(is_integer_model(merged), bits, group_size)
    if "ptq" in form:
        merged = ptq_model(merged, int(bits), int(group_size), FLOAT_MERGE_PTQ["init"], inplace=True,
                           zero_point=FLOAT_MERGE_PTQ["zero_point"])
    return merged, form


def read_run(run_dir: Path | str) -> dict[str, Any]:
    path = Path(run_dir) / RUN_RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run_dir must be a qaft-train run folder")
    return json.loads(path.read_text())


def merged_model_dir(run_dir: Path | str, record: dict[str, Any]) -> Path:
    """The run's merged model folder, inside ``run_dir`` whatever path the record holds."""
    saved = record.get("metrics", {}).get("merged_model_path")
    if record.get("status") != "ok" or not saved:
        raise ValueError(f"run {run_dir} has no saved merged model (status={record.get('status')!r}; "
                         "train with save_model=true)")
    path = Path(run_dir) / Path(saved).name  # older records hold absolute paths: only the name counts
    if path.suffix == ".pt":
        raise ValueError(f"{path}: a pickled model from an older qaft; it is not loaded (a pickle can run code): "
                         "rerun the training with save_model=true")
    return path
