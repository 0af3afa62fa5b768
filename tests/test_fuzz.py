"""Property-based fuzzing (hypothesis) of every reader of untrusted input: the YAML reader, the recipe
and policy parsers, `--set` overrides, and the checkpoint readers (safetensors headers and torch zips).

The property is the same everywhere: whatever the input, the reader returns a valid object or raises
a `QToolkitError` (one clear line for the CLI); never another exception, never a hang. Example counts
are kept modest so the suite stays fast on 2 cores; run thousands locally with
`QTOOLKIT_FUZZ=thorough python -m pytest tests/test_fuzz.py`."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtoolkit.checkpoint import load_checkpoint, tensor_digest
from qtoolkit.errors import QToolkitError
from qtoolkit.policy import Policy
from qtoolkit.training.recipe import Recipe, apply_overrides, load_recipe
from qtoolkit.yamlsafe import parse_yaml

settings.register_profile("ci", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("QTOOLKIT_FUZZ", "ci"))

# ------------------------------------------------------------------------------ strategies

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=8)
QUANTIZERS = ["ternary", "int8", "fp16", "bf16", "fp32", "nope"]
spec_options = st.dictionaries(
    st.sampled_from(["alpha", "granularity", "group_size", "activations", "packing", "bogus"]),
    st.one_of(scalars, st.sampled_from(["absmean", "learned", "tensor", "channel", "group", "int8", "none",
                                        "2bit", "base3"])), max_size=3)
specs = st.one_of(st.sampled_from(QUANTIZERS), values,
                  st.builds(lambda n, o: {"name": n, **o}, st.sampled_from(QUANTIZERS), spec_options))
patterns = st.one_of(
    st.sampled_from(["_default", "embed", "lm_head", "blocks.0.attn.q_proj", "blocks[0, -1]", "blocks[1:]",
                     "blocks[0].mlp.*", "re:blocks\\.[0-9]+\\.attn\\..*", "re:(", "blocks[99]", "blocks[a:b]"]),
    st.text(max_size=20),
)
policies = st.dictionaries(patterns, specs, max_size=4)
small_ints = st.integers(min_value=-2, max_value=4)
model_sections = st.fixed_dictionaries({}, optional={
    "preset": st.sampled_from(["tiny", "small", "nope"]) | values,
    "n_layers": small_ints, "d_model": st.sampled_from([8, 16, 15, 0, -1]), "n_heads": small_ints,
    "vocab_size": st.sampled_from([300, 512, 0]), "d_ff": st.sampled_from([16, 0]),
    "max_seq_len": st.sampled_from([16, 64, 0, 2**40]), "rope_theta": scalars, "norm_eps": scalars,
    "tie_embeddings": scalars, "subln": scalars, "init_std": scalars, "bogus": values,
})
train_sections = st.dictionaries(
    st.sampled_from(["steps", "batch_size", "seq_len", "lr", "min_lr_ratio", "warmup_steps", "schedule",
                     "stage2_lr_scale", "weight_decay", "beta1", "beta2", "adam_eps", "grad_clip", "label_smoothing",
                     "eval_every", "eval_batches", "ckpt_every", "log_every", "seed", "device", "bogus"]),
    values, max_size=5)
data_sections = st.dictionaries(
    st.sampled_from(["dataset", "path", "train_split", "val_split", "text_field", "val_fraction", "tokenizer",
                     "max_train_tokens", "max_val_tokens", "bogus"]), values, max_size=3)
recipes = st.fixed_dictionaries({"name": st.text(max_size=8) | values, "policy": policies | values}, optional={
    "model": model_sections | values, "train": train_sections | values, "data": data_sections | values,
    "description": values, "extra": values,
})


def _only_user_errors(fn, *args):
    try:
        return fn(*args)
    except QToolkitError:
        return None


# ------------------------------------------------------------------------------ YAML and parsers


@given(st.text(max_size=300))
def test_yaml_reader_never_raises_anything_else(text):
    _only_user_errors(parse_yaml, text, "fuzz")


@given(st.lists(st.sampled_from(["a: ", "- ", "&x ", "*x ", "[", "]", "{", "}", ", ", "\n", "  ", "!!python/object ",
                                 "<<: *x", "1", "b", ": ", "? ", '"', "'", "|", ">", "%YAML 1.1\n", "---\n"]),
                max_size=60))
def test_yaml_reader_on_yaml_shaped_noise(parts):
    _only_user_errors(parse_yaml, "".join(parts), "fuzz")


@given(recipes)
def test_recipe_parser_returns_a_valid_recipe_or_a_user_error(raw):
    recipe = _only_user_errors(load_recipe, raw)
    if recipe is not None:  # what validates is usable: finite numbers, a resolvable model and policy
        assert isinstance(recipe, Recipe)
        for name in ("lr", "adam_eps", "grad_clip", "weight_decay", "beta1", "beta2", "label_smoothing"):
            assert math.isfinite(getattr(recipe.train, name))
        recipe.model_config()
        recipe.resolved()


@given(policies | values)
def test_policy_parser_returns_a_policy_or_a_user_error(raw):
    policy = _only_user_errors(Policy.load, raw)
    if policy is not None:
        assert isinstance(policy, Policy) and policy.rules


@given(st.lists(st.text(max_size=30), max_size=4))
def test_overrides_never_raise_anything_else(items):
    _only_user_errors(apply_overrides, {"name": "x", "policy": {"_default": "ternary"}}, items)


# ------------------------------------------------------------------------------ checkpoint readers


@pytest.fixture(scope="module")
def packed_bytes(tmp_path_factory) -> bytes:
    from qtoolkit.pack import pack_checkpoint

    from .conftest import save_untrained_checkpoint

    root = tmp_path_factory.mktemp("fuzz-packed")
    ckpt = save_untrained_checkpoint(root / "c.pt")
    return pack_checkpoint(ckpt, root / "p.safetensors").path.read_bytes()


DTYPES = ["F32", "F16", "BF16", "U8", "I8", "I64", "BOOL", "F64", "X9", 7]
tensor_entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(DTYPES),
    "shape": st.lists(st.integers(min_value=-1, max_value=2**40), max_size=3),
    "data_offsets": st.lists(st.integers(min_value=-1, max_value=2**40), min_size=0, max_size=3),
})
headers = st.dictionaries(st.text(max_size=10), tensor_entries | values, max_size=4).map(
    lambda d: d if "__metadata__" in d else {**d, "__metadata__": {"format": "qtoolkit", "version": "1",
                                                                    "meta": "{}", "tokenizer": ""}})


@given(headers, st.binary(max_size=256), st.integers(min_value=-64, max_value=64))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_safetensors_header_reader(tmp_path, header, payload, length_skew):
    """Random headers (lying shapes, offsets, dtypes, lengths) are refused with a CheckpointError."""
    text = json.dumps(header).encode()
    n = max(0, len(text) + length_skew)
    path = tmp_path / "h.safetensors"
    path.write_bytes(n.to_bytes(8, "little") + text + payload)
    _only_user_errors(load_checkpoint, path)


@given(st.lists(st.tuples(st.integers(min_value=0, max_value=2**31), st.integers(min_value=1, max_value=255)),
                min_size=1, max_size=4))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_damaged_packed_file_never_loads_silently(tmp_path, packed_bytes, flips):
    """Any byte flipped anywhere in a packed file (header, metadata, tensors): refused, or (a flip in
    JSON whitespace or in the digest-free part of the header) loaded with every check passing."""
    data = bytearray(packed_bytes)
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    path = tmp_path / "p.safetensors"
    path.write_bytes(bytes(data))
    ckpt = _only_user_errors(load_checkpoint, path)
    if ckpt is not None:  # it loaded: then it is exactly what was written, byte for byte in every tensor
        meta = json.dumps({k: v for k, v in ckpt.items()
                           if k not in ("format", "version", "kind", "tokenizer", "tensors", "verified_digest", "path")})
        assert ckpt["verified_digest"]
        assert all(torch.isfinite(t).all() for t in ckpt["tensors"].values() if t.is_floating_point())
        assert tensor_digest(ckpt["tensors"], meta, ckpt["tokenizer"])  # recomputable


@given(st.lists(st.tuples(st.integers(min_value=0, max_value=2**31), st.integers(min_value=1, max_value=255)),
                min_size=1, max_size=3))
@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_damaged_training_checkpoint_never_loads_silently(tmp_path, flips):
    """Flipped bytes in a torch zip: every tensor byte is under a CRC32, so a load either fails with
    a CheckpointError or returns tensors equal to the originals."""
    from .conftest import save_untrained_checkpoint

    good_path = tmp_path / "good.pt"
    if not good_path.exists():
        save_untrained_checkpoint(good_path)
    good = good_path.read_bytes()
    data = bytearray(good)
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    path = tmp_path / "bad.pt"
    path.write_bytes(bytes(data))
    ckpt = _only_user_errors(load_checkpoint, path)
    if ckpt is not None:
        ref = load_checkpoint(good_path)
        assert ref["model"].keys() == ckpt["model"].keys()
        assert all(torch.equal(ref["model"][k], ckpt["model"][k]) for k in ref["model"])
