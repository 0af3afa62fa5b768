from __future__ import annotations

import math

import pytest
import torch

from qtoolkit.checkpoint import load_checkpoint
from qtoolkit.config import ModelConfig
from qtoolkit.errors import CheckpointError, ConfigError
from qtoolkit.model import DecoderLM
from qtoolkit.search import probes
from qtoolkit.search.probes import (
    ProbeError,
    float_model,
    parse_formats,
    quantized,
    run_probe,
    search_units,
)

FORMATS = "ternary,int8,fp16"



def test_units_layer_group_and_tied():
    m = DecoderLM(ModelConfig.from_name("tiny"))
    layer = search_units(m, "layer")
    assert [u.name for u in layer][:3] == ["embed", "blocks.0.attn.q_proj", "blocks.0.attn.k_proj"]
    assert len(layer) == 2 + 2 * 7
    group = search_units(m, "group")
    assert [u.name for u in group] == ["embed", "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp", "lm_head"]
    assert group[1].modules == tuple(f"blocks.0.attn.{p}_proj" for p in "qkvo")
    tied = search_units(DecoderLM(ModelConfig.from_name("tiny", tie_embeddings=True)), "group")
    embed = next(u for u in tied if u.name == "embed")
    assert embed.modules == ("embed", "lm_head") and embed.shapes == ((512, 64),)
    with pytest.raises(ConfigError):
        search_units(m, "row")
    gqa = search_units(DecoderLM(ModelConfig.from_name("tiny", n_kv_heads=1)), "group")
    assert gqa[1].shapes == ((64, 64), (16, 64), (16, 64), (64, 64))  # k/v: one 16-wide head


def test_parse_formats():
    fs = parse_formats("ternary, int8")
    assert [f.key for f in fs] == ["ternary", "int8"]
    fs = parse_formats("[{name: ternary, packing: base3}, fp16]")
    assert [f.key for f in fs] == ["ternary(packing=base3)", "fp16"]
    with pytest.raises(ConfigError, match="twice"):
        parse_formats("int8,int8")
    with pytest.raises(Exception, match="unknown quantizer 'int9'"):
        parse_formats("int9")
    fs = parse_formats("[int3, gptq4, ptqtp, {name: intn, bits: 3, group_size: 64}]")  # aliases key as themselves
    assert [f.key for f in fs] == ["int3", "gptq4", "ptqtp", "intn(bits=3,group_size=64)"]


def test_quantized_context_restores_the_model():
    m = DecoderLM(ModelConfig.from_name("tiny"))
    x = torch.randint(0, 512, (1, 8))
    before = m(x)
    with quantized(m, {"blocks.0.attn.q_proj": {"name": "ternary"}}):
        assert not torch.equal(m(x), before)
    assert type(m.blocks[0].attn.q_proj) is torch.nn.Linear and torch.equal(m(x), before)


def test_probe_measures_caches_and_ranks(fp32_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("QTOOLKIT_CACHE", str(tmp_path / "cache"))
    r = run_probe(fp32_ckpt, parse_formats(FORMATS), "group", calib_tokens=512)
    assert r.complete and not r.cached and not r.missing()
    assert r.calibration["tokens"] == 512 and math.isfinite(r.base_loss)
    mean = {f: sum(r.measured[u][f] for u in r.measured) / len(r.measured) for f in ("ternary", "int8", "fp16")}
    assert mean["ternary"] > 10 * abs(mean["int8"]) and mean["ternary"] > 10 * abs(mean["fp16"])
    assert set(r.spearman) == {"all", "ternary", "int8", "fp16"} and r.spearman["all"] > 0
    assert all(v >= 0 for fs in r.cheap.values() for v in fs.values())
    assert set(r.sparsity) >= {"blocks.0.attn.q_proj", "lm_head"}
    # a re-run costs nothing: it must not evaluate anything
    monkeypatch.setattr(probes.CachedForward, "loss", lambda *a, **k: pytest.fail("re-measured"))
    again = run_probe(fp32_ckpt, parse_formats(FORMATS), "group", calib_tokens=512)
    assert again.cached and again.measured == r.measured


def test_measured_matches_a_direct_evaluation(fp32_ckpt, tmp_path, monkeypatch):
    """The block-input cache must not change the numbers."""
    monkeypatch.setenv("QTOOLKIT_CACHE", str(tmp_path / "cache"))
    r = run_probe(fp32_ckpt, parse_formats("ternary"), "group", calib_tokens=256)
    model = float_model(load_checkpoint(fp32_ckpt))
    from qtoolkit.training.data import prepare_data, tokenizer_from_json
    from qtoolkit.training.recipe import DataConfig

    ckpt = load_checkpoint(fp32_ckpt)
    data = prepare_data(DataConfig(**ckpt["recipe"]["data"]), 512, tokenizer=tokenizer_from_json(ckpt["tokenizer"]))
    batches = probes.calibration_batches(data.train, 256, r.calibration["seq_len"], 0)

    def loss(m):
        with torch.no_grad():
            return sum(probes._ce(m(x), y).item() for x, y in batches) / sum(y.numel() for _, y in batches)

    base = loss(model)
    assert r.base_loss == pytest.approx(base, rel=1e-5)
    with quantized(model, {m: {"name": "ternary"} for m in ("blocks.1.mlp.gate_proj", "blocks.1.mlp.up_proj",
                                                             "blocks.1.mlp.down_proj")}):
        direct = loss(model) - base
    assert r.measured["blocks.1.mlp"]["ternary"] == pytest.approx(direct, rel=1e-4, abs=1e-6)


def test_timeout_keeps_partial_results_and_resumes(fp32_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("QTOOLKIT_CACHE", str(tmp_path / "cache"))
    part = run_probe(fp32_ckpt, parse_formats(FORMATS), "layer", calib_tokens=256, timeout=0.0)
    assert not part.complete and part.missing()
    sens = part.sensitivity()  # gaps filled by the rescaled estimate
    assert all(math.isfinite(v) for fs in sens.values() for v in fs.values())
    full = run_probe(fp32_ckpt, parse_formats(FORMATS), "layer", calib_tokens=256)
    assert full.complete and not full.cached


def test_non_finite_loss_is_an_error(fp32_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("QTOOLKIT_CACHE", str(tmp_path / "cache"))
    real = probes.CachedForward.loss

    def loss(self, start):
        return float("nan") if start is not None and start >= 1 else real(self, start)

    monkeypatch.setattr(probes.CachedForward, "loss", loss)
    with pytest.raises(ProbeError, match="non-finite loss"):
        run_probe(fp32_ckpt, parse_formats("ternary"), "group", calib_tokens=256)


def test_packed_checkpoint_is_refused(fp32_ckpt, tmp_path):
    from qtoolkit.pack import pack_checkpoint

    packed = pack_checkpoint(fp32_ckpt, tmp_path / "p.safetensors").path
    with pytest.raises(CheckpointError, match="latent weights"):
        run_probe(packed, parse_formats("ternary"))
