"""Data-free training data: sequences the float model generates itself (LLM-QAT, Liu et al. 2023,
https://arxiv.org/abs/2305.17888, and its public ``generate_data.py``).

Sequence ``i`` of ``count`` starts from one token drawn uniformly from the vocabulary (special tokens left out);
the float model continues it greedily (top-1) for ``k_i`` tokens, ``k_i`` drawn uniformly in ``greedy_tokens``
(the paper's "first 3-5 tokens"; the public code counts the start token among them), then samples the rest from
its full softmax at temperature 1 (``top_k > 0`` truncates to the k most likely tokens) until ``seq_len`` tokens or
its end-of-sequence token, which ends the sequence (it stays in, as the last token). Both stages are HF's
``generate`` (``do_sample=False``, then ``True``) with a fresh generation config, so no sampling default of a
checkpoint leaks in. Start tokens and ``k_i`` come from a generator seeded by ``seed``; the sampling draws from the
global RNG seeded by ``seed`` inside a fork, so training's random stream is the same whether or not the data had to
be generated.

Generated once per model and settings: the token ids are cached as safetensors (int64 ``input_ids``
``[count, seq_len]``, padded, and ``lengths`` ``[count]``; the settings in its metadata) under ``cache_dir``, named
by a hash of the model's identity, the settings and the tokenizer's vocabulary size and special ids, and written
atomically. Every run of a sweep with the same model and settings reads that one file. The float model is loaded
only when the file is missing (:meth:`GeneratedDataModule.prepare_data`: once per node under DDP); qaft.data does
not load models, so whoever runs the data hands the module a loader (:meth:`GeneratedDataModule.use_model`).

Validation and test are real text: windows of ``eval_source`` (a language-modelling corpus), as
:class:`~qaft.data.lm.LMDataModule` builds them, so a run's perplexities are measured on real data.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save
from torch import nn

from qaft import progress
from qaft.data.instruct import PadCollator
from qaft.data.lm import TokenRows, lm_eval_windows, load_lm_texts
from qaft.data.loaders import SplitDataModule
from qaft.data.local import content_sha256
from qaft.files import atomic_write

FORMAT = 1  # bump when what a cache file holds changes; part of every file's name


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


@dataclass(frozen=True)
class GenerationSettings:
    """What decides the generated sequences (and so the cache file); checked at construction, one line each."""

    count: int
    seq_len: int
    seed: int = 0
    greedy_tokens: tuple[int, int] = (3, 5)
    top_k: int = 0
    batch_size: int = 32  # sequences per generate call: batch shapes change float rounding, so it is a setting

    def __post_init__(self) -> None:
        _int("count", self.count, 1)
        _int("seq_len", self.seq_len, 2)
        _int("seed", self.seed, 0)
        _int("top_k", self.top_k, 0)
        _int("generation batch_size", self.batch_size, 1)
        greedy = tuple(self.greedy_tokens) if isinstance(self.greedy_tokens, Sequence) else ()
        if len(greedy) != 2 or any(isinstance(g, bool) or not isinstance(g, int) for g in greedy) \
                or not 0 <= greedy[0] <= greedy[1] or 1 + greedy[1] >= self.seq_len:
            raise ValueError(f"greedy_tokens must be [low, high] with 0 <= low <= high and 1 + high < seq_len="
                             f"{self.seq_len} (the start token, the greedy ones, then at least one sampled), "
                             f"got {self.greedy_tokens!r}")
        object.__setattr__(self, "greedy_tokens", greedy)


def start_tokens(settings: GenerationSettings, vocab_size: int,
                 special_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(start token, greedy length)`` of every sequence, both ``[count]`` int64, from ``settings.seed``."""
    generator = torch.Generator().manual_seed(settings.seed)
    allowed = torch.tensor(sorted(set(range(vocab_size)) - set(special_ids)), dtype=torch.long)
    starts = allowed[torch.randint(len(allowed), (settings.count,), generator=generator)]
    low, high = settings.greedy_tokens
    return starts, torch.randint(low, high + 1, (settings.count,), generator=generator)


def _continue(model: nn.Module, ids: torch.Tensor, eos_id: int, pad_id: int, **options: Any) -> torch.Tensor:
    from transformers import GenerationConfig

    config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, **options)
    return model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)


