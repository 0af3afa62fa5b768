"""The GPU decode path, tested on the CPU through the same code: weights dequantized once into a
dense layout (`DenseLinear`), the fixed-shape decode step (`InferenceModel.static_step`) and the
decoder that drives it (`qtoolkit.deploy.static_decode`). The CUDA-graph capture itself runs only
on CUDA (tests marked `cuda`; they skip here).

Stated tolerances:
  * dense ternary / W8A8 layers: bit-identical to the reference path's integer products (the codes
    are exact in bf16/fp16 and the sums are exact in fp32);
  * dense model logits against the fake-quantized model: the runtime's tolerance (max |diff| <= 5%,
    mean <= 0.5% of max |logit|), since bf16 rounds the inputs of weight-only and float layers;
  * static step against the dynamic step, same model: the only difference is the float summation
    order of attention over a masked full-length cache instead of a slice. Measured on the test
    models: bit-identical or within 1e-5 of max |logit| at most steps; where the rounding moves an
    activation code across a rounding boundary, the step and the cache after it differ at the
    activation-quantization noise level (up to 1.3% of max |logit| seen), so the test asserts the
    runtime's tolerance at every step, the same argmax, and rounding-level agreement at >= half the
    steps.
  * 16-bit dense layouts with 4-bit activation codes (`int4_elastic`): every layer agrees to 16-bit
    rounding (~3e-4 of its output), but the random, perturbed test model turns that into whole-step
    jumps of later 4-bit codes (0.65 of max |logit| in bf16): that variant is checked through fp32
    dense weights only.
"""

from __future__ import annotations

import pytest
import torch

from qtoolkit.checkpoint import load_checkpoint
from qtoolkit.deploy import kernels
from qtoolkit.deploy.runtime import (
    DenseLinear,
    GenerationStats,
    InferenceModel,
    TernaryLinear,
    generate,
    load_inference_model,
)
from qtoolkit.deploy.static_decode import (
    BUCKET,
    MAX_DECODERS,
    StaticDecoder,
    cache_length,
    decoder_for,
    pick_token,
)
from qtoolkit.errors import ConfigError
from qtoolkit.pack import model_from_packed, pack_checkpoint
from qtoolkit.quantizers.base import int8_per_token_codes
from tests.conftest import save_untrained_checkpoint
from tests.test_runtime import VARIANTS, assert_logits_close, perturb

STATIC_VARIANTS = ["ternary_all", "mixed", "gqa", "channel_subln_tied_odd"]

