"""The calibration driver (qtoolkit/calibration.py) and the quantizer calibration contract, with the
`calib_int8` test quantizer of conftest.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtoolkit.calibration import CalibrationError, calibrate_model, calibration_targets
from qtoolkit.config import ModelConfig
from qtoolkit.layers import QuantLinear
from qtoolkit.model import DecoderLM
from qtoolkit.policy import apply_policy


def tiny(n_layers=3, **kw):
    torch.manual_seed(0)
    return DecoderLM(ModelConfig.from_name("tiny", n_layers=n_layers, **kw)).eval()


def batches(n=3, vocab=512, T=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, T), generator=g) for _ in range(n)]


def reference_h(model, data):
    """sum x^T x of every quantized linear's input, from full forward passes of the final model."""
    h = {}

    def make(name):
        def hook(mod, args):
            x2 = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            h[name] = h.get(name, 0) + x2.T @ x2
        return hook

    handles = [m.register_forward_pre_hook(make(n)) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    with torch.no_grad():
        for x in data:
            model(x)
    for handle in handles:
        handle.remove()
    return h


@pytest.mark.parametrize("policy", [
    {"_default": "calib_int8"},
    {"_default": "ternary", "blocks[1]": "calib_int8", "lm_head": "calib_int8"},  # ternary blocks in between
], ids=["all", "mixed"])
def test_each_layer_sees_the_inputs_of_the_final_quantized_model(calib_int8, policy):
    """Sequential calibration: the statistics a layer fitted on are exactly the statistics of its
    inputs in the finished model (earlier blocks and earlier stages of its own block quantized)."""
    model = tiny()
    apply_policy(model, policy)
    data = batches()
    report = calibrate_model(model, data)
    assert report.mode == "blocks" and report.batches == len(data)
    ref = reference_h(model, data)
    calibrated = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.quantizer.name == "calib_int8"]
    assert set(report.layers) == set(calibrated)
    for name in calibrated:
        q = model.get_submodule(name).quantizer
        assert q.observed_batches == len(data)
        torch.testing.assert_close(q.last_h, ref[name], rtol=1e-9, atol=1e-9)


def test_stages_follow_the_call_order_within_a_block(calib_int8):
    model = tiny(n_layers=1)
    apply_policy(model, {"_default": "calib_int8"})
    report = calibrate_model(model, batches(1))
    assert report.layers == ["blocks.0.attn.q_proj", "blocks.0.attn.k_proj", "blocks.0.attn.v_proj",
                             "blocks.0.attn.o_proj", "blocks.0.mlp.gate_proj", "blocks.0.mlp.up_proj",
                             "blocks.0.mlp.down_proj", "lm_head"]


def test_returned_weight_is_written_in_place_and_rtn_reproduces_the_codes(calib_int8):
    model = tiny(tie_embeddings=True)
    apply_policy(model, {"_default": "calib_int8", "embed": "calib_int8"})
    weight_objects = {n: m.weight for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    calibrate_model(model, batches())
    for name, w in weight_objects.items():
        m = model.get_submodule(name)
        assert m.weight is w  # same Parameter (optimizer references, tying)
        q = m.quantizer
        # the latent weight is on the fitted grid: fake quantization leaves it unchanged
        torch.testing.assert_close(q(m.weight.detach()), m.weight.detach(), rtol=0, atol=1e-6)
    assert model.embed.weight is model.lm_head.weight  # the tied pair was calibrated once, through lm_head


def test_deterministic_and_quantizers_without_calibration_need_no_data(calib_int8):
    outs = []
    for _ in range(2):
        model = tiny()
        apply_policy(model, {"_default": "calib_int8"})
        calibrate_model(model, batches())
        outs.append({k: v.clone() for k, v in model.state_dict().items()})
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])

    model = tiny()
    apply_policy(model, {"_default": "ternary"})
    assert calibration_targets(model) == {}
    report = calibrate_model(model, iter(()))  # no data, and none needed
    assert report.mode == "none" and report.layers == []


def test_a_module_without_a_block_list(calib_int8):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(40, 12)
            self.fc1 = nn.Linear(12, 24)
            self.fc2 = nn.Linear(24, 40)

        def forward(self, idx):
            return self.fc2(F.relu(self.fc1(self.embed(idx))))

    torch.manual_seed(0)
    net = Net()
    apply_policy(net, {"_default": "calib_int8"})
    data = [torch.randint(0, 40, (3, 5)) for _ in range(2)]
    report = calibrate_model(net, data)
    assert report.mode == "model" and report.layers == ["fc1", "fc2"]
    ref = reference_h(net, data)
    for name in ("fc1", "fc2"):
        torch.testing.assert_close(net.get_submodule(name).quantizer.last_h, ref[name], rtol=1e-9, atol=1e-9)


def test_a_layer_the_forward_never_calls_is_an_error(calib_int8):
    model = tiny(n_layers=1)
    model.unused = nn.Linear(64, 64)
    apply_policy(model, {"_default": "calib_int8"})
    with pytest.raises(CalibrationError, match="unused is never called"):
        calibrate_model(model, batches(1))


def test_calibrated_state_round_trips_through_checkpoint_and_pack(calib_int8, tmp_path):
    from qtoolkit.checkpoint import load_checkpoint, save_checkpoint
    from qtoolkit.pack import model_from_checkpoint, pack_checkpoint

    model = tiny()
    policy = {"_default": "calib_int8", "embed": "int8"}
    coverage = apply_policy(model, policy)
    calibrate_model(model, batches())
    state = {"kind": "train", "model_config": model.config.to_dict(), "recipe": {}, "policy": policy,
             "coverage": coverage.to_dict(), "tokenizer": "", "model": model.state_dict(), "step": 0}
    assert "blocks.0.attn.q_proj.quantizer.scale" in state["model"]
    save_checkpoint(state, tmp_path / "ckpt.pt")
    loaded, _ = model_from_checkpoint(load_checkpoint(tmp_path / "ckpt.pt"))
    x = batches(1)[0]
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    pack_checkpoint(tmp_path / "ckpt.pt", tmp_path / "packed.safetensors")
    packed, _ = model_from_checkpoint(load_checkpoint(tmp_path / "packed.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(packed(x), expected, rtol=0, atol=0)
