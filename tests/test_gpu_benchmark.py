"""benchmarks/gpu.py: the CPU smoke path (tiny preset, a few steps) and the refusal without CUDA;
the GPU figures themselves are measured on a GPU (docs/training.md)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

GPU_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("qtoolkit_gpu_bench", GPU_BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_says_so(gpu_bench, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_bench.main([]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--device cpu" in err


def test_cpu_smoke_run_reports_every_figure(gpu_bench, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("QTOOLKIT_COMPILE_BACKEND", "aot_eager")  # compile=on through the real option path, faster
    assert gpu_bench.main(["--device", "cpu", "--rounds", "1", "--warmup", "1", "--repeats", "1",
                           "--work-dir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device"] == "cpu"
    rows = out["train"]
    assert [(r["preset"], r["compile"]) for r in rows] == [("tiny", False), ("tiny", True)]
    for r in rows:
        assert r["compiled"] == {"fp32_baseline": r["compile"], "ternary_all": r["compile"]} and not r["notices"]
        for name in ("fp32_baseline", "ternary_all"):
            assert r[name]["tokens_per_s"] > 0 and r[name]["mfu"] is None  # no known peak for a CPU
        assert r["ratio_ternary_over_fp32"] > 0
    assert set(out["ratio_ternary_over_fp32"]) == {"tiny/compile=off", "tiny/compile=on"}
    assert out["probe"]["preset"] == "tiny" and out["probe"]["seconds"] > 0 and out["probe"]["pairs_measured"] > 0
    (dec,) = out["decode"]
    assert dec["new_tokens"] == 8 and dec["decode_tokens_per_s"] > 0 and dec["packed_file_bytes"] > 0