def cuda_only(test):
    """Marked `cuda`; skips without a CUDA device (never run in this workplace: no GPU)."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")(test))


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    out = {}
    root = tmp_path_factory.mktemp("gpu_decode")
    for key in (*STATIC_VARIANTS, "kernels_new_codes", "intn_ptqtp_odd", "int4_elastic"):
        recipe, overrides = VARIANTS[key]
        ckpt = save_untrained_checkpoint(root / f"{key}.pt", recipe, overrides, mutate=perturb)
        out[key] = pack_checkpoint(ckpt, root / f"{key}.safetensors").path
    return out


def tokens(model, batch, n, seed=0):
    return torch.randint(0, model.config.vocab_size, (batch, n), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ the dense layout


def test_dense_layout_holds_16_bit_weights_and_says_how_many_bytes(packed):
    ckpt = load_checkpoint(packed["ternary_all"])
    model = InferenceModel.from_packed(ckpt, weights="bf16")
    small = InferenceModel.from_packed(ckpt, weights="packed")
    assert model.backend.name == "dense" and model.weight_layout == "bf16" and small.weight_layout == "packed"
    ops = [op for b in model.blocks for op in (b.qkv, b.o, b.gate_up, b.down)] + [model.head]
    assert all(isinstance(op, DenseLinear) and op.weight.dtype == torch.bfloat16 for op in ops)
    summary = model.weight_summary()
    assert summary["bytes"] == model.weight_bytes() == sum(summary["bytes_by_dtype"].values())
    assert summary["bytes_by_dtype"]["bfloat16"] == 2 * sum(op.weight.numel() for op in ops)
    assert summary["bytes_by_dtype"]["int8"] == model.embed.codes.numel()  # the lookup keeps its int8 codes
    # the packed layout keeps ternary weights at 2 bits (rows padded to 256 columns): 1/8 of bf16's bytes
    packed_ops = [op for b in small.blocks for op in (b.qkv, b.o, b.gate_up, b.down)]
    assert all(op.packed.numel() == op.out_features * kernels.padded_cols(op.in_features) // 4 for op in packed_ops)
    assert sum(2 * op.weight.numel() for op in ops[:-1]) == sum(2 * op.out_features * op.in_features for op in packed_ops)
    assert small.weight_bytes() < summary["bytes"]
    fp32 = InferenceModel.from_packed(ckpt, weights="fp32").weight_summary()
    assert fp32["bytes_by_dtype"]["float32"] > 2 * summary["bytes_by_dtype"]["bfloat16"] - 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_ternary_and_w8a8_layers_are_bit_identical_to_the_integer_path(dtype):
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(-1, 2, (70, 300), generator=g, dtype=torch.int8)
    gamma = torch.rand(70, generator=g) + 0.1
    x = torch.randn(5, 300, generator=g) * 3
    ref = TernaryLinear(codes, gamma, kernels.Backend("reference", "test"))
    dense = DenseLinear(codes, gamma, True, None, dtype)
    assert torch.equal(dense(x), ref(x))
    w8 = torch.randint(-127, 128, (70, 300), generator=g, dtype=torch.int8)
    q, s = int8_per_token_codes(x)
    exact = kernels.int_matmul(q.to(torch.int8), w8).float() * (gamma / s)
    assert torch.equal(DenseLinear(w8, gamma, True, None, dtype)(x), exact)


@pytest.mark.parametrize(("variant", "weights"), [
    *((v, w) for v in ("ternary_all", "mixed", "channel_subln_tied_odd", "kernels_new_codes", "intn_ptqtp_odd")
      for w in ("bf16", "fp16", "fp32")),
    ("int4_elastic", "fp32"),  # 4-bit activation codes: fp32 only (module docstring)
])
def test_dense_logits_match_the_fake_quantized_model(packed, variant, weights):
    ckpt = load_checkpoint(packed[variant])
    ref = model_from_packed(ckpt)
    model = InferenceModel.from_packed(ckpt, weights=weights)
    x = tokens(model, 2, 30)
    with torch.no_grad():
        expected = ref(x)
    assert_logits_close(model(x), expected)


def test_fp32_dense_ternary_model_equals_the_reference_path(packed):
    """fp32 dense weights: the ternary integers exactly, and the INT8 head's products in fp32."""
    ckpt = load_checkpoint(packed["ternary_all"])
    x = tokens(InferenceModel.from_packed(ckpt, "reference"), 2, 20)
    got = InferenceModel.from_packed(ckpt, weights="fp32")(x)
    torch.testing.assert_close(got, InferenceModel.from_packed(ckpt, "reference")(x), rtol=1e-5, atol=1e-5)


def test_weight_layout_choices_are_checked(packed):
    ckpt = load_checkpoint(packed["ternary_all"])
    with pytest.raises(ConfigError, match="weights must be one of"):
        InferenceModel.from_packed(ckpt, weights="int4")
    with pytest.raises(ConfigError, match="cannot be combined"):
        InferenceModel.from_packed(ckpt, "reference", weights="bf16")
    assert InferenceModel.from_packed(ckpt, "dequant").weight_layout == "packed"
    model = load_inference_model(packed["ternary_all"], device="cpu", weights="fp16")
    assert model.weight_layout == "fp16" and not model.static_decode  # the CPU keeps the dynamic step by default


# ------------------------------------------------------------------------------ the static step


@pytest.mark.parametrize("weights", ["bf16", "packed"])
@pytest.mark.parametrize("variant", STATIC_VARIANTS)
def test_static_step_equals_the_dynamic_step_over_a_sequence_of_positions(packed, variant, weights):
    ckpt = load_checkpoint(packed[variant])
    model = InferenceModel.from_packed(ckpt, weights=weights)
    B, prompt, steps, max_len = 2, 5, 14, 24
    x = tokens(model, B, prompt + steps)
    dyn, sta = model.new_cache(B, max_len), model.new_cache(B, max_len)
    model(x[:, :prompt], dyn)
    model(x[:, :prompt], sta)
    pos = torch.tensor([prompt])
    rounding_only = 0
    for t in range(prompt, prompt + steps):
        expected = model(x[:, t:t + 1], dyn)[:, -1]
        got = model.static_step(x[:, t:t + 1], pos, sta)
        pos += 1
        assert_logits_close(got, expected)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
        assert_logits_close(sta.k, dyn.k)
        assert_logits_close(sta.v, dyn.v)
        rounding_only += float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    assert rounding_only >= 0.5 * steps  # most steps differ by float rounding alone (or not at all)
    assert int(pos) == prompt + steps and sta.length == prompt  # the caller owns the position
    assert not sta.k[:, :, :, prompt + steps:].any()  # nothing written past the last position


