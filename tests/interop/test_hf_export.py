"""`qtool export --format hf`: transformers loads the directory and computes the quantized model.

Tolerance. Layer by layer, transformers' AutoBitLinear computes qtoolkit's ternary layer on the same
input to float rounding (same activation codes; alpha multiplies after the matmul there, before it
here): max |diff| <= 1e-5 * max |y|. End to end that rounding once in a while puts an activation on
the other side of a .5 (seen: one code of ~70k, 54 vs 53), which shifts that token's and, through its
k/v, the later tokens' logits by activation-quantization noise, as in the inference runtime; so the
logits are checked with the runtime's tolerance (max |diff| <= 5%, mean <= 0.5% of max |logit|,
tests/test_runtime.py), and greedy generations are identical.
torch.compile (which transformers' bitnet code
uses) is switched off here: it compiles for ~50 s on 2 cores and computes the same values.
"""

from __future__ import annotations

import json

import pytest
import torch

from qtoolkit.checkpoint import load_checkpoint
from qtoolkit.errors import CheckpointError
from qtoolkit.interop.hf_export import export_hf, pack_rows, unpack_rows
from qtoolkit.pack import model_from_checkpoint, model_from_packed, pack_checkpoint
from tests.conftest import save_untrained_checkpoint
from tests.interop.conftest import train_bpe

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

BASE = ["model.n_kv_heads=2", "model.vocab_size=400"]


@pytest.fixture(autouse=True)
def _no_compile():
    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    from tests.conftest import write_corpus

    d = tmp_path_factory.mktemp("bpe")
    write_corpus(d / "a.txt", 300)
    return train_bpe(d, 380).to_str()


def perturb(model):
    for p in model.parameters():
        if p.dim() == 2:
            p.mul_(5)


def checkpoint(path, tokenizer_json, recipe="ternary_all", overrides=()):
    p = save_untrained_checkpoint(path, recipe, [*BASE, *overrides], mutate=perturb)
    ckpt = torch.load(p, weights_only=True)
    ckpt["tokenizer"] = tokenizer_json
    torch.save(ckpt, p)
    return p


def layer_inputs(model, names: list[str], x) -> dict[str, torch.Tensor]:
    """{module name: its input} in a forward of `model`."""
    inputs, hooks = {}, []
    for name in names:
        def hook(m, inp, out, key=name):
            inputs[key] = inp[0].detach()
        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return inputs


def assert_same_model(result, hf, ours, x):
    from qtoolkit.interop.hf_names import to_hf

    bitnet = [layer.name for layer in result.layers if layer.how == "bitnet"]
    assert bitnet
    for name, inp in layer_inputs(ours, bitnet, x).items():  # each layer on the same input
        with torch.no_grad():
            y, expected = hf.get_submodule(to_hf(name))(inp), ours.get_submodule(name)(inp)
        assert float((y - expected).abs().max()) <= 1e-5 * float(expected.abs().max()), name
    with torch.no_grad():
        got, expected = hf(x).logits, ours(x)
    scale = float(expected.abs().max())
    diff = (got - expected).abs()
    assert scale > 1.0 and float(diff.max()) <= 0.05 * scale and float(diff.mean()) <= 0.005 * scale


def both(ckpt_path, out):
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    return hf, model_from_packed(load_checkpoint(pack_checkpoint(ckpt_path, out.parent / "p.safetensors").path))


def test_packing_is_transformers_own():
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    codes = torch.randint(-1, 2, (20, 9), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pack_rows(codes), pack_weights(codes.clone()))
    assert torch.equal(unpack_rows(pack_rows(codes)), codes)
    assert torch.equal(unpack_weights(pack_rows(codes), dtype=torch.float32), codes.float())


@pytest.mark.parametrize("recipe,arch", [("ternary_all", "LlamaForCausalLM"), ("ternary_bitnet2b", "BitNetForCausalLM")],
                         ids=["llama", "subln_bitnet"])
