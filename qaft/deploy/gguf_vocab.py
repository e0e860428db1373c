"""A Hugging Face fast tokenizer as GGUF ``tokenizer.*`` metadata (what llama.cpp tokenizes with).

GGUF has no ``tokenizer.json``: it stores the token list (with a type per token: normal, control, user-defined,
byte, unused), the BPE merges, the special ids and a *name* for the pre-tokenizer (``tokenizer.ggml.pre``),
because llama.cpp hard-codes each pre-tokenizer's split regex under a name. Two kinds are written:

* ``gpt2``: byte-level BPE (GPT-2, SmolLM2, Qwen2, Llama-3). The pre-tokenizer name is recognised from the
  ``tokenizer.json`` pre-tokenizer: plain GPT-2 byte-level splitting (``gpt-2``), digits split first
  (``smollm``), or one of the split regexes transformers' GGUF reader knows (``llama3``, ``qwen2``, ...).
* ``llama``: SentencePiece-style BPE with byte fallback (Llama-2, Mistral) as stored in ``tokenizer.json``.
  llama.cpp picks the next merge by the score of the merged piece, so each token scores ``-rank`` of the merge
  that makes it (the order a SentencePiece BPE model learned them in); merges are written too.

A tokenizer of another shape is refused: written under a wrong name it would tokenize differently in
llama.cpp, silently. Merges, special ids, BOS/EOS flags and the chat template go through gguf-py's
``SpecialVocab``, which reads the files ``save_pretrained`` writes.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from typing import Any

import gguf

# Byte-level pre-tokenizers that are not one Split regex: llama.cpp's names for them.
_BYTE_LEVEL_PRE = {"gpt-2": ("ByteLevel",), "smollm": ("Digits", "ByteLevel")}


@dataclass
class GGUFVocab:
    """The ``tokenizer.*`` metadata of one tokenizer, ready for :meth:`add_to`."""

    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str | None  # tokenizer.ggml.pre (byte-level only)
    tokens: list[str]
    types: list[int]
    special: gguf.SpecialVocab
    scores: list[float] | None = None
    extra: dict[str, bool] = field(default_factory=dict)

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        """Write every ``tokenizer.*`` key."""
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        for typ, value in self.extra.items():
            getattr(writer, f"add_{typ}")(value)
        self.special.add_to_gguf(writer, quiet=True)


def _steps(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    if node is None:
        return []
    if node["type"] == "Sequence":
        return [s for child in node.get("pretokenizers", node.get("normalizers", [])) for s in _steps(child)]
    return [node]


def byte_level_pre_name(pre_tokenizer: dict[str, Any] | None) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer (``ValueError`` if it has none we can vouch for)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    steps = _steps(pre_tokenizer)
    kinds = tuple(s["type"] for s in steps)
    for name, shape in _BYTE_LEVEL_PRE.items():
        if kinds == shape and steps[-1].get("use_regex", True) and all(
                s.get("individual_digits", True) for s in steps):
            return name
    if kinds == ("Split", "ByteLevel") and not steps[1].get("use_regex", True) and \
            steps[0].get("behavior") == "Isolated" and not steps[0].get("invert", False):
        regex = steps[0].get("pattern", {}).get("Regex")
        # first name per regex: the one llama.cpp also knows (later ones are aliases of other models)
        for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
            if split == regex:
                return name
    raise ValueError(f"byte-level BPE pre-tokenizer {kinds} (regex not known to GGUF readers): llama.cpp would "
                     "split text differently; GGUF export supports GPT-2, SmolLM, Llama-3, Qwen2-style splits")


def _token_types(tokenizer: Any, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings and types, id by id; ids the tokenizer lacks (padded embeddings) become ``[PADi]``."""
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.BYTE if _is_byte_piece(reverse[i]) else gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _is_byte_piece(token: str) -> bool:
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


def _merge_scores(tokens: list[str], merges: list[Any]) -> list[float]:
    """``-rank`` of the merge producing each token (0 for pieces no merge produces: chars, bytes, specials)."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _adds(tokenizer: Any) -> dict[str, bool]:
    """Whether the tokenizer puts BOS in front / EOS behind a plain text (what llama.cpp should do too)."""
    ids = tokenizer("a").input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"bos": bos is not None and ids[:1] == [bos], "eos": eos is not None and ids[-1:] == [eos]}


def gguf_vocab(tokenizer: Any, n_vocab: int) -> GGUFVocab:
    """The GGUF description of a fast HF ``tokenizer`` for a model with ``n_vocab`` embedding rows."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("GGUF export needs a fast (tokenizer.json) tokenizer")
    if len(tokenizer) > n_vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the model's embedding only {n_vocab}")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    bpe, decoder = spec["model"], (spec.get("decoder") or {}).get("type")
    tokens, types = _token_types(tokenizer, n_vocab)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    special.add_special_token.update(_adds(tokenizer))
    if bpe["type"] == "BPE" and not bpe.get("byte_fallback") and decoder == "ByteLevel":
        normalizers = [s["type"] for s in _steps(spec.get("normalizer"))]
        if normalizers not in ([], ["NFC"]):  # NFC: Qwen2's, which llama.cpp's converter ignores as well
            raise ValueError(f"byte-level BPE with normalizer {normalizers}: llama.cpp applies none")
        return GGUFVocab("gpt2", byte_level_pre_name(spec.get("pre_tokenizer")), tokens, types, special)
    if bpe["type"] == "BPE" and bpe.get("byte_fallback"):
        scores = _merge_scores(tokens, bpe["merges"])
        return GGUFVocab("llama", None, tokens, types, special, scores,
                         {"add_space_prefix": _prefix_space(spec)})
    raise ValueError(f"tokenizer model {bpe['type']} (byte_fallback={bpe.get('byte_fallback')}, decoder "
                     f"{decoder}): GGUF export supports byte-level BPE and SentencePiece-style BPE")


def _prefix_space(spec: dict[str, Any]) -> bool:
    """SentencePiece tokenizers put ``▁`` before the text: by a Metaspace pre-tokenizer or a Prepend normalizer."""
    pre = _steps(spec.get("pre_tokenizer"))
    if any(s["type"] == "Metaspace" for s in pre):
        return any(s.get("prepend_scheme", "always") != "never" for s in pre if s["type"] == "Metaspace")
    return any(s["type"] == "Prepend" for s in _steps(spec.get("normalizer")))
