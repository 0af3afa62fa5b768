"""`qtool import` and `qtool export`: thin commands, clear errors, JSON output, nothing overwritten."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from qtoolkit.cli import app

pytest.importorskip("transformers")
pytest.importorskip("gguf")
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(autouse=True)
def _no_compile():
    with torch._dynamo.config.patch(disable=True):
        yield


def test_import_then_export_to_both_formats(hf_llama, tmp_path):
    r = run("import", hf_llama, "-o", tmp_path / "imp", "--json", tmp_path / "imp.json")
    assert r.exit_code == 0, r.output
    assert "Imported Hugging Face model" in r.output and "grouped-query attention" in r.output
    data = json.loads((tmp_path / "imp.json").read_text())
    assert data["model_config"]["n_kv_heads"] == 2 and data["checkpoint"].endswith("ckpt.pt")

    r = run("export", tmp_path / "imp", "--type", "q8_0", "--json", "-")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["type"] == "q8_0" and (tmp_path / "imp" / "model-q8_0.gguf").is_file()
    assert out["types"]["Q8_0"] == 3 * 7 + 2 and out["file_bytes"] > 0  # fp32 layers by llama.cpp's Q8_0 rule

    r = run("export", tmp_path / "imp", "--format", "hf", "-o", tmp_path / "hf")
    assert r.exit_code == 0, r.output
    assert "transformers export (LlamaForCausalLM)" in r.output and (tmp_path / "hf" / "config.json").is_file()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in config  # an fp32 model: nothing for bitnet to hold

    # and transformers gives back the logits of the model that was imported
    import transformers

    x = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        a = transformers.LlamaForCausalLM.from_pretrained(hf_llama)(x).logits
        b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(x).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(a.abs().max()))


@pytest.mark.parametrize("args,message", [
    (["export", "{ckpt}", "--format", "onnx"], "--format must be gguf or hf"),
    (["export", "{ckpt}", "--type", "q4_k"], "--type must be one of tq2_0, tq1_0, q8_0, f16"),
    (["export", "{ckpt}", "--format", "hf", "--type", "tq1_0"], "--type applies to --format gguf only"),
    (["export", "{tmp}/missing.pt"], "no such file"),
    (["import", "{tmp}"], "config.json: not found"),
])
def test_errors_are_one_line(hf_llama, tmp_path, args, message):
    ckpt = tmp_path / "imp" / "ckpt.pt"
    if "{ckpt}" in args:
        assert run("import", hf_llama, "-o", tmp_path / "imp").exit_code == 0
    r = run(*[a.replace("{ckpt}", str(ckpt)).replace("{tmp}", str(tmp_path)) for a in args])
    assert r.exit_code == 1
    assert message in r.output and "Traceback" not in r.output


def test_existing_outputs_are_never_overwritten(hf_llama, tmp_path):
    assert run("import", hf_llama, "-o", tmp_path / "imp").exit_code == 0
    gguf_path = tmp_path / "imp" / "model-tq2_0.gguf"
    gguf_path.write_bytes(b"mine")
    r = run("export", tmp_path / "imp")
    assert r.exit_code == 1 and "already exists" in r.output and gguf_path.read_bytes() == b"mine"
    r = run("import", hf_llama, "-o", tmp_path / "imp")
    assert r.exit_code == 1 and "already exists" in r.output
