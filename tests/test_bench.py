"""`qtool bench`'s library side: child processes, figures, ratios (no timing assertions)."""

from __future__ import annotations

import pytest

from qtoolkit.config import ModelConfig
from qtoolkit.deploy.bench import (
    BenchReport,
    VariantResult,
    fit_context,
    parse_baselines,
    run_bench,
)
from qtoolkit.deploy.kernels import BUILD_STAGE
from qtoolkit.errors import ConfigError
from qtoolkit.pack import pack_checkpoint
from tests.conftest import save_untrained_checkpoint


@pytest.fixture(scope="module")
def packed_tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return pack_checkpoint(save_untrained_checkpoint(root / "ckpt.pt"), root / "p.safetensors").path


def test_bench_measures_every_variant_in_its_own_process(packed_tiny):
    events = []
    rep = run_bench(packed_tiny, ["fp32", "int8-dynamic"], threads=1, prompt_len=8, new_tokens=4, repeats=2,
                    progress=lambda stage, done, total: events.append((stage, done, total)))
    measured = [e for e in events if e[0] != BUILD_STAGE]  # a first-use kernel build may come first
    assert measured == [("measuring packed", 0, 3), ("measuring fp32", 1, 3), ("measuring int8-dynamic", 2, 3),
                        ("measuring", 3, 3)]
    assert [r.variant for r in rep.results] == ["packed", "fp32", "int8-dynamic"]
    packed, fp32, dyn = rep.results
    assert fp32.backend == "fp32" and dyn.backend == "int8-dynamic"
    for r in rep.results:
        assert r.threads == 1 and len(r.prefill_s) == 2 and len(r.decode_s) == 2
        assert r.prefill_tok_s > 0 and r.decode_tok_s > 0
        assert r.peak_rss_bytes >= r.loaded_rss_bytes > r.torch_rss_bytes > 10 * 2**20
        assert r.kv_cache_bytes == 2 * 2 * 1 * 4 * 12 * 16 * 4  # k+v, layers, batch, heads, P+N, head dim, fp32
    # the tiny model: 512 x 64 int8 embed/head, 2-bit blocks; fp32 holds 4 bytes per weight
    assert fp32.weight_bytes == 4 * ModelConfig.from_name("tiny").num_params()
    assert packed.weight_bytes < fp32.weight_bytes / 3
    assert dyn.weight_bytes < fp32.weight_bytes
    q = rep.ratios()["fp32"]
    assert q["decode_speedup"] == pytest.approx(packed.decode_tok_s / fp32.decode_tok_s)
    assert q["peak_rss_ratio"] == pytest.approx(packed.peak_rss_bytes / fp32.peak_rss_bytes)
    d = rep.to_dict()
    assert set(d) == {"checkpoint", "model", "notes", "warnings", "results", "ratios"}
    lo, hi = d["results"][0]["decode_tok_s_range"]
    assert lo <= d["results"][0]["decode_tok_s"] <= hi and d["notes"] == []


def test_bench_forced_fallback_and_no_baselines(packed_tiny):
    rep = run_bench(packed_tiny, [], threads=1, prompt_len=4, new_tokens=2, repeats=1, kernels="reference")
    assert [r.variant for r in rep.results] == ["packed"] and rep.results[0].backend == "reference"
    assert rep.ratios() == {}


def test_bench_arguments_are_checked(packed_tiny):
    assert parse_baselines("fp32, int8-dynamic,fp32") == ["fp32", "int8-dynamic"]
    assert parse_baselines("") == []
    with pytest.raises(ConfigError, match="unknown baseline.*fp16.*available: fp32, int8-dynamic"):
        parse_baselines("fp32,fp16")
    with pytest.raises(ConfigError, match=">= 1"):
        run_bench(packed_tiny, [], new_tokens=0)


def test_ratio_arithmetic():
    def r(variant, dec, pre, wb, rss):
        return VariantResult(variant, variant, "", 2, 128, 64, [128 / pre], [64 / dec], wb, 0, rss, 200, 250, 1.0)

    from qtoolkit.deploy.bench import BenchReport

    rep = BenchReport("x", {}, [r("packed", 150, 1000, 45, 300), r("fp32", 25, 400, 450, 800)])
    q = rep.ratios()["fp32"]
    assert q["decode_speedup"] == pytest.approx(6.0) and q["prefill_speedup"] == pytest.approx(2.5)
    assert q["weight_bytes_ratio"] == pytest.approx(0.1) and q["peak_rss_ratio"] == pytest.approx(0.375)
    assert q["peak_rss_above_torch_ratio"] == pytest.approx(100 / 600)


def test_lengths_beyond_the_context_are_clamped_and_reported(packed_tiny):
    assert fit_context(128, 64, 512) == (128, 64)
    assert fit_context(128, 64, 64) == (43, 21)  # in proportion, summing to the context
    assert fit_context(1000, 1, 64) == (63, 1) and fit_context(1, 1000, 64) == (1, 63)
    with pytest.raises(ConfigError, match="context"):
        fit_context(8, 8, 1)
    rep = run_bench(packed_tiny, [], threads=1, repeats=1, kernels="reference")  # defaults: 128 + 64 > 64
    r = rep.results[0]
    assert (r.prompt_len, r.new_tokens) == (43, 21)
    assert rep.notes == ["prompt 128 + 64 new tokens exceed the model's context of 64; measured 43 + 21 instead"]


def test_spread_is_reported_and_large_spread_warns():
    def r(variant, decode_s):
        return VariantResult(variant, variant, "", 1, 8, 10, [0.01, 0.01, 0.01], decode_s, 1, 0, 300, 200, 250, 1.0)

    steady, noisy = r("packed", [0.10, 0.11, 0.10]), r("fp32", [0.10, 0.50, 0.12])
    assert noisy.decode_tok_s == pytest.approx(10 / 0.12)  # the median round
    assert noisy.decode_tok_s_range == pytest.approx((10 / 0.50, 10 / 0.10))
    assert steady.spread() == pytest.approx(1.1) and noisy.spread() == pytest.approx(5.0)
    warnings = BenchReport("x", {}, [steady, noisy]).warnings()
    assert len(warnings) == 1 and warnings[0].startswith("fp32: rounds differ by 5.0x")