def test_transformers_computes_the_quantized_model(tmp_path, tokenizer_json, recipe, arch):
    ckpt_path = checkpoint(tmp_path / "t.pt", tokenizer_json, recipe)
    result = export_hf(ckpt_path, tmp_path / "hf")
    assert result.architecture == arch
    assert result.not_converted == ["lm_head"] and all(x.exact for x in result.layers)
    assert sum(x.how == "bitnet" for x in result.layers) == 2 * 7
    x = torch.randint(0, 400, (2, 40), generator=torch.Generator().manual_seed(1))
    hf, ours = both(ckpt_path, tmp_path / "hf")
    assert type(hf.model.layers[0].self_attn.q_proj).__name__ == "AutoBitLinear"
    assert type(hf.lm_head).__name__ == "Linear"
    assert_same_model(result, hf, ours, x)

    # generate() runs the same model: greedy tokens equal the fake-quantized model's
    ids = x[:1, :8]
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=6, do_sample=False)[0, 8:].tolist()
        model, _ = model_from_checkpoint(load_checkpoint(ckpt_path))
        seq = ids[0].tolist()
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[8:]


def test_directory_files_config_and_card(tmp_path, tokenizer_json):
    ckpt_path = checkpoint(tmp_path / "t.pt", tokenizer_json)
    result = export_hf(ckpt_path, tmp_path / "hf")
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert names == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "generation_config.json", "README.md"}
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    q = cfg["quantization_config"]
    assert (q["quant_method"], q["linear_class"], q["quantization_mode"]) == ("bitnet", "autobitlinear", "offline")
    assert q["modules_to_not_convert"] == ["lm_head"] and cfg["num_key_value_heads"] == 2
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.k_proj.weight")
        assert w.dtype == torch.uint8 and tuple(w.shape) == (32 // 4, 64)  # 2 bits per weight
        assert tuple(f.get_tensor("model.layers.0.self_attn.k_proj.weight_scale").shape) == (1,)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "_default" in card and "bitnet" in card and "modules_to_not_convert" in card
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.eos_token == "<|endoftext|>" and tok("Once upon a time").input_ids
    assert result.weights_bytes < result.file_bytes and result.packed_bytes > 0


def test_layers_bitnet_cannot_hold_are_dequantized_and_listed(tmp_path, tokenizer_json):
    ckpt_path = checkpoint(tmp_path / "t.pt", tokenizer_json, overrides=[
        "policy.blocks.0.attn.q_proj={name: ternary, granularity: channel}",
        "policy.blocks.0.mlp.up_proj={name: int8, activations: int8}",
        "policy.blocks.1.attn.o_proj={name: ternary, activations: none}",
        "policy.blocks.1.mlp.gate_proj=fp16"])
    result = export_hf(ckpt_path, tmp_path / "hf")
    by = {x.name: x for x in result.layers}
    assert by["blocks.0.attn.q_proj"].how == "float" and "channel scales" in by["blocks.0.attn.q_proj"].reason
    assert not by["blocks.0.attn.q_proj"].exact and not by["blocks.0.mlp.up_proj"].exact  # they quantized inputs
    assert by["blocks.1.attn.o_proj"].exact and by["blocks.1.mlp.gate_proj"].exact  # weight-only: still exact
    assert set(result.not_converted) == {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
                                         "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.gate_proj", "lm_head"}
    assert len(result.notes) == 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    assert type(hf.model.layers[0].self_attn.k_proj).__name__ == "AutoBitLinear"
    with torch.no_grad():
        assert torch.isfinite(hf(torch.randint(0, 400, (1, 12))).logits).all()


def test_tied_head_and_refusals(tmp_path, tokenizer_json):
    ckpt_path = checkpoint(tmp_path / "t.pt", tokenizer_json, overrides=["model.tie_embeddings=true"])
    result = export_hf(ckpt_path, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head" in result.not_converted
    x = torch.randint(0, 400, (1, 20))
    hf, ours = both(ckpt_path, tmp_path / "hf")
    assert_same_model(result, hf, ours, x)
    with pytest.raises(CheckpointError, match="not an empty directory"):
        export_hf(ckpt_path, tmp_path / "hf")
