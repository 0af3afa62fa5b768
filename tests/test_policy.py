from __future__ import annotations

import pytest
import torch

from qtoolkit.config import ModelConfig
from qtoolkit.errors import PolicyError
from qtoolkit.layers import QuantEmbedding, QuantLinear
from qtoolkit.model import DecoderLM
from qtoolkit.pack import memory_plan
from qtoolkit.policy import Policy, apply_policy
from qtoolkit.schema import SchemaError


def model(n_layers=4, **kw):
    return DecoderLM(ModelConfig.from_name("tiny", n_layers=n_layers, **kw))


def by_name(coverage):
    return {a.name: a for a in coverage.layers}


def test_precedence_exact_over_regex_over_default():
    m = model()
    cov = by_name(apply_policy(m, {
        "_default": "ternary",
        "re:blocks\\.1\\..*": "int8",
        "blocks.1.attn.q_proj": "fp16",
        "re:blocks\\.[12]\\.mlp\\..*": "bf16",  # block 1's mlp already went to the earlier regex
    }))
    assert cov["blocks.1.attn.q_proj"].quantizer == "fp16"
    assert cov["blocks.1.attn.q_proj"].rule == "blocks.1.attn.q_proj"
    assert cov["blocks.1.mlp.up_proj"].quantizer == "int8"  # first regex in file order wins
    assert cov["blocks.2.mlp.up_proj"].quantizer == "bf16"
    assert cov["blocks.0.attn.k_proj"].quantizer == "ternary" and cov["blocks.0.attn.k_proj"].rule == "_default"
    assert isinstance(m.blocks[1].attn.q_proj, QuantLinear)


def test_default_covers_linears_including_lm_head_but_not_embed():
    m = model()
    cov = by_name(apply_policy(m, {"_default": "int8"}))
    assert cov["lm_head"].quantizer == "int8"
    assert cov["embed"].spec is None and cov["embed"].quantizer == "fp32"
    assert type(m.embed) is torch.nn.Embedding


def test_embed_quantized_when_named():
    m = model()
    apply_policy(m, {"_default": "ternary", "embed": "int8"})
    assert isinstance(m.embed, QuantEmbedding)
    out = m(torch.randint(0, 512, (1, 8)))
    assert out.shape == (1, 8, 512)


def test_block_selectors_follow_depth():
    for n in (4, 6):
        cov = by_name(apply_policy(model(n), {"_default": "ternary", "blocks[0, -1]": "int8",
                                               "blocks[1:-1].mlp.*": "fp16"}))
        assert cov["blocks.0.attn.q_proj"].quantizer == "int8"
        assert cov[f"blocks.{n - 1}.mlp.down_proj"].quantizer == "int8"
        assert cov["blocks.1.mlp.gate_proj"].quantizer == "fp16"
        assert cov["blocks.1.attn.q_proj"].quantizer == "ternary"


def test_unmatched_exact_name_is_an_error_with_a_suggestion():
    with pytest.raises(PolicyError, match="blocks.0.attn.q_prj.*did you mean blocks.0.attn.q_proj"):
        apply_policy(model(), {"_default": "ternary", "blocks.0.attn.q_prj": "int8"})


def test_unmatched_regex_is_an_error():
    with pytest.raises(PolicyError, match="matches no quantizable module"):
        apply_policy(model(), {"_default": "ternary", "re:blocks\\.9\\..*": "int8"})


def test_shadowed_regex_is_an_error():
    with pytest.raises(PolicyError, match="already claimed"):
        apply_policy(model(2), {"re:blocks\\..*": "int8", "re:blocks\\.0\\..*": "fp16"})


def test_block_selector_out_of_range():
    with pytest.raises(PolicyError, match="out of range"):
        apply_policy(model(2), {"blocks[5]": "int8"})


def test_errors_are_all_reported_with_key_paths():
    with pytest.raises(SchemaError) as e:
        Policy.load({"_default": "int9", "lm_head": {"name": "ternary", "alpha": "x"}, "re:(": "int8"})
    paths = [p for p, _ in e.value.errors]
    assert paths == ["policy._default", "policy.lm_head.alpha", "policy.re:("]


def test_coverage_report_counts():
    cov = apply_policy(model(2), {"_default": "ternary", "embed": "int8", "lm_head": "int8"})
    counts = cov.params_by_quantizer()
    assert counts == {"int8": 2 * 512 * 64, "ternary": 2 * (4 * 64 * 64 + 3 * 64 * 176)}
    assert cov.unquantized() == []
    assert cov.to_dict()["layers"][0]["name"] == "embed"


def test_apply_twice_is_refused():
    m = model()
    apply_policy(m, {"_default": "ternary"})
    with pytest.raises(PolicyError, match="already quantized"):
        apply_policy(m, {"_default": "ternary"})


def test_swap_keeps_the_parameter_objects():
    m = model()
    w = m.blocks[0].attn.q_proj.weight
    apply_policy(m, {"_default": "ternary"})
    assert m.blocks[0].attn.q_proj.weight is w


def test_tied_embeddings_share_one_quantizer():
    m = model(tie_embeddings=True)
    coverage = apply_policy(m, {"_default": "ternary", "lm_head": {"name": "ternary", "alpha": "learned"}})
    cov = by_name(coverage)
    assert cov["embed"].spec == cov["lm_head"].spec
    assert m.embed.quantizer is m.lm_head.quantizer
    assert m.embed.weight is m.lm_head.weight
    assert coverage.params_by_quantizer()["ternary"] == 512 * 64 + 4 * (4 * 64 * 64 + 3 * 64 * 176)


def test_tied_embeddings_conflicting_specs():
    with pytest.raises(PolicyError, match="share one weight"):
        apply_policy(model(tie_embeddings=True), {"embed": "int8", "lm_head": "fp16"})


def test_policy_file(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("policy:\n  _default: ternary\n  lm_head: int8\n")
    assert Policy.load(path).rules == {"_default": "ternary", "lm_head": "int8"}
    with pytest.raises(PolicyError, match="not found"):
        Policy.load(tmp_path / "missing.yaml")


def test_a_rule_that_assigns_nothing_here_warns():
    # ternary_middle on a 2-block model: blocks[0, -1] are all the blocks, so _default is left with nothing
    cov = apply_policy(model(2), {"_default": "ternary", "blocks[0, -1]": "int8", "embed": "int8", "lm_head": "int8"})
    assert cov.params_by_quantizer().keys() == {"int8"}
    assert [k for k, _ in cov.warnings] == ["_default"] and "assigns no module" in cov.warnings[0][1]
    # a depth-portable selector that selects no block at this depth warns instead of failing
    cov = apply_policy(model(2), {"_default": "ternary", "blocks[1:-1]": "fp16"})
    assert cov.warnings == [("blocks[1:-1]", "selects no block of this 2-block model, so it assigns nothing")]
    assert apply_policy(model(4), {"_default": "ternary", "blocks[1:-1]": "fp16"}).warnings == []
    assert memory_plan(ModelConfig.from_name("tiny"), {"_default": "ternary", "blocks[1:-1]": "fp16"}).warnings


def test_unassigned_modules_are_called_fp32_like_the_quantizer_that_stores_them():
    cov = apply_policy(model(2), {"_default": "ternary"})
    assert cov.params_by_quantizer() == {"fp32": 512 * 64, "ternary": 512 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 176)}