@pytest.mark.parametrize("variant", ["ternary_all", "mixed"])
def test_static_decoding_generates_what_the_dynamic_loop_generates(packed, variant):
    ckpt = load_checkpoint(packed[variant])
    model = InferenceModel.from_packed(ckpt, weights="bf16")
    prompts = [[1, 5, 9, 33, 2], [7], list(range(3, 40, 3))]
    expected = [list(generate(model, p, max_new_tokens=25)) for p in prompts]
    model.use_static_decode(True)
    stats = GenerationStats()
    got = [list(generate(model, p, max_new_tokens=25, stats=stats if i == 0 else None)) for i, p in enumerate(prompts)]
    assert got == expected
    assert stats.new_tokens == 25 and stats.token_ids == expected[0] and stats.decode_s > 0
    # prompts of different lengths share one decoder (cache lengths are bucketed)
    assert list(model._static) == [(1, cache_length(model, 40), False, None, True, False)]


def test_static_decoding_samples_deterministically_on_the_device(packed):
    model = InferenceModel.from_packed(load_checkpoint(packed["ternary_all"]), weights="bf16").use_static_decode()
    ids = [1, 2, 3]
    a = list(generate(model, ids, max_new_tokens=30, temperature=0.9, top_k=20, seed=3))
    assert a == list(generate(model, ids, max_new_tokens=30, temperature=0.9, top_k=20, seed=3))
    assert a != list(generate(model, ids, max_new_tokens=30, temperature=0.9, top_k=20, seed=4))
    assert len(set(a)) > 5  # it samples, not argmax
    full = list(generate(model, ids, max_new_tokens=30, temperature=1.0, seed=3))
    assert full == list(generate(model, ids, max_new_tokens=30, temperature=1.0, seed=3))
    eos = a[4]
    stats = GenerationStats()
    cut = list(generate(model, ids, max_new_tokens=30, temperature=0.9, top_k=20, seed=3, eos_id=eos, stats=stats))
    assert cut == a[:a.index(eos) + 1] and stats.stopped_at_eos


