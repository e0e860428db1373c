"""The packed integer format: what a merged integer qaft model is on disk.

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

A run's merged model is this folder for an integer model (:mod:`qaft.deploy.merged`). Nothing here reads a
pickle: a downloaded folder cannot run code.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from qaft.methods.act_kv import act_kv_layout, has_act_kv, restore_act_kv
from qaft.models import load_tokenizer
from qaft.quant.linear import QuantizedLinear

FORMAT = "qaft-packed"
VERSION = 2
# Weight-only folders stay version 1, readable by a qaft that predates activation quantization; one that
# quantizes activations is version 2, so such a qaft refuses it rather than run it without its quantizers.
WEIGHT_ONLY_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
QUANT_FILE = "quantization.json"
HF_CONFIG_FILE = "hf_config.json"  # the transformers config of a packed folder (config.json is the stub)
# What transformers prints when asked to load a packed folder ("... has model type `<this>` but Transformers
# does not recognize this architecture"): the one thing a user of the folder must learn.
STUB_MODEL_TYPE = ("qaft-packed (a qaft packed integer model, not a transformers format: load it with "
                   "qaft.deploy.load_quantized, or export the run with 'qaft-export RUN format=hf' for transformers)")
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


def check_weight_only_integer(model: nn.Module, fmt: str, package: str, install: str, act_kv_note: str,
                              float_note: str) -> None:
    """``ValueError`` (one line, naming ``format=fmt``) where an export to a standard format cannot start: its
    library ``package`` is not installed (``install`` says how), the model quantizes activations or the KV cache
    (which those formats do not carry: ``act_kv_note`` says so, pointing to format=qaft), or it holds no integer
    layers (``float_note`` says what to do)."""
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise ValueError(f"format={fmt} needs {install}")
    if has_act_kv(model):
        layout = act_kv_layout(model)
        raise ValueError(f"format={fmt}: the model quantizes activations/KV cache (act_bits={layout['act_bits']}, "
                         f"kv_bits={layout['kv_bits']}){act_kv_note}: use format=qaft (qaft.deploy.load_quantized)")
    if not is_integer_model(model):
        raise ValueError(f"format={fmt}: the model holds no integer layers ({float_note})")


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
    """Write a merged model (integer layers as ``QuantizedLinear``) as a packed folder."""
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
    """The folder's ``quantization.json``, checked for format and version."""
    meta = json.loads((Path(path) / QUANT_FILE).read_text())
    if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
        raise ValueError(f"{path}: not a {FORMAT} v<={VERSION} folder (found {meta.get('format')} "
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

    with no_init_weights():  # every tensor is overwritten by the saved tensors: skip the random init
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


def load_folder_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved in a packed folder (or any model folder), read with the folder's transformers config:
    a packed folder's ``config.json`` is the stub, which transformers would read and warn about."""
    path = Path(path)
    return load_tokenizer(str(path), _hf_config(path) if (path / HF_CONFIG_FILE).is_file() else None)


def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> PreTrainedModel:
    """Load a folder written by :func:`save_quantized` (eval mode, on ``device``).

    The tokenizer, when saved, loads with :func:`qaft.models.load_tokenizer` (``path``).
    """
    path = Path(path)
    meta = read_quantization(path)
    model = build_skeleton(_hf_config(path), meta["layers"])
    tensors = load_file(str(path / WEIGHTS_FILE), device=str(device))
    check_tensors(model.state_dict(), tensors, path / WEIGHTS_FILE)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    tied = set(_tied_names(model))
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"{path}: saved tensors do not match its config: missing={sorted(set(missing) - tied)}, "
                           f"unexpected={unexpected}")
    if tied & set(missing):
        model.tie_weights()  # re-point tied tensors (lm_head) at their loaded twin
    restore_act_kv(model, meta.get("activations"))
    return model.to(device).eval()


class TensorMismatch(ValueError):
    """A saved tensor whose shape or kind of dtype is not what the model's config builds (one line, naming it)."""


def check_tensors(expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], where: Path | str) -> None:
    """Every saved tensor has its expected shape, and a float where a float is expected (its exact dtype where
    it is an integer): a header that declares a float32 scale as I32 would otherwise load, and compute garbage."""
    for name, tensor in saved.items():
        want = expected.get(name)
        if want is None:
            continue  # unexpected names are the caller's check
        same_kind = tensor.dtype.is_floating_point == want.dtype.is_floating_point
        if tuple(tensor.shape) != tuple(want.shape) or not same_kind or (
                not want.dtype.is_floating_point and tensor.dtype != want.dtype):
            raise TensorMismatch(f"{where}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, expected "
                                 f"{want.dtype} {tuple(want.shape)}")


def _tied_names(model: PreTrainedModel) -> list[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return []
    out = model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if m is out]
    return [f"{n}.weight" for n in names]


def packed_bytes(path: str | Path) -> int:
    """Bytes on disk of a packed folder's weights file."""
    return (Path(path) / WEIGHTS_FILE).stat().st_size
