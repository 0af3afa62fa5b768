"""`qtool import` / `qtoolkit.from_hf`: a random transformers Llama (GQA) imported without the network.

Tolerance: the imported DecoderLM's logits equal transformers' to float32 rounding,
max |diff| <= 1e-5 * max |logit| (measured 1.1e-6 to 2.0e-6 of max |logit| ~ 5.3: the same operations
in another order).
"""

from __future__ import annotations

import json

import pytest
import torch

from qtoolkit.checkpoint import load_checkpoint
from qtoolkit.errors import CheckpointError, ConversionError
from qtoolkit.interop import hf_names
from qtoolkit.interop.hf_import import from_hf, import_hf
from tests.interop.conftest import VOCAB, save_hf_llama

transformers = pytest.importorskip("transformers")


def hf_logits(path, x):
    model = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(x).logits


def assert_same_logits(got, expected):
    scale = float(expected.abs().max())
    assert scale > 1.0  # the random model's logits have some range
    assert float((got - expected).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("tie,kv_heads", [(False, 2), (True, 1), (False, 4)], ids=["gqa", "mqa_tied", "mha"])
def test_logits_equal_transformers(tmp_path, corpus_dir, tie, kv_heads):
    path = save_hf_llama(tmp_path / "hf", corpus_dir, tie=tie, kv_heads=kv_heads)
    hf = from_hf(path)
    assert (hf.config.n_kv_heads, hf.config.tie_embeddings, hf.config.rope_theta) == (kv_heads, tie, 5000.0)
    x = torch.randint(0, VOCAB, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_same_logits(hf.model(x), hf_logits(path, x))
    if tie:
        assert hf.model.lm_head.weight is hf.model.embed.weight


def test_import_writes_a_checkpoint_the_other_commands_take(hf_llama, tmp_path, corpus_dir):
    from qtoolkit.deploy.runtime import InferenceModel, load_inference_model
    from qtoolkit.evaluate.analyze import analyze_checkpoint
    from qtoolkit.pack import model_from_checkpoint, pack_checkpoint
    from qtoolkit.training.trainer import evaluate_checkpoint

    result = import_hf(hf_llama, tmp_path / "imported")
    assert result.path == tmp_path / "imported" / "ckpt.pt"
    assert {p.name for p in (tmp_path / "imported").iterdir()} == {"ckpt.pt", "recipe.yaml", "tokenizer.json",
                                                                    ".qtool.lock"}  # the run directory's lock
    ckpt = load_checkpoint(result.path)
    assert ckpt["kind"] == "train" and ckpt["policy"] == {"_default": "fp32"}
    assert ckpt["model_config"]["n_kv_heads"] == 2 and ckpt["source"]["hf"]["model_type"] == "llama"
    x = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    expected = hf_logits(hf_llama, x)
    model, coverage = model_from_checkpoint(ckpt)
    with torch.no_grad():
        assert_same_logits(model(x), expected)
    # block linears and the head (the policy's fp32), and the embedding (no rule: unquantized, called fp32)
    assert [a.quantizer for a in coverage.layers].count("fp32") == 3 * 7 + 2

    # pack -> the inference runtime (KV cache, GQA) gives the same logits
    packed = pack_checkpoint(result.path, tmp_path / "packed.safetensors")
    assert packed.tensor_bytes == packed.predicted_bytes
    runtime = InferenceModel.from_packed(load_checkpoint(packed.path), "reference")
    torch.testing.assert_close(runtime(x), expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
    assert load_inference_model(result.path).tokenizer.get_vocab_size() <= VOCAB  # the tokenizer is kept

    # eval on text, with the imported tokenizer; analyze as if ternary
    ev = evaluate_checkpoint(result.path, data_path=str(corpus_dir), batches=2)
    assert 0 < ev.val_loss < 10
    a = analyze_checkpoint(result.path, as_policy={"_default": "ternary"})
    assert any(layer.name == "blocks.0.attn.k_proj" for layer in a.layers)


def test_import_refuses_to_overwrite(hf_llama, tmp_path):
    out = tmp_path / "imported"
    import_hf(hf_llama, out)
    before = (out / "ckpt.pt").read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        import_hf(hf_llama, out)
    assert (out / "ckpt.pt").read_bytes() == before


def test_probe_takes_an_imported_checkpoint(hf_llama, tmp_path, corpus_dir):
    from qtoolkit.search.probes import parse_formats, run_probe

    result = import_hf(hf_llama, tmp_path / "imported")
    probe = run_probe(result.path, parse_formats("ternary,int8"), "group", str(corpus_dir), 256, 0, None)
    assert len(probe.to_dict()["units"]) == 2 + 2 * 3


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "qwen2"}, "model_type='qwen2' is not supported"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_parameters.rope_type='llama3'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type='linear'"),
    ({"head_dim": 32}, "head_dim=32"),
    ({"num_key_value_heads": 3}, "n_kv_heads: n_heads=4 is not a multiple of n_kv_heads=3"),
    ({"quantization_config": {"quant_method": "bitnet"}}, "already quantized"),
    ({"tie_word_embeddings": True}, "lm_head.weight differs"),
    ({"num_hidden_layers": 4}, "missing model.layers.3.input_layernorm.weight"),
    ({"intermediate_size": 100}, r"model.layers.0.mlp.gate_proj.weight has shape \(96, 64\)"),
    ({"vocab_size": 100}, "more than config.json's vocab_size=100"),
])
def test_unsupported_options_are_one_clear_error(hf_copy, changes, message):
    edit_config(hf_copy, **changes)
    with pytest.raises(ConversionError, match=message) as e:
        from_hf(hf_copy)
    assert "config.json" in str(e.value) or str(hf_copy) in str(e.value)


