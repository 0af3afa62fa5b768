"""A checkpoint's tokenizer as GGUF tokenizer metadata (llama.cpp's BPE vocabulary, "gpt2" model).

qtoolkit trains a byte-level BPE (`tokenizers`: ByteLevel pre-tokenizer with GPT-2's split regex,
ByteLevel decoder, `<|endoftext|>` as the only special token). llama.cpp runs the same algorithm
from these keys:

    tokenizer.ggml.model        "gpt2"         byte-level BPE
    tokenizer.ggml.pre          "gpt-2"        GPT-2's pre-tokenizer regex ("llama-bpe" for the
                                               Llama 3 split regex, when an imported tokenizer has it)
    tokenizer.ggml.tokens       every token string by id, in the byte-to-unicode alphabet as stored
    tokenizer.ggml.token_type   1 normal, 3 control (special tokens), 4 user-defined (added, not
                                special), 5 unused (padding up to the model's vocab_size)
    tokenizer.ggml.merges       "left right" merge rules, by rank
    bos/eos_token_id            <|endoftext|> (GPT-2's convention: one token separates documents)
    add_bos_token / add_eos     false: qtoolkit trains without a BOS token, so llama.cpp must not
                                prepend one

Tokenizers of another kind (SentencePiece-style BPE with byte fallback, WordPiece, Unigram) are
refused with a ConversionError: llama.cpp's "llama" vocabulary needs scores this module does not
derive.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from qtoolkit.errors import ConversionError

EOS = "<|endoftext|>"
# the Llama 3 pre-tokenizer regex (tokenizer.json of Meta-Llama-3), which llama.cpp calls "llama-bpe"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    eos_id: int | None
    padded: int  # tokens added as UNUSED padding up to vocab_size


def _byte_level_pre(pre: dict[str, Any] | None) -> str | None:
    """The llama.cpp pre-tokenizer name of a tokenizers pre_tokenizer, or None when it is not byte-level."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel":
        return "gpt-2" if pre.get("use_regex", True) and not pre.get("add_prefix_space", False) else None
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        kinds = [p.get("type") for p in parts]
        if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
            if parts[0].get("pattern", {}).get("Regex") == LLAMA3_REGEX:
                return "llama-bpe"
        if kinds == ["ByteLevel"]:
            return _byte_level_pre(parts[0])
    return None


def gguf_vocab(tokenizer_json: str, vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary of a tokenizer JSON (as checkpoints store it), padded to `vocab_size`."""
    try:
        tok = json.loads(tokenizer_json)
    except (json.JSONDecodeError, TypeError):
        raise ConversionError("the checkpoint's tokenizer is not tokenizer JSON; GGUF export needs it") from None
    model = tok.get("model") or {}
    pre = _byte_level_pre(tok.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None or model.get("byte_fallback"):
        kind = f"{model.get('type', '?')} with pre-tokenizer {(tok.get('pre_tokenizer') or {}).get('type')}"
        raise ConversionError(f"GGUF export embeds byte-level BPE tokenizers (GPT-2 or Llama 3 style); "
                              f"this checkpoint's tokenizer is {kind}")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = dict.fromkeys(by_id, NORMAL)
    for added in tok.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    n = max(by_id) + 1
    if n > vocab_size:
        raise ConversionError(f"the tokenizer has {n} token ids, more than the model's vocab_size={vocab_size}")
    tokens, token_types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            token_types.append(types[i])
        else:  # holes and the tail up to vocab_size: never produced by the tokenizer
            tokens.append(f"[PAD{i}]")
            token_types.append(UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    eos = next((i for i, t in by_id.items() if t == EOS), None)
    return GGUFVocab(tokens, token_types, merges, pre, eos, vocab_size - len(by_id))


def add_vocab(writer, vocab: GGUFVocab) -> None:
    """Write the tokenizer keys with a gguf.GGUFWriter."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    if vocab.eos_id is not None:
        writer.add_bos_token_id(vocab.eos_id)
        writer.add_eos_token_id(vocab.eos_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


__all__ = ["GGUFVocab", "add_vocab", "gguf_vocab"]