@torch.no_grad()
def generate_sequences(model: nn.Module, settings: GenerationSettings, starts: torch.Tensor, greedy: torch.Tensor,
                       eos_id: int, pad_id: int,
                       phase: progress.Phase | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [count, seq_len] padded with pad_id, lengths [count])``: greedy for each sequence's ``greedy``
    tokens after its start token, then sampled (see the module doc). Sequences with the same greedy length are
    generated together, ``settings.batch_size`` at a time; ``phase`` counts them (progress lines)."""
    device = next(model.parameters()).device
    ids = torch.full((settings.count, settings.seq_len), pad_id, dtype=torch.long)
    defaults, model.generation_config = model.generation_config, type(model.generation_config)()
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(settings.seed)
            for k in greedy.unique().tolist():
                for rows in (greedy == k).nonzero().flatten().split(settings.batch_size):
                    prompt = starts[rows, None].to(device)
                    prefix = prompt if k == 0 else _continue(model, prompt, eos_id, pad_id, do_sample=False,
                                                             max_new_tokens=k)
                    out = _continue(model, prefix, eos_id, pad_id, do_sample=True, temperature=1.0, top_p=1.0,
                                    top_k=settings.top_k, max_length=settings.seq_len)
                    ids[rows, :out.shape[1]] = out.cpu()
                    if phase is not None:
                        phase.step(len(rows))
    finally:
        model.generation_config = defaults
        model.train(was_training)
    return _cut_at_eos(ids, eos_id, pad_id)


def _cut_at_eos(ids: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence ends at its first end-of-sequence token after the start (kept); the rest becomes padding."""
    eos = ids[:, 1:] == eos_id
    first = torch.where(eos.any(1), eos.int().argmax(1) + 2, torch.full_like(ids[:, 0], ids.shape[1]))
    ids = ids.masked_fill(torch.arange(ids.shape[1])[None, :] >= first[:, None], pad_id)
    return ids, first


def sequences_used(steps: int, batch_size: int, accumulate: int, devices: Any = 1, nodes: int = 1) -> int:
    """``${qaft.sequences_used:...}`` (``conf/data/generated.yaml``: ``count``'s default): the training sequences a
    run reads, steps x batch x accumulation x devices x nodes; devices that are not a count (``auto``, a list)
    count as 1."""
    per_device = int(batch_size) * int(accumulate) * int(nodes)
    return int(steps) * per_device * (devices if isinstance(devices, int) and devices > 0 else 1)


@runtime_checkable
class NeedsModel(Protocol):
    """A DataModule whose data comes from the float model: the run hands it a loader before any data is read."""

    def use_model(self, load: Callable[[], nn.Module], identity: dict[str, Any]) -> None: ...


def _model_fingerprint(identity: dict[str, Any]) -> dict[str, Any]:
    """``identity`` plus, for a local model folder, its files' SHA-256 (an edited checkpoint under the same path is
    another model, even with its old modification times restored; the run identity has hashed the folder in this
    process already, so this costs no second read)."""
    folder = Path(str(identity.get("name_or_path", ""))).expanduser()
    if not folder.is_dir():
        return dict(identity)
    return {**identity, "files_sha256": content_sha256(folder)}


