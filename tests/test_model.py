from __future__ import annotations

import pytest
import torch

from qtoolkit.config import ModelConfig
from qtoolkit.errors import ConfigError
from qtoolkit.model import DecoderLM


@pytest.fixture
def tiny():
    return DecoderLM(ModelConfig.from_name("tiny"))


def test_logits_shape(tiny):
    x = torch.randint(0, 512, (3, 17))
    assert tiny(x).shape == (3, 17, 512)


def test_causal(tiny):
    x = torch.randint(0, 512, (1, 20))
    y = x.clone()
    y[0, 12:] = (y[0, 12:] + 1) % 512
    a, b = tiny(x), tiny(y)
    assert torch.allclose(a[0, :12], b[0, :12], atol=1e-5)
    assert not torch.allclose(a[0, 12:], b[0, 12:])


def test_stable_module_names(tiny):
    linear = {n for n, m in tiny.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    expected = {"embed", "lm_head"}
    for i in range(2):
        expected |= {f"blocks.{i}.attn.{p}_proj" for p in "qkvo"}
        expected |= {f"blocks.{i}.mlp.{p}_proj" for p in ("gate", "up", "down")}
    assert linear == expected


def test_no_biases(tiny):
    assert all(m.bias is None for m in tiny.modules() if isinstance(m, torch.nn.Linear))


def test_subln_adds_norms_before_o_and_down():
    m = DecoderLM(ModelConfig.from_name("tiny", subln=True))
    assert m.blocks[0].attn.sub_norm.weight.shape == (64,)
    assert m.blocks[0].mlp.sub_norm.weight.shape == (176,)
    assert m(torch.randint(0, 512, (1, 8))).shape == (1, 8, 512)


def test_tied_embeddings_share_one_parameter():
    m = DecoderLM(ModelConfig.from_name("tiny", tie_embeddings=True))
    assert m.lm_head.weight is m.embed.weight


def test_rope_relative_positions(tiny):
    # RoPE attention scores depend only on relative offsets: shifting q and k positions together
    from qtoolkit.model import apply_rope, rope_tables

    cos, sin = rope_tables(16, 64, 10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    s1 = (apply_rope(q, cos[3:4], sin[3:4]) * apply_rope(k, cos[1:2], sin[1:2])).sum()
    s2 = (apply_rope(q, cos[10:11], sin[10:11]) * apply_rope(k, cos[8:9], sin[8:9])).sum()
    assert torch.allclose(s1, s2, atol=1e-5)


def test_too_long_sequence(tiny):
    with pytest.raises(ConfigError, match="max_seq_len"):
        tiny(torch.zeros(1, 65, dtype=torch.long))


def test_grouped_query_attention_is_attention_with_shared_kv_heads():
    """A GQA model equals the multi-head model whose k/v projections repeat each k/v head for its
    group of query heads (query head h reads k/v head h // (n_heads / n_kv_heads))."""
    torch.manual_seed(0)
    gqa = DecoderLM(ModelConfig.from_name("tiny", n_kv_heads=2))
    assert gqa.blocks[0].attn.k_proj.weight.shape == (32, 64)
    mha = DecoderLM(ModelConfig.from_name("tiny"))
    state = gqa.state_dict()
    for i in range(2):
        for p in "kv":
            w = state[f"blocks.{i}.attn.{p}_proj.weight"].view(2, 16, 64)  # (n_kv, hd, d)
            state[f"blocks.{i}.attn.{p}_proj.weight"] = w.repeat_interleave(2, dim=0).reshape(64, 64)
    mha.load_state_dict(state)
    x = torch.randint(0, 512, (2, 12))
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-6)
