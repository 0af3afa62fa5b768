"""A small random Hugging Face Llama (grouped-query attention on) saved with `save_pretrained`, with a
byte-level BPE tokenizer trained locally on the synthetic stories: no network."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

VOCAB = 320


def train_bpe(corpus_dir: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(p) for p in sorted(corpus_dir.glob("*.txt"))], trainer)
    return tok


def save_hf_llama(path: Path, corpus_dir: Path, tie: bool = False, kv_heads: int = 2, seed: int = 0) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=5000.0,
        tie_word_embeddings=tie, initializer_range=0.15,  # larger than Llama's 0.02: logits with some range
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    train_bpe(corpus_dir, VOCAB).save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory, corpus_dir) -> Path:
    return save_hf_llama(tmp_path_factory.mktemp("hf_llama"), corpus_dir)


@pytest.fixture
def hf_copy(hf_llama, tmp_path) -> Path:
    """A copy to edit (config.json, files) for the bad-input tests."""
    return Path(shutil.copytree(hf_llama, tmp_path / "hf"))
