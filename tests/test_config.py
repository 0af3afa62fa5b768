from __future__ import annotations

import pytest
import torch

from qtoolkit.config import PRESETS, TRAIN_DEFAULTS, ModelConfig
from qtoolkit.errors import ConfigError, UnknownNameError
from qtoolkit.model import DecoderLM


def count_params(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return DecoderLM(cfg).num_params()


def test_ternarylm_132m_parameter_count():
    cfg = ModelConfig.from_name("ternarylm-132m")
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.vocab_size, cfg.max_seq_len) == (
        12, 768, 12, 2048, 30522, 512)
    n = count_params(cfg)  # counted from the instantiated modules, not a formula
    assert abs(n - 132_000_000) <= 3_000_000
    assert n == cfg.num_params()


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_and_formula_matches_modules(name):
    cfg = ModelConfig.from_name(name)
    assert count_params(cfg) == cfg.num_params()
    assert name in TRAIN_DEFAULTS


def test_small_preset_is_cpu_sized():
    cfg = ModelConfig.from_name("small")
    assert 5e6 <= cfg.num_params() <= 20e6
    assert 7000 <= cfg.vocab_size <= 9000


@pytest.mark.parametrize("extra", [dict(subln=True), dict(tie_embeddings=True), dict(subln=True, tie_embeddings=True),
                                   dict(n_kv_heads=2), dict(n_kv_heads=1, subln=True)])
def test_architecture_options_counted(extra):
    cfg = ModelConfig.from_name("tiny", **extra)
    assert count_params(cfg) == cfg.num_params()


def test_overrides_and_validation():
    assert ModelConfig.from_name("small", d_model=512, n_heads=8).d_model == 512
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig.from_name("small", n_heads=7)
    with pytest.raises(ConfigError, match="positive"):
        ModelConfig.from_name("tiny", n_layers=0)
    with pytest.raises(UnknownNameError, match="available: ternarylm-132m, small, tiny"):
        ModelConfig.from_name("huge")


def test_grouped_query_attention_heads():
    assert ModelConfig.from_name("tiny").n_kv_heads == 4  # unset: one k/v head per query head
    cfg = ModelConfig.from_name("tiny", n_kv_heads=2)
    assert (cfg.n_kv_heads, cfg.kv_dim, cfg.head_dim) == (2, 32, 16)
    with pytest.raises(ConfigError, match="n_kv_heads: n_heads=4 is not a multiple of n_kv_heads=3"):
        ModelConfig.from_name("tiny", n_kv_heads=3)
    with pytest.raises(ConfigError, match="n_kv_heads: must be a positive integer"):
        ModelConfig.from_name("tiny", n_kv_heads=0)
    # checkpoints written before the field existed load with n_kv_heads = n_heads
    old = {k: v for k, v in ModelConfig.from_name("small").to_dict().items() if k != "n_kv_heads"}
    assert ModelConfig.from_dict(old) == ModelConfig.from_name("small")


def test_round_trip_dict():
    cfg = ModelConfig.from_name("tiny", subln=True)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})
