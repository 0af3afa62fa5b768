from __future__ import annotations

import json
import math

import pytest
import torch

from qtoolkit.errors import ConfigError
from qtoolkit.evaluate.analyze import SCHEMA_VERSION, analyze_checkpoint, middle_blocks
from qtoolkit.pack import pack_checkpoint
from qtoolkit.report import analysis_html, analysis_markdown, save_analysis_plot
from qtoolkit.report.text import methods_text

from .conftest import save_untrained_checkpoint

# One group of 8 repeated: absmean = 1, codes 0 0 +1 -1 +1 -1 +1 -1, two weights at |W/alpha| = 0.52
PATTERN = torch.tensor([0.0, 0.0, 0.52, -0.52, 2.0, -2.0, 1.48, -1.48])


def known_weights(model):
    w = model.blocks[0].attn.q_proj.weight
    w.copy_(PATTERN.repeat(w.numel() // 8).view_as(w))


def test_known_fractions_entropy_threshold_and_sqnr(tmp_path):
    a = analyze_checkpoint(save_untrained_checkpoint(tmp_path / "c.pt", mutate=known_weights))
    x = a.layer("blocks.0.attn.q_proj")
    assert (x.block, x.kind, x.quantizer) == (0, "q", "ternary")
    assert x.zeros == 0.25 and x.plus == 0.375 and x.minus == 0.375
    assert x.alpha == {"mean": pytest.approx(1.0), "min": pytest.approx(1.0), "max": pytest.approx(1.0), "count": 1}
    assert x.entropy_bits == pytest.approx(-(0.25 * math.log2(0.25) + 2 * 0.375 * math.log2(0.375)))
    assert x.code_bits == 2.0
    assert x.near_threshold == pytest.approx(0.25)
    assert x.sqnr_db == pytest.approx(10 * math.log10(12.9216 / 2.9216), rel=1e-6)
    assert x.bits_per_weight == pytest.approx(2 + 32 / (64 * 64))
    emb = a.layer("embed")
    assert emb.quantizer == "int8" and emb.plus is None and 0 <= emb.zeros < 0.1 and emb.sqnr_db > 30


def test_band_changes_near_threshold(tmp_path):
    path = save_untrained_checkpoint(tmp_path / "c.pt", mutate=known_weights)
    assert analyze_checkpoint(path, band=0.01).layer("blocks.0.attn.q_proj").near_threshold == 0.0
    with pytest.raises(ConfigError):
        analyze_checkpoint(path, band=0.7)


def test_block_kind_and_middle_vs_boundary_aggregates(tmp_path):
    def sparse_middle(model):  # block 1 of 4: all-zero codes except one weight per row
        for name, p in model.named_parameters():
            if name.startswith("blocks.") and p.ndim == 2:
                p.normal_()
        for lin in model.blocks[1].modules():
            if isinstance(lin, torch.nn.Linear):
                w = torch.zeros_like(lin.weight)
                w[:, 0] = 1.0
                lin.weight.copy_(w)

    a = analyze_checkpoint(save_untrained_checkpoint(tmp_path / "c.pt", overrides=["model.n_layers=4"],
                                                     mutate=sparse_middle), middle=(1, 3))
    mb = a.middle_vs_boundary
    assert mb["middle_blocks"] == [1, 2] and mb["boundary_blocks"] == [0, 3]
    b1 = a.blocks[1]
    assert b1["zeros"] == pytest.approx(1 - 1 / 64 * (4 * 64 * 64 + 2 * 176 * 64) / (4 * 64 * 64 + 2 * 176 * 64 + 64 * 176)
                                        - 1 / 176 * (64 * 176) / (4 * 64 * 64 + 2 * 176 * 64 + 64 * 176))
    assert mb["middle_zeros"] == pytest.approx((b1["zeros"] * b1["params"] + a.blocks[2]["zeros"] * a.blocks[2]["params"])
                                               / (b1["params"] + a.blocks[2]["params"]))
    assert mb["difference"] == pytest.approx(mb["middle_zeros"] - mb["boundary_zeros"]) and mb["difference"] > 0.3
    assert set(a.kinds) == {"embed", "q", "k", "v", "o", "gate", "up", "down", "lm_head"}
    assert a.kinds["q"]["layers"] == 4


def test_middle_blocks_follow_the_paper():
    assert middle_blocks(12) == [4, 5, 6, 7, 8]  # L5-L9
    assert middle_blocks(8) == [3, 4, 5]
    with pytest.raises(ConfigError):
        middle_blocks(4, (3, 9))


JSON_TOP = {"schema_version", "qtoolkit_version", "checkpoint", "recipe", "kind", "step", "as_policy", "model_config", "band", "layers", "blocks",
            "kinds", "middle_vs_boundary", "totals"}
JSON_LAYER = {"name", "block", "kind", "quantizer", "spec", "rule", "shape", "params", "bits_per_weight", "bytes",
              "code_bits", "zeros", "plus", "minus", "alpha", "entropy_bits", "near_threshold", "sqnr_db", "method"}
JSON_GROUP = {"layers", "params", "bytes", "bits_per_weight", "quantizers", "ternary_layers", "zeros", "entropy_bits",
              "near_threshold", "alpha_mean", "sqnr_db"}
JSON_TOTALS = {"params", "bytes", "fp32_bytes", "compression_vs_fp32", "bytes_by_quantizer", "zeros", "methods",
               "correction_bytes", "correction_share"}


def test_json_schema_is_stable(tmp_path):
    """The documented schema (docs/analyze.md). Changing it means bumping SCHEMA_VERSION."""
    d = json.loads(json.dumps(analyze_checkpoint(save_untrained_checkpoint(tmp_path / "c.pt")).to_dict()))
    assert SCHEMA_VERSION == 3 and d["schema_version"] == 3
    assert set(d) == JSON_TOP
    assert all(set(x) == JSON_LAYER for x in d["layers"])
    assert all(set(b) == JSON_GROUP | {"block"} for b in d["blocks"])
    assert all(set(g) == JSON_GROUP for g in d["kinds"].values())
    assert set(d["totals"]) == JSON_TOTALS
    assert set(d["middle_vs_boundary"]) == {"middle_blocks", "boundary_blocks", "middle_zeros", "boundary_zeros",
                                            "difference"}


def test_plot_is_a_png_and_reports_render(tmp_path):
    a = analyze_checkpoint(save_untrained_checkpoint(tmp_path / "c.pt", overrides=["model.n_layers=6"]))
    b = analyze_checkpoint(save_untrained_checkpoint(tmp_path / "d.pt", "ternary_middle", ["model.n_layers=6"]))
    save_analysis_plot(a, tmp_path / "p.png", other=b)
    data = (tmp_path / "p.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    md = analysis_markdown(a, b)
    assert "| blocks.0.attn.q_proj |" in md and "## Comparison, A vs B" in md
    html = analysis_html(a)
    assert html.startswith("<!doctype html>") and "data:image/png;base64," in html and "<table>" in html


def test_packed_and_training_checkpoints_agree(tmp_path):
    ckpt = save_untrained_checkpoint(tmp_path / "c.pt", overrides=[
        "policy.blocks.1.mlp.up_proj={name: ternary, granularity: group, group_size: 48}"])
    packed = pack_checkpoint(ckpt, tmp_path / "p.safetensors").path
    a, b = analyze_checkpoint(ckpt), analyze_checkpoint(packed)
    assert b.kind == "packed" and [x.name for x in a.layers] == [x.name for x in b.layers]
    for x, y in zip(a.layers, b.layers, strict=True):
        for f in ("quantizer", "spec", "shape", "params", "bits_per_weight", "bytes", "code_bits", "zeros", "plus",
                  "minus", "alpha", "entropy_bits"):
            assert getattr(x, f) == getattr(y, f), (x.name, f)
        assert y.near_threshold is None and y.sqnr_db is None  # need latent weights
    assert a.totals == b.totals and a.middle_vs_boundary == b.middle_vs_boundary


def test_fp32_checkpoint_analysed_as_if_ternary(tmp_path):
    ckpt = save_untrained_checkpoint(tmp_path / "c.pt", "fp32_baseline")
    plain = analyze_checkpoint(ckpt)
    assert plain.layer("blocks.0.attn.q_proj").zeros is None
    a = analyze_checkpoint(ckpt, as_policy="ternary")
    x = a.layer("blocks.0.attn.q_proj")
    assert x.quantizer == "ternary" and a.as_policy == {"_default": "ternary"}
    assert 0.25 < x.zeros < 0.37  # Gaussian init: P(|z| < 0.5 E|z|) ~ 0.31
    assert a.totals["bytes"] < plain.totals["bytes"]
    c = analyze_checkpoint(ckpt, as_policy={"name": "ternary", "granularity": "channel"})
    assert c.layer("blocks.0.attn.q_proj").alpha["count"] == 64
    with pytest.raises(ConfigError, match="latent"):
        analyze_checkpoint(pack_checkpoint(ckpt, tmp_path / "p.safetensors").path, as_policy="ternary")


def test_what_is_particular_to_each_method(tmp_path):
    """Sherry: one zero in every 4; Tequila: dead-zone share and bias; a correction: its share of bytes."""
    ckpt = save_untrained_checkpoint(tmp_path / "c.pt", overrides=[
        "policy.blocks[0].*={name: sherry, granularity: channel}",
        "policy.blocks[1].*={name: tequila, correction: {rank: 4}}"])
    for a in (analyze_checkpoint(ckpt), analyze_checkpoint(pack_checkpoint(ckpt, tmp_path / "p.safetensors").path)):
        s = a.layer("blocks.0.mlp.up_proj")
        assert s.quantizer == "sherry" and s.zeros == 0.25 and s.code_bits == 1.25
        assert s.method["groups_with_one_zero"] == 1.0 and sum(s.method["zero_position"]) == pytest.approx(1.0)
        t = a.layer("blocks.1.attn.q_proj")
        assert t.quantizer == "tequila" and t.method["dead_zone"] == t.zeros
        assert t.method["bias_abs_mean"] > 0
        rows, cols = t.shape
        assert t.method["correction_bytes"] == 2 * 4 * (rows + cols) + 2
        assert t.method["correction_share"] == pytest.approx(t.method["correction_bytes"] / t.bytes)
        m = a.totals["methods"]
        assert m["sherry"]["layers"] == 7 and m["sherry"]["groups_with_one_zero"] == 1.0
        assert m["tequila"]["layers"] == 7 and 0 < m["tequila"]["dead_zone"] < 1
        corr = sum(x.method["correction_bytes"] for x in a.layers if x.method and "correction_bytes" in x.method)
        assert a.totals["correction_bytes"] == corr and a.totals["correction_share"] == corr / a.totals["bytes"]
        text = "\n".join(methods_text(a))
        assert "exactly one zero in 100.0%" in text and "dead zone" in text and "corrections:" in text


def test_issue_12_formats_report_sqnr_codes_and_entropy(tmp_path):
    """intn: entropy of its 2^b codes and code bits; ptqtp: trit fractions over both planes; SQNR
    for all, and it orders the formats as their bits do (same weights, as-if policies)."""
    ckpt = save_untrained_checkpoint(tmp_path / "c.pt", overrides=[
        "policy.blocks[0].*=int3", "policy.blocks[1].*={name: ptqtp, group_size: 32}"])
    for a in (analyze_checkpoint(ckpt), analyze_checkpoint(pack_checkpoint(ckpt, tmp_path / "p.safetensors").path)):
        x = a.layer("blocks.0.mlp.up_proj")
        assert x.quantizer == "intn" and x.code_bits == 3.0 and 2.0 < x.entropy_bits <= 3.0
        assert x.method["levels"] == 8 and x.method["levels_used"] <= 8
        p = a.layer("blocks.1.mlp.up_proj")
        assert p.quantizer == "ptqtp" and p.code_bits == 3.2
        assert p.zeros + p.plus + p.minus == pytest.approx(1.0) and 0 < p.entropy_bits <= math.log2(9)
        assert p.method["plane1_zeros"] >= 0 and p.method["scale_ratio"] > 0
    a = analyze_checkpoint(ckpt)
    assert a.layer("blocks.0.mlp.up_proj").sqnr_db > 0 and a.layer("blocks.1.mlp.up_proj").sqnr_db > 0
    sqnr = {f: analyze_checkpoint(ckpt, as_policy=f).layer("blocks.0.attn.q_proj").sqnr_db
            for f in ("binary", "int2", "int3", "ptqtp", "int4", "int6")}
    assert sqnr["binary"] < sqnr["int3"] < sqnr["int4"] < sqnr["int6"]
    assert sqnr["int2"] < sqnr["ptqtp"] < sqnr["int4"]