def test_bad_directories(hf_copy, tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        from_hf(tmp_path / "nope")
    (hf_copy / "tokenizer.json").rename(hf_copy / "tokenizer.model")
    with pytest.raises(CheckpointError, match="no tokenizer.json.*SentencePiece"):
        from_hf(hf_copy)
    (hf_copy / "tokenizer.model").rename(hf_copy / "tokenizer.json")
    (hf_copy / "model.safetensors").rename(hf_copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        from_hf(hf_copy)
    (hf_copy / "pytorch_model.bin").write_bytes(b"garbage")
    (hf_copy / "pytorch_model.bin").rename(hf_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        from_hf(hf_copy)


def test_untied_config_without_a_head_and_bias_tensors(hf_copy):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(hf_copy / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if k != "lm_head.weight"}, str(hf_copy / "model.safetensors"))
    with pytest.raises(ConversionError, match="tie_word_embeddings=false, but there is no lm_head.weight"):
        from_hf(hf_copy)
    save_file({**weights, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, str(hf_copy / "model.safetensors"))
    with pytest.raises(ConversionError, match="q_proj.bias is a bias"):
        from_hf(hf_copy)


def test_sharded_weights(hf_llama, tmp_path):
    model = transformers.LlamaForCausalLM.from_pretrained(hf_llama)
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file()
    (out / "tokenizer.json").write_text((hf_llama / "tokenizer.json").read_text())
    x = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(from_hf(out).model(x), from_hf(hf_llama).model(x), rtol=0, atol=0)


def test_names_round_trip():
    names = ["embed.weight", "norm.weight", "lm_head.weight", "blocks.7.attn_norm.weight", "blocks.7.mlp_norm.weight",
             "blocks.0.attn.sub_norm.weight", "blocks.0.mlp.sub_norm.weight"]
    names += [f"blocks.3.attn.{p}_proj.weight" for p in "qkvo"] + [f"blocks.3.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    for n in names:
        assert hf_names.from_hf(hf_names.to_hf(n)) == n
    assert hf_names.to_hf("blocks.2.mlp.down_proj") == "model.layers.2.mlp.down_proj"
    assert hf_names.from_hf("model.layers.0.self_attn.rotary_emb.inv_freq") is None