class GeneratedDataModule(SplitDataModule):
    """Training on sequences generated by the float model (see the module doc); validation / test windows of
    ``eval_source``. ``generation_seed``, ``generation_batch_size``: the generator's seed and batch, apart from the
    loaders' ``seed`` and ``batch_size``. ``sequences_used``: how many the run reads (``conf/data/generated.yaml``
    makes it ``count``'s default); a larger ``count`` says so in one line before it generates."""

    def __init__(self, tokenizer: Any, count: int = 128, seq_len: int = 256, generation_seed: int = 0,
                 greedy_tokens: Sequence[int] = (3, 5), top_k: int = 0, generation_batch_size: int = 32,
                 cache_dir: str = "~/.cache/qaft/generated", eval_source: str = "austen",
                 eval_config: str | None = None, max_eval_tokens: int | None = None, batch_size: int = 4,
                 eval_batch_size: int | None = None, seed: int = 0, num_workers: int = 0,
                 sequences_used: int | None = None) -> None:
        super().__init__()
        from qaft.data import validate_data_source

        validate_data_source("lm", eval_source)
        self.settings = self.generation_settings(count=count, seq_len=seq_len, generation_seed=generation_seed,
                                                 greedy_tokens=greedy_tokens, top_k=top_k,
                                                 generation_batch_size=generation_batch_size)
        self.tokenizer, self.cache_dir = tokenizer, Path(cache_dir).expanduser()
        self.eval_source, self.eval_config, self.max_eval_tokens = eval_source, eval_config, max_eval_tokens
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.seed, self.num_workers = seed, num_workers
        self.sequences_used = sequences_used
        self.collator = PadCollator(tokenizer.pad_token_id)
        self.splits: dict[str, TokenRows] = {}
        self.texts: dict[str, list[str]] = {}  # eval_source's documents per split, after setup
        self._load: Callable[[], nn.Module] | None = None
        self._identity: dict[str, Any] | None = None

    @staticmethod
    def generation_settings(**fields: Any) -> GenerationSettings:
        """The settings from a config's fields (``count``, ``seq_len``, ``generation_seed``, ``greedy_tokens``,
        ``top_k``, ``generation_batch_size``; others ignored): what config validation calls before any work."""
        names = {"count": "count", "seq_len": "seq_len", "generation_seed": "seed", "greedy_tokens": "greedy_tokens",
                 "top_k": "top_k", "generation_batch_size": "batch_size"}
        given = {names[k]: v for k, v in fields.items() if k in names}
        if "greedy_tokens" in given and not isinstance(given["greedy_tokens"], (str, bytes)):
            try:  # a config's list (a ListConfig when instantiated) becomes the settings' tuple
                given["greedy_tokens"] = tuple(given["greedy_tokens"])
            except TypeError:
                pass  # not a sequence: GenerationSettings says so in one line
        return GenerationSettings(**given)

    @classmethod
    def check_config(cls, fields: dict[str, Any]) -> None:
        """Raise ``ValueError`` (one line) on bad generation settings in a datamodule config node's ``fields``."""
        cls.generation_settings(**fields)

    def use_model(self, load: Callable[[], nn.Module], identity: dict[str, Any]) -> None:
        """``load()``: the float model (before any method is applied), called only when the data is not cached yet;
        ``identity``: what names that model (e.g. ``{"name_or_path", "dtype"}``), part of the cache file's name."""
        self._load, self._identity = load, dict(identity)

    def cache_file(self) -> Path:
        """The cache file of this model and these settings (it may not exist yet)."""
        if self._identity is None:
            raise RuntimeError("generated data needs the float model that generates it: call use_model(load, "
                               "identity) first")
        tok = self.tokenizer
        key = {"format": FORMAT, "model": _model_fingerprint(self._identity), "settings": asdict(self.settings),
               "vocab_size": len(tok), "special_ids": sorted(tok.all_special_ids), "eos": tok.eos_token_id,
               "pad": tok.pad_token_id}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.cache_dir / f"generated-v{FORMAT}-{digest}.safetensors"

    def prepare_data(self) -> None:
        """Generate and cache the sequences unless the file exists (Lightning: once per node, before setup)."""
        path = self.cache_file()
        if path.is_file():
            return
        if self._load is None:
            raise RuntimeError("generated data is not cached yet and no model loader was given (use_model)")
        count, used = self.settings.count, self.sequences_used
        if used is not None and count > used:
            progress.say(f"generated data: data.datamodule.count={count} asks for more sequences than the {used} this "
                         "run reads (trainer.max_steps x batch_size x accumulation): all are generated and cached")
        model = self._load()
        tok = self.tokenizer
        starts, greedy = start_tokens(self.settings, min(len(tok), model.config.vocab_size), tok.all_special_ids)
        phase = progress.Phase(f"generating training data ({count} x {self.settings.seq_len} tokens)", count,
                               "sequences")
        ids, lengths = generate_sequences(model, self.settings, starts, greedy, tok.eos_token_id, tok.pad_token_id,
                                          phase)
        phase.end(f"cached in {path}")
        del model
        metadata = {"settings": json.dumps(asdict(self.settings)), "model": json.dumps(self._identity)}
        atomic_write(path, lambda f: f.write(save({"input_ids": ids, "lengths": lengths}, metadata=metadata)))

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, lengths)`` from the cache (generated first if missing)."""
        self.prepare_data()
        path = self.cache_file()
        tensors = load_file(path)
        ids, lengths = tensors.get("input_ids"), tensors.get("lengths")
        if ids is None or lengths is None or tuple(ids.shape) != (self.settings.count, self.settings.seq_len):
            raise ValueError(f"{path} does not hold {self.settings.count} sequences of {self.settings.seq_len} "
                             "tokens; delete it to generate it again")
        return ids, lengths

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        ids, lengths = self.sequences()
        self.splits["train"] = TokenRows([row[:n] for row, n in zip(ids, lengths.tolist())])
        self.texts = texts = load_lm_texts(self.eval_source, self.eval_config, read=self.data_sha256)
        for split in ("validation", "test"):
            windows = lm_eval_windows(self.tokenizer, texts[split], self.settings.seq_len, self.max_eval_tokens)
            self.splits[split] = TokenRows(windows)


__all__ = ["GeneratedDataModule", "GenerationSettings", "NeedsModel", "generate_sequences", "sequences_used",
           "start_tokens"]
