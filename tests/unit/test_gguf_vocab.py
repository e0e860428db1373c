"""GGUF tokenizer metadata from a HF fast tokenizer: the shipped SmolLM2 file's vocabulary reproduced, the
pre-tokenizer named, and byte-level and SentencePiece-style tokenizers read back by transformers' GGUF reader
to the same ids."""
import importlib.util
import json
from pathlib import Path

import gguf
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

from qaft.data.austen import austen_splits
from qaft.deploy.gguf_export import export_gguf
from qaft.deploy.gguf_vocab import byte_level_pre_name, gguf_vocab
from qaft.methods import ptq_model
from qaft.models import build_tiny_llama, load_tokenizer
from qaft.models.smollm2 import smollm2_gguf_path

SAMPLE = "Mr. Darcy's 10000 pounds a year — café 😀 and\n  two  spaces. <|im_end|>"


def write_vocab_only(tokenizer, arch: str, n_vocab: int, folder: Path) -> Path:
    """A GGUF holding only metadata: enough for transformers' tokenizer reader."""
    writer = gguf.GGUFWriter(str(folder / "t.gguf"), arch)
    gguf_vocab(tokenizer, n_vocab).add_to(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return folder / "t.gguf"


def test_vocab_reproduces_the_shipped_smollm2_file():
    vocab = gguf_vocab(load_tokenizer("tiny-llama"), 49152)
    fields = gguf.GGUFReader(str(smollm2_gguf_path())).fields
    assert vocab.model == "gpt2" and vocab.pre == "gpt-2"  # qaft's copy splits like GPT-2 (see gguf_vocab)
    assert vocab.tokens == fields["tokenizer.ggml.tokens"].contents()
    assert vocab.types == fields["tokenizer.ggml.token_type"].contents()  # 17 control tokens, then normal
    assert vocab.special.merges == fields["tokenizer.ggml.merges"].contents()
    for typ, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                     ("pad", "padding_token_id")):
        assert vocab.special.special_token_ids[typ] == fields[f"tokenizer.ggml.{key}"].contents()
    assert vocab.special.add_special_token["bos"] is fields["tokenizer.ggml.add_bos_token"].contents() is False


def test_pre_tokenizers_are_named_or_refused():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    split = {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False}
    assert byte_level_pre_name(byte_level) == "gpt-2"
    assert byte_level_pre_name({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}) == "smollm"
    assert byte_level_pre_name({"type": "Sequence", "pretokenizers": [
        split, dict(byte_level, use_regex=False)]}) == "qwen2"
    with pytest.raises(ValueError, match="pre-tokenizer"):
        byte_level_pre_name({"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}, byte_level]})
    with pytest.raises(ValueError, match="pre-tokenizer"):
        byte_level_pre_name({"type": "Sequence", "pretokenizers": [dict(split, pattern={"Regex": r"\w+"}),
                                                                  dict(byte_level, use_regex=False)]})


def test_qwen2_split_is_read_back_by_transformers(tmp_path):
    tok = load_tokenizer("tiny-llama")
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert tok(SAMPLE).input_ids != load_tokenizer("tiny-llama")(SAMPLE).input_ids  # digits split one by one
    path = write_vocab_only(tok, "qwen2", 49152, tmp_path)
    assert gguf.GGUFReader(str(path)).fields["tokenizer.ggml.pre"].contents() == "qwen2"
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert back(SAMPLE).input_ids == tok(SAMPLE).input_ids


def test_padded_embedding_rows_are_unused_tokens_and_a_larger_vocabulary_is_refused():
    tok = load_tokenizer("tiny-llama")
    vocab = gguf_vocab(tok, 49152 + 64)
    assert vocab.tokens[-1] == "[PAD49215]" and vocab.types[-64:] == [int(gguf.TokenType.UNUSED)] * 64
    with pytest.raises(ValueError, match="embedding only 1000"):
        gguf_vocab(tok, 1000)


def sentencepiece_style_tokenizer() -> PreTrainedTokenizerFast:
    """A small Llama-2-like tokenizer: ``<unk> <s> </s>``, 256 byte pieces, BPE pieces learned on Austen with
    ``▁`` for spaces, byte fallback, BOS added."""
    text = "".join(austen_splits()["train"][:10])
    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    learner = Tokenizer(models.BPE())
    learner.normalizer = norm
    learner.train_from_iterator([text], trainers.BpeTrainer(vocab_size=500, show_progress=False))
    merges = [tuple(m) for m in json.loads(learner.to_str())["model"]["merges"]]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    for piece, _ in sorted(learner.get_vocab().items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.normalizer = norm
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    tk.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_style_tokenizer_is_read_back_by_transformers(tmp_path):
    tok = sentencepiece_style_tokenizer()
    vocab = gguf_vocab(tok, len(tok))
    assert vocab.model == "llama" and vocab.extra == {"add_space_prefix": True}
    assert vocab.types[:4] == [int(gguf.TokenType.CONTROL)] * 3 + [int(gguf.TokenType.BYTE)]
    # llama.cpp merges the pair whose result scores highest: earlier merges score higher
    first, second = ("".join(m) for m in json.loads(tok.backend_tokenizer.to_str())["model"]["merges"][:2])
    assert vocab.scores[vocab.tokens.index(first)] == 0.0 > vocab.scores[vocab.tokens.index(second)] == -1.0
    path = write_vocab_only(tok, "llama", len(tok), tmp_path)
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ids = tok(SAMPLE).input_ids
    assert ids[0] == 1 and 3 + 0xF0 in ids  # BOS added; the emoji went through byte fallback
    assert back(SAMPLE).input_ids == ids


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
def test_llama_cpp_tokenizes_the_sentencepiece_style_vocabulary_alike(tmp_path):
    import llama_cpp
    tok = sentencepiece_style_tokenizer()
    path = export_gguf(ptq_model(build_tiny_llama(len(tok)), 4, 32), tmp_path / "m.gguf", tok)
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    text = SAMPLE.replace("<|im_end|>", "")
    # scores -rank make llama.cpp's score-driven merging follow the BPE merge order; BOS added as the tokenizer does
    assert llm.tokenize(text.encode()) == tok(text).input_ids
    llm.close()