def test_pick_token_draws_from_the_softmax():
    """The exponential race picks token i with probability softmax(logits / T)_i (restricted to the
    top k): frequencies over 40,000 draws within 4 standard errors."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 40_000
    g = torch.Generator().manual_seed(0)
    rows = logits.expand(n, -1)
    temperature = torch.tensor(0.7)
    for top_k in (None, 3):
        k = top_k or logits.shape[1]
        noise = torch.empty(n, k).exponential_(generator=g)
        picked = pick_token(rows, temperature, top_k, noise)
        freq = torch.bincount(picked, minlength=logits.shape[1]).double() / n
        values = logits[0] / 0.7
        p = torch.zeros_like(values, dtype=torch.float64)
        top = values.topk(k)
        p[top.indices] = torch.softmax(top.values.double(), 0)
        se = (p * (1 - p) / n).sqrt()
        assert ((freq - p).abs() <= 4 * se + 1e-12).all(), (freq, p)
        if top_k:
            assert freq[k:].sum() == 0
    assert torch.equal(pick_token(logits, None, None, None), torch.tensor([0]))


def test_decoders_are_kept_per_shape_and_bounded(packed):
    model = InferenceModel.from_packed(load_checkpoint(packed["ternary_all"]), weights="bf16").use_static_decode()
    length = cache_length(model, 10)
    first = decoder_for(model, 1, length, False, None)
    assert decoder_for(model, 1, length, False, None) is first
    for n in range(1, MAX_DECODERS + 2):
        decoder_for(model, n, length, True, 5)
    assert len(model._static) == MAX_DECODERS and first not in model._static.values()
    assert cache_length(model, 1) == min(BUCKET, model.config.max_seq_len)
    assert cache_length(model, model.config.max_seq_len) == model.config.max_seq_len


def test_a_decoder_refuses_positions_past_its_cache(packed):
    model = InferenceModel.from_packed(load_checkpoint(packed["ternary_all"]), weights="bf16")
    dec = StaticDecoder(model, 1, 6)
    assert dec.graph is None and dec.graph_error == ""  # no graphs on the CPU
    dec.prefill(torch.tensor([[1, 2, 3, 4]]))
    dec.step()
    dec.step()
    with pytest.raises(ConfigError, match="all are used"):
        dec.step()
    with pytest.raises(ConfigError, match="does not fit"):
        dec.prefill(torch.tensor([[1] * 6]))


def test_a_failing_compiler_leaves_the_uncompiled_step(packed, monkeypatch):
    model = InferenceModel.from_packed(load_checkpoint(packed["ternary_all"]), weights="bf16")
    expected = list(generate(model.use_static_decode(True), [1, 2, 3], max_new_tokens=10))

    def broken_compile(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("backend failed\nmore detail")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    dec = StaticDecoder(model, 1, 16, compile=True)
    assert not dec.compiled and dec.compile_error == "RuntimeError: backend failed"
    assert list(generate(model.use_static_decode(True, compile=True), [1, 2, 3], max_new_tokens=10)) == expected


@pytest.mark.slow
def test_compiled_static_step_equals_the_eager_one(packed):
    """torch.compile of the step (inductor's C++ backend on the CPU, ~30 s here; Triton on CUDA):
    fused float ops round differently, so logits agree to the runtime's tolerance and greedy tokens
    are the same."""
    model = InferenceModel.from_packed(load_checkpoint(packed["ternary_all"]), weights="bf16")
    compiled = torch.compile(model.static_step_fn)
    eager_cache, compiled_cache = model.new_cache(2, 16), model.new_cache(2, 16)
    x = tokens(model, 2, 6)
    pos = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        for t in range(6):
            assert_logits_close(compiled(x[:, t:t + 1], pos, compiled_cache), model.static_step(x[:, t:t + 1], pos, eager_cache))
            pos += 1
    ids = [1, 5, 9, 33, 2]
    expected = list(generate(model.use_static_decode(True), ids, max_new_tokens=12))
    with torch.inference_mode():  # a caller's inference mode does not reach the compiled step
        got = list(generate(model.use_static_decode(True, compile=True), ids, max_new_tokens=12))
    (dec,) = [d for key, d in model._static.items() if key[-1]]
    assert dec.compiled, dec.compile_error
    assert got == expected


# ------------------------------------------------------------------------------ CUDA only (never run here)


@cuda_only
@pytest.mark.parametrize("weights", ["bf16", "packed"])
@pytest.mark.parametrize("variant", ["ternary_all", "mixed"])
def test_cuda_graph_replay_equals_the_eager_static_step(packed, variant, weights):
    ckpt = load_checkpoint(packed[variant])
    model = InferenceModel.from_packed(ckpt, device="cuda", weights=weights)
    assert model.static_decode and model.weight_summary()["device"].startswith("cuda")
    ids = torch.tensor([[1, 5, 9, 33, 2]], device="cuda")
    eager = StaticDecoder(model, 1, 32, graphs=False)
    graph = StaticDecoder(model, 1, 32, graphs=True)
    assert graph.graph is not None, graph.graph_error
    assert torch.equal(eager.prefill(ids), graph.prefill(ids))
    for _ in range(20):
        assert torch.equal(eager.step().clone(), graph.step().clone())
        # the same kernels replayed: expected bit-equal; cuBLAS may pick another algorithm under capture,
        # so the runtime's tolerance is what is asserted
        assert_logits_close(graph.logits.cpu(), eager.logits.cpu())


@cuda_only
def test_cuda_generate_uses_the_captured_graph_and_matches_the_cpu(packed):
    ckpt = load_checkpoint(packed["ternary_all"])
    model = load_inference_model(packed["ternary_all"], device="cuda")
    assert model.weight_layout == "bf16" and model.static_decode
    got = list(generate(model, [1, 5, 9, 33, 2], max_new_tokens=20))
    (dec,) = model._static.values()
    assert dec.graph is not None, dec.graph_error
    assert len(got) == 20
    cpu = InferenceModel.from_packed(ckpt, weights="bf16")
    x = tokens(cpu, 2, 20)
    assert_logits_close(model(x.cuda()).cpu(), cpu(x), max_frac=0.01, mean_frac=0.001)
