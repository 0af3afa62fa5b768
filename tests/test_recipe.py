from __future__ import annotations

import pytest

from qtoolkit.errors import UnknownNameError
from qtoolkit.schema import SchemaError
from qtoolkit.training.recipe import available_recipes, load_recipe

REQUIRED = {"ternary_all", "fp32_baseline", "fp16_all", "int8_all", "ternary_middle"}


def test_required_recipes_are_shipped():
    assert REQUIRED <= set(available_recipes())


@pytest.mark.parametrize("name", available_recipes())
def test_shipped_recipe_validates(name):
    r = load_recipe(name)
    assert r.name == name and r.description
    resolved = r.resolved()
    assert resolved.train.steps and resolved.train.warmup_steps is not None
    r.model_config()


def test_all_errors_reported_at_once_with_key_paths():
    raw = {
        "name": "bad",
        "model": {"preset": "small", "d_model": "wide", "n_heads": 0},
        "policy": {"_default": "ternary4"},
        "train": {"lr": -1, "schedule": "linear", "bogus": 1, "steps": 2.5},
        "data": {"val_fraction": 2},
        "extra": True,
    }
    with pytest.raises(SchemaError) as e:
        load_recipe(raw)
    paths = {p for p, _ in e.value.errors}
    assert {"model.d_model", "train.schedule", "train.bogus", "train.steps", "extra"} <= paths
    msg = str(e.value)
    assert "train.schedule: must be one of 'cosine', 'two_stage'" in msg


def test_cross_field_errors_after_types_pass():
    raw = {"name": "x", "policy": {"_default": "int9"}, "model": {"preset": "tiny", "n_heads": 5},
           "train": {"lr": -1.0, "warmup_steps": 10, "steps": 5, "seq_len": 999}, "data": {"val_fraction": 2.0}}
    with pytest.raises(SchemaError) as e:
        load_recipe(raw)
    paths = {p for p, _ in e.value.errors}
    assert {"train.lr", "train.warmup_steps", "data.val_fraction", "model.n_heads", "policy._default"} <= paths


def test_overrides():
    r = load_recipe("ternary_all", ["train.lr=3e-4", "model.preset=tiny", "model.subln=true",
                                    "policy.lm_head=fp16", "train.schedule=two_stage"])
    assert r.train.lr == 3e-4 and r.preset == "tiny" and r.model["subln"] is True
    assert r.policy["lm_head"] == "fp16" and r.train.schedule == "two_stage"
    assert r.model_config().subln


def test_bad_override_syntax():
    with pytest.raises(SchemaError, match="KEY=VALUE"):
        load_recipe("ternary_all", ["train.lr"])
    with pytest.raises(SchemaError, match="train.lr: must be > 0"):
        load_recipe("ternary_all", ["train.lr=0"])


def test_policy_from_a_file(tmp_path):
    (tmp_path / "p.yaml").write_text("_default: int8\nembed: int8\n")
    r = load_recipe("ternary_all", [f"policy={tmp_path / 'p.yaml'}"])
    assert r.policy == {"_default": "int8", "embed": "int8"}


def test_recipe_by_path_and_unknown_name(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("policy: {_default: ternary}\nmodel: {preset: tiny}\n")
    assert load_recipe(str(path)).name == "mine"
    with pytest.raises(UnknownNameError, match="ternary_all"):
        load_recipe("no_such_recipe")


def test_preset_defaults_fill_unset_train_fields():
    r = load_recipe("ternary_all", ["model.preset=tiny"]).resolved()
    assert r.train.steps == 60 and r.train.seq_len == 64
    r = load_recipe("ternary_all", ["model.preset=tiny", "train.steps=3"]).resolved()
    assert r.train.warmup_steps < 3  # scaled down with the horizon
