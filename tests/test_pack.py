from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from qtoolkit.checkpoint import load_checkpoint
from qtoolkit.config import ModelConfig
from qtoolkit.errors import CheckpointError
from qtoolkit.pack import memory_plan, model_from_checkpoint, pack_checkpoint, pack_model
from qtoolkit.policy import build_model
from qtoolkit.training.recipe import available_recipes, load_recipe
from qtoolkit.training.trainer import evaluate_checkpoint, train

# Odd sizes: 36x77 MLP weights (2772 elements, not a multiple of 5 or 8), a 97-token vocabulary.
ODD = dict(vocab_size=297, d_model=36, n_heads=3, d_ff=77, n_layers=3)
POLICIES = {
    "learned_group": {"_default": {"name": "ternary", "alpha": "learned", "granularity": "group", "group_size": 10},
                      "embed": "int8", "lm_head": "bf16"},
    "channel_base3": {"_default": {"name": "ternary", "granularity": "channel", "packing": "base3"},
                      "blocks[1].mlp.*": "fp16", "embed": {"name": "int8", "granularity": "tensor"}},
    "partial": {"blocks.0.attn.q_proj": "ternary"},  # everything else stays fp32
}


# issue 13's methods: Spectra's TriLM, Sherry, Tequila, HGF's correction, binary
NEW_METHODS = ["trilm", "sherry_all", "tequila_all", "ternary_hgf", "binary_all"]


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("name", available_recipes())
@pytest.mark.parametrize("packing", [None, "2bit", "base3"])
def test_predicted_bytes_equal_packed_bytes_for_every_recipe(name, packing):
    r = load_recipe(name, ["model.preset=tiny"])
    cfg = r.model_config()
    model, coverage = build_model(cfg, r.policy)
    tensors, entries = pack_model(model, coverage, packing)
    plan = memory_plan(cfg, r.policy, packing)
    assert plan.total_bytes == tensor_bytes(tensors)
    assert [e.to_dict() for e in plan.entries] == [e.to_dict() for e in entries]


@pytest.mark.parametrize("policy", list(POLICIES), ids=list(POLICIES))
@pytest.mark.parametrize("arch", [{}, {"subln": True}, {"tie_embeddings": True}, {"n_kv_heads": 1}],
                         ids=["plain", "subln", "tied", "gqa"])
def test_predicted_bytes_equal_packed_bytes_odd_shapes(policy, arch):
    cfg = ModelConfig.from_name("tiny", **ODD, **arch)
    rules = POLICIES[policy]
    if arch.get("tie_embeddings"):
        rules = {k: v for k, v in rules.items() if k != "embed"}
    model, coverage = build_model(cfg, rules)
    tensors, _ = pack_model(model, coverage)
    plan = memory_plan(cfg, rules)
    assert plan.total_bytes == tensor_bytes(tensors)
    # every parameter of the model is counted exactly once
    assert plan.params == sum(p.numel() for n, p in model.named_parameters() if ".quantizer." not in n)


