"""Post-training quantization: qtoolkit.quantize / quantize_checkpoint (qtoolkit/training/ptq.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qtoolkit
from qtoolkit import quantizers
from qtoolkit.checkpoint import load_checkpoint
from qtoolkit.errors import CheckpointError, ConfigError, DataError, PolicyError, UnknownNameError
from qtoolkit.layers import QuantEmbedding, QuantLinear
from qtoolkit.pack import (
    load_packed,
    memory_plan,
    model_from_checkpoint,
    pack_checkpoint,
    save_packed,
)
from qtoolkit.policy import apply_policy
from qtoolkit.training.ptq import policy_source, quantize_checkpoint

from .conftest import write_corpus


class TwoLinears(nn.Module):
    """A model that is not a DecoderLM: an embedding and two linears (with biases)."""

    def __init__(self, vocab=50, d=16, hidden=24):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, vocab)

    def forward(self, idx):
        return self.down(F.relu(self.up(self.embed(idx))))


def test_quantize_a_user_module_with_a_policy(tmp_path):
    torch.manual_seed(0)
    net = TwoLinears()
    x = torch.randint(0, 50, (2, 7))
    q = {n: quantizers.build(s) for n, s in (("embed", "int8"), ("up", "ternary"), ("down", "int8"))}
    with torch.no_grad():  # what the quantized module must compute, by hand
        e = q["embed"](net.embed.weight)[x]
        xq = quantizers.base.fake_quant_int8_per_token(e)  # ternary's default int8 activations
        h = F.relu(F.linear(xq, q["up"](net.up.weight), net.up.bias))
        expected = F.linear(h, q["down"](net.down.weight), net.down.bias)

    out = qtoolkit.quantize(net, {"_default": "int8", "up": "ternary", "embed": "int8"})
    assert out is net  # in place, like torchao's quantize_
    assert isinstance(net.up, QuantLinear) and isinstance(net.down, QuantLinear)
    assert isinstance(net.embed, QuantEmbedding)
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, rtol=0, atol=0)

    # bytes: the live plan equals what save_packed writes, biases included (fp32)
    plan = memory_plan(net)
    assert plan.model_config is None
    assert {e.name for e in plan.entries if e.kind == "param"} == {"up.bias", "down.bias"}
    result = save_packed(net, tmp_path / "net.safetensors")
    assert result.tensor_bytes == plan.total_bytes
    assert plan.total_bytes == sum(quantizers.build(s).nbytes(shape) for s, shape in (
        ("int8", (50, 16)), ("ternary", (24, 16)), ("int8", (50, 24)))) + 4 * (24 + 50)

    # ... and load_packed rebuilds it into a fresh float instance (even on `meta`): same outputs
    with torch.device("meta"):
        skeleton = TwoLinears()
    restored = load_packed(tmp_path / "net.safetensors", skeleton)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)
    assert torch.equal(restored.up.bias, net.up.bias)


def test_block_selectors_on_other_layouts():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(8, 8)
            self.mlp = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8))

    class Llamaish(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList(Layer() for _ in range(4))
            self.lm_head = nn.Linear(8, 10)

    net = Llamaish()
    cov = {a.name: a for a in apply_policy(net, {"_default": "int8", "blocks[0, -1]": "ternary",
                                                 "blocks[1:3].mlp.*": "fp16"}).layers}
    assert cov["model.layers.0.q"].quantizer == "ternary" and cov["model.layers.3.mlp.1"].quantizer == "ternary"
    assert cov["model.layers.1.mlp.0"].quantizer == "fp16" and cov["model.layers.1.q"].quantizer == "int8"

    class Custom(nn.Module):  # a block list under a name nobody guesses: named with blocks=
        def __init__(self):
            super().__init__()
            self.stack = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    with pytest.raises(PolicyError, match="blocks=NAME"):
        apply_policy(Custom(), {"blocks[-1]": "int8"})
    cov = {a.name: a for a in apply_policy(Custom(), {"blocks[-1]": "int8"}, blocks="stack").layers}
    assert cov["stack.2"].quantizer == "int8" and cov["stack.0"].spec is None


def test_quantize_checkpoint_writes_a_training_checkpoint(fp32_ckpt, tmp_path):
    result = quantize_checkpoint(fp32_ckpt, policy_source("ternary_all"), tmp_path / "q")
    ckpt = load_checkpoint(result.path)
    assert ckpt["kind"] == "train" and ckpt["policy"] == {"_default": "ternary", "embed": "int8", "lm_head": "int8"}
    assert ckpt["recipe"]["policy"] == ckpt["policy"] and "optimizer" not in ckpt
    assert ckpt["quantized"]["source"]["checkpoint"] == str(fp32_ckpt)
    assert result.calibration["layers"] == []  # ternary/int8 fit nothing on data
    model, _ = model_from_checkpoint(ckpt)
    direct = qtoolkit.quantize(fp32_ckpt, policy_source("ternary_all"))
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(x), direct(x), rtol=0, atol=0)
    packed = pack_checkpoint(result.path, tmp_path / "p.safetensors")
    assert packed.tensor_bytes == result.total_bytes


def test_quantizing_a_quantized_checkpoint_keeps_trained_state(fp32_ckpt, tmp_path):
    """Layers whose spec is unchanged keep their learned scales; the others start from the latents."""
    learned = {"_default": {"name": "ternary", "alpha": "learned"}, "embed": "int8", "lm_head": "int8"}
    first = quantize_checkpoint(fp32_ckpt, learned, tmp_path / "a")
    ckpt = load_checkpoint(first.path)
    with torch.no_grad():  # pretend QAT moved the learned scales
        for k, v in ckpt["model"].items():
            if k.endswith("quantizer.alpha"):
                v.mul_(1.5)
    torch.save({k: v for k, v in ckpt.items() if k != "path"}, tmp_path / "trained.pt")
    second = quantize_checkpoint(tmp_path / "trained.pt", {**learned, "blocks.0.mlp.up_proj": "int8"}, tmp_path / "b")
    assert "blocks.0.attn.q_proj" in second.adopted and "blocks.0.mlp.up_proj" not in second.adopted
    out = load_checkpoint(second.path)["model"]
    key = "blocks.1.mlp.down_proj.quantizer.alpha"
    assert torch.equal(out[key], ckpt["model"][key])


def test_policy_sources(tmp_path):
    assert policy_source("int8_all") == {"_default": "int8", "embed": "int8"}
    assert policy_source("int8") == {"_default": "int8"}
    assert policy_source("{_default: ternary, embed: int8}") == {"_default": "ternary", "embed": "int8"}
    f = tmp_path / "policy.yaml"
    f.write_text("# search output\n_default: ternary\nlm_head: int8\n")
    assert policy_source(str(f), ["policy.embed=fp16"]) == {"_default": "ternary", "lm_head": "int8", "embed": "fp16"}
    assert policy_source(None, ["policy._default=int8"]) == {"_default": "int8"}
    assert policy_source(None, [f"policy={f}"]) == {"_default": "ternary", "lm_head": "int8"}
    with pytest.raises(UnknownNameError, match="not a policy file, a shipped recipe"):
        policy_source("nope")
    with pytest.raises(ConfigError, match="no policy given"):
        policy_source(None)
    with pytest.raises(ConfigError, match="only policy overrides"):
        policy_source("int8", ["train.lr=1"])


def test_calibrated_quantize_is_deterministic_and_uses_the_checkpoint_data(calib_int8, fp32_ckpt, tmp_path):
    policy = {"_default": "calib_int8", "embed": "int8"}
    a = quantize_checkpoint(fp32_ckpt, policy, tmp_path / "a", calib_tokens=256, seed=3)
    b = quantize_checkpoint(fp32_ckpt, policy, tmp_path / "b", calib_tokens=256, seed=3)
    c = quantize_checkpoint(fp32_ckpt, policy, tmp_path / "c", calib_tokens=256, seed=4)
    assert a.calibration["tokens"] == 256 and len(a.calibration["layers"]) == 2 * 7 + 1
    sa, sb, sc = (load_checkpoint(r.path)["model"] for r in (a, b, c))
    key = "blocks.1.mlp.down_proj.quantizer.scale"
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa[key], sc[key])  # another seed, other windows
    # the written checkpoint evaluates exactly like the in-memory model
    model, _ = model_from_checkpoint(load_checkpoint(a.path))
    direct = qtoolkit.quantize(fp32_ckpt, policy, calib_tokens=256, seed=3)
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(x), direct(x), rtol=0, atol=0)


def test_a_user_module_with_a_calibrating_quantizer_needs_calib(calib_int8):
    with pytest.raises(ConfigError, match="pass calib="):
        qtoolkit.quantize(TwoLinears(), {"_default": "calib_int8"})
    net = qtoolkit.quantize(TwoLinears(), {"_default": "calib_int8"}, calib=[torch.randint(0, 50, (2, 5))])
    assert net.up.quantizer.last_h is not None


# ------------------------------------------------------------------------------ bad input


def _nothing_written(path):
    return not path.exists() or not any(path.iterdir())


def test_policy_that_does_not_fit(fp32_ckpt, tmp_path):
    with pytest.raises(PolicyError, match="blocks.7.mlp.up_proj: matches no quantizable module"):
        quantize_checkpoint(fp32_ckpt, {"_default": "ternary", "blocks.7.mlp.up_proj": "int8"}, tmp_path / "q")
    assert _nothing_written(tmp_path / "q")


def test_packed_checkpoint_is_refused(fp32_ckpt, tmp_path):
    pack_checkpoint(fp32_ckpt, tmp_path / "p.safetensors")
    with pytest.raises(CheckpointError, match="already packed"):
        quantize_checkpoint(tmp_path / "p.safetensors", {"_default": "int8"}, tmp_path / "q")
    assert _nothing_written(tmp_path / "q")


def test_calibration_data_too_short(calib_int8, fp32_ckpt, tmp_path):
    short = tmp_path / "short"
    short.mkdir()
    write_corpus(short / "train.txt", 20, seed=5)  # ~1k tokens
    write_corpus(short / "val.txt", 5, seed=6)
    with pytest.raises(DataError, match="calibration data too short.*--calib-tokens 100,000"):
        quantize_checkpoint(fp32_ckpt, {"_default": "calib_int8"}, tmp_path / "q", data=str(short),
                            calib_tokens=100_000)
    assert _nothing_written(tmp_path / "q")


def test_existing_output_is_never_replaced(fp32_ckpt, tmp_path):
    out = tmp_path / "q"
    quantize_checkpoint(fp32_ckpt, {"_default": "int8"}, out)
    before = (out / "ckpt.pt").read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        quantize_checkpoint(fp32_ckpt, {"_default": "ternary"}, out)
    assert (out / "ckpt.pt").read_bytes() == before


def test_gptq_through_qtool_quantize_packs_and_continues(fp32_ckpt, tmp_path):
    """`qtool quantize --policy gptq3`: GPTQ calibrates every linear on the checkpoint's data, the
    written checkpoint evaluates as the in-memory model, packs to its bytes, and a second quantize
    with the same spec adopts the fitted scales instead of recalibrating."""
    policy = policy_source("gptq3")
    result = quantize_checkpoint(fp32_ckpt, policy, tmp_path / "q", calib_tokens=256)
    assert len(result.calibration["layers"]) == 2 * 7 + 1  # blocks' linears and the lm_head
    ckpt = load_checkpoint(result.path)
    assert ckpt["policy"] == {"_default": "gptq3"} and "blocks.0.attn.q_proj.quantizer.scale" in ckpt["model"]
    model, _ = model_from_checkpoint(ckpt)
    direct = qtoolkit.quantize(fp32_ckpt, policy, calib_tokens=256)
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(x), direct(x), rtol=0, atol=0)
    packed = pack_checkpoint(result.path, tmp_path / "p.safetensors")
    assert packed.tensor_bytes == result.total_bytes
    again = quantize_checkpoint(result.path, policy, tmp_path / "q2", calib_tokens=256)
    assert again.calibration["layers"] == [] and "blocks.0.attn.q_proj" in again.adopted
