"""`qtool generate` and `qtool bench` through the CLI."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from qtoolkit.cli import app
from qtoolkit.pack import pack_checkpoint
from tests.conftest import save_untrained_checkpoint

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_generate_streams_text_and_is_reproducible(trained_tiny, tmp_path):
    packed = pack_checkpoint(trained_tiny, tmp_path / "p.safetensors").path
    args = ["generate", packed, "--prompt", "Once upon a time,", "--max-new-tokens", 20, "--seed", 3]
    a, b = run(*args), run(*args)
    assert a.exit_code == 0, a.output
    assert a.stdout.startswith("Once upon a time,") and len(a.stdout) > len("Once upon a time,") + 10
    assert a.stdout == b.stdout  # same seed, same text
    assert "kernels:" in a.stderr and "decode" in a.stderr  # the summary line goes to stderr
    greedy = run("generate", packed, "--prompt", "Tom", "--temperature", 0, "--kernels", "reference",
                 "--max-new-tokens", 8)
    assert greedy.exit_code == 0 and "kernels: reference" in greedy.stderr
    # the GPU's weight layout on the CPU: same greedy text as the integer path, bytes in the JSON
    out = tmp_path / "g.json"
    dense = run("generate", packed, "--prompt", "Tom", "--temperature", 0, "--weights", "bf16", "--device", "cpu",
                "--max-new-tokens", 8, "--json", out)
    assert dense.exit_code == 0, dense.output
    assert dense.stdout == greedy.stdout and "kernels: dense" in dense.stderr
    summary = json.loads(out.read_text())["weights"]
    assert summary["layout"] == "bf16" and summary["bytes_by_dtype"]["bfloat16"] > 0
    r = run("generate", packed, "--prompt", "Tom", "--weights", "int3")
    assert r.exit_code == 1 and "weights must be one of" in r.output and "Traceback" not in r.output


def test_generate_user_errors(trained_tiny, tmp_path):
    ckpt = pack_checkpoint(save_untrained_checkpoint(tmp_path / "c.pt"), tmp_path / "p.safetensors").path
    r = run("generate", ckpt, "--prompt", "hi")
    assert r.exit_code == 1 and "no usable tokenizer" in r.output and "Traceback" not in r.output
    r = run("generate", tmp_path / "missing.safetensors", "--prompt", "hi")
    assert r.exit_code == 1 and "no such file" in r.output
    r = run("generate", trained_tiny, "--prompt", "Once upon a time", "--max-new-tokens", 200)
    assert r.exit_code == 1 and "exceed the model's context of 64 tokens" in r.output
    assert not r.stdout.startswith("Once")  # nothing printed before the error
    r = run("generate", ckpt, "--prompt", "hi", "--kernels", "gpu")
    assert r.exit_code == 1 and "kernels" in r.output and "Traceback" not in r.output


def test_bench_table_and_json(tmp_path):
    ckpt = pack_checkpoint(save_untrained_checkpoint(tmp_path / "c.pt"), tmp_path / "p.safetensors").path
    out = tmp_path / "bench.json"
    r = run("bench", ckpt, "--baselines", "fp32", "--threads", 1, "--prompt-len", 8, "--new-tokens", 4,
            "--repeats", 1, "--json", out)
    assert r.exit_code == 0, r.output
    assert "Inference benchmark" in r.output and "packed vs fp32" in r.output
    data = json.loads(out.read_text())
    assert [x["variant"] for x in data["results"]] == ["packed", "fp32"] and "fp32" in data["ratios"]
    r = run("bench", ckpt, "--baselines", "int4")
    assert r.exit_code == 1 and "unknown baseline" in r.output