def test_memory_model_counts_everything_by_hand():
    cfg = ModelConfig.from_name("tiny")  # V=512, d=64, f=176, L=2
    plan = memory_plan(cfg, {"_default": "ternary", "embed": "int8", "lm_head": "int8"})
    V, d, f, L = 512, 64, 176, 2
    int8 = 2 * (V * d + 4 * V)  # codes + one fp32 scale per row, embed and head
    ternary = L * (4 * (d * d // 4 + 4) + 3 * (d * f // 4 + 4))  # 2-bit codes + one fp32 alpha each
    norms = 4 * (2 * L * d + d)
    assert plan.total_bytes == int8 + ternary + norms


def test_ternarylm_132m_sizes():
    cfg = ModelConfig.from_name("ternarylm-132m")
    r = load_recipe("ternary_all", ["model.preset=ternarylm-132m"])
    fp32 = memory_plan(cfg, load_recipe("fp32_baseline").policy)
    base3 = memory_plan(cfg, r.policy, "base3")
    assert fp32.total_bytes == 4 * cfg.num_params()
    assert fp32.total_bytes / base3.total_bytes >= 7.0


@pytest.fixture(scope="module")
def trained(corpus_dir, tmp_path_factory):
    """A few steps of training (so weights are not at init) for several architectures/policies."""
    out = {}
    root = tmp_path_factory.mktemp("packruns")
    variants = {
        "ternary_all": ("ternary_all", []),
        "ternary_middle_learned": ("ternary_middle", ["model.n_layers=4",
                                                      "policy._default={name: ternary, alpha: learned}"]),
        "tied_subln": ("ternary_bitnet2b", ["model.tie_embeddings=true", "policy.embed=int8",
                                            "policy.lm_head=int8"]),
        **{r: (r, []) for r in NEW_METHODS},
        "elastic_tied_tequila": ("tequila_all", ["model.tie_embeddings=true", "policy.embed=tequila",
                                                 "policy.lm_head=tequila",
                                                 "policy._default={name: tequila, activations: elastic}"]),
        "int4_sherry_channel": ("sherry_all", ["policy._default={name: sherry, granularity: channel, "
                                               "activations: int4, correction: {rank: 2, gate: channel}}"]),
    }
    for key, (recipe, extra) in variants.items():
        r = load_recipe(recipe, ["model.preset=tiny", f"data.path={corpus_dir}", "train.steps=6",
                                 "train.eval_batches=2", *extra])
        train(r, root / key)
        out[key] = root / key / "ckpt.pt"
    return out


@pytest.mark.parametrize("variant", ["ternary_all", "ternary_middle_learned", "tied_subln", *NEW_METHODS,
                                     "elastic_tied_tequila", "int4_sherry_channel"])
@pytest.mark.parametrize("packing", [None, "base3"])
def test_packed_model_gives_identical_logits(trained, variant, packing, tmp_path):
    res = pack_checkpoint(trained[variant], tmp_path / "p.safetensors", packing)
    assert res.tensor_bytes == res.predicted_bytes
    assert 0 < res.overhead_bytes < 200_000  # header: JSON metadata incl. the tokenizer
    packed, _ = model_from_checkpoint(load_checkpoint(res.path))
    train_model, _ = model_from_checkpoint(load_checkpoint(trained[variant]))
    x = torch.randint(0, 512, (3, 40))
    with torch.no_grad():
        assert torch.equal(packed(x), train_model.eval()(x))  # tolerance 0: same codes, same float ops


def test_eval_accepts_packed_checkpoints(trained, tmp_path):
    res = pack_checkpoint(trained["ternary_all"], tmp_path / "p.safetensors")
    a = evaluate_checkpoint(trained["ternary_all"], batches=2)
    b = evaluate_checkpoint(res.path, batches=2)
    assert b.kind == "packed" and b.step == a.step == 6
    assert b.val_loss == a.val_loss


def test_packed_file_is_plain_safetensors_with_self_describing_metadata(trained, tmp_path):
    from safetensors import safe_open

    res = pack_checkpoint(trained["ternary_all"], tmp_path / "p.safetensors")
    with safe_open(str(res.path), framework="pt") as f:
        meta = f.metadata()
        assert meta["format"] == "qtoolkit" and meta["kind"] == "packed" and meta["version"] == "1"
        assert f.get_tensor("blocks.0.attn.q_proj.codes").dtype == torch.uint8
        assert f.get_tensor("lm_head.codes").dtype == torch.int8
    info = json.loads(meta["meta"])
    layer = next(x for x in info["layers"] if x["name"] == "blocks.0.attn.q_proj")
    assert layer["spec"]["name"] == "ternary" and layer["tensors"] == {
        "codes": "blocks.0.attn.q_proj.codes", "scales": "blocks.0.attn.q_proj.scales"}
    assert info["total_bytes"] == res.predicted_bytes and json.loads(meta["tokenizer"])["model"]


def test_loading_a_packed_checkpoint_needs_no_training_code(trained, tmp_path):
    res = pack_checkpoint(trained["ternary_all"], tmp_path / "p.safetensors")
    code = (
        "import sys, torch; from qtoolkit.checkpoint import load_checkpoint; "
        "from qtoolkit.pack import model_from_checkpoint; "
        f"m, _ = model_from_checkpoint(load_checkpoint({str(res.path)!r})); "
        "m(torch.zeros(1, 4, dtype=torch.long)); "
        "bad = [k for k in ('qtoolkit.training.trainer', 'qtoolkit.training.data', 'datasets') if k in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


def test_bad_packed_files(trained, tmp_path):
    res = pack_checkpoint(trained["ternary_all"], tmp_path / "p.safetensors")
    data = res.path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="cut.safetensors: corrupted or truncated"):
        load_checkpoint(cut)
    # a newer format version
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "v.safetensors"),
              metadata={"format": "qtoolkit", "kind": "packed", "version": "7", "meta": "{}", "tokenizer": ""})
    with pytest.raises(CheckpointError, match="v.safetensors: checkpoint format version 7 is not supported"):
        load_checkpoint(tmp_path / "v.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a qtoolkit packed checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="already a packed checkpoint"):
        pack_checkpoint(res.path, tmp_path / "again.safetensors")


def test_damaged_layer_data(trained, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    res = pack_checkpoint(trained["ternary_all"], tmp_path / "p.safetensors")
    with safe_open(str(res.path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(res.path))
    tensors["blocks.0.attn.q_proj.codes"] = tensors["blocks.0.attn.q_proj.codes"][:-1].clone()
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="do not match the digest"):
        load_checkpoint(tmp_path / "bad.safetensors")
    # without a digest (a file written before digests, or edited), the layout check names the layer
    save_file(tensors, str(tmp_path / "bad2.safetensors"), metadata={k: v for k, v in meta.items() if k != "digest"})
    with pytest.raises(CheckpointError, match=r"blocks.0.attn.q_proj.codes: uint8 \[\d+\], its shape"):
        load_checkpoint(tmp_path / "bad2.safetensors")


def test_memory_model_counts_the_corrections_and_new_formats_by_hand():
    cfg = ModelConfig.from_name("small")  # d=256, f=704, L=8, V=8192
    d, f, L = 256, 704, 8
    hgf, plain = memory_plan(cfg, load_recipe("ternary_hgf").policy), memory_plan(cfg, load_recipe("ternary_all").policy)
    per_block = 4 * (2 * 3 * (d + d) + 2) + 3 * (2 * 3 * (d + f) + 2)  # fp16 A, B and a scalar gate per linear
    assert hgf.correction_bytes == L * per_block == hgf.total_bytes - plain.total_bytes
    assert plain.correction_bytes == 0 and hgf.to_dict()["correction_bytes"] == L * per_block
    ternary_blocks = L * (4 * (d * d // 4 + 4) + 3 * (d * f // 4 + 4))
    assert 0.12 <= hgf.correction_bytes / ternary_blocks <= 0.15  # HGF's 12-15% of the ternary backbone
    sherry = memory_plan(cfg, load_recipe("sherry_all").policy)
    # 5 bits per 4 weights + an fp32 scale per 128 inputs of a row; gate/up are (f, d), down is (d, f)
    sherry_blocks = L * (4 * (5 * d * d // 32 + 4 * d * (d // 128)) + 2 * (5 * f * d // 32 + 4 * f * (d // 128))
                         + (5 * d * f // 32 + 4 * d * -(-f // 128)))
    assert sherry.total_bytes - plain.total_bytes == sherry_blocks - ternary_blocks


def test_pack_never_replaces_an_existing_file_unless_asked(trained, tmp_path):
    from qtoolkit.errors import OutputError

    out = tmp_path / "p.safetensors"
    out.write_bytes(b"an earlier packing")
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        pack_checkpoint(trained["ternary_all"], out)
    assert out.read_bytes() == b"an earlier packing"  # untouched
    res = pack_checkpoint(trained["ternary_all"], out, overwrite=True)
    assert res.tensor_bytes == res.predicted_bytes and load_checkpoint(out)["kind"] == "packed"
