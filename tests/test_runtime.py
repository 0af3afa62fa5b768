"""The inference runtime against the fake-quantized model it must reproduce.

Tolerances (docs/inference.md): every ternary layer's integer accumulations are identical to the
training forward's (tests/test_kernels.py); end to end, float rounding differences move a few
activation codes across rounding boundaries, so logits agree to the activation-quantization noise
level: max |diff| <= 5% and mean |diff| <= 0.5% of max |logit| for the native and fallback paths.
The dequantize-then-matmul path repeats the training formula and agrees to float rounding.
Greedy generations are identical.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qtoolkit.checkpoint import load_checkpoint
from qtoolkit.deploy import kernels
from qtoolkit.deploy.runtime import (
    GenerationStats,
    InferenceModel,
    Int8Linear,
    ReferenceLinear,
    TernaryLinear,
    WithOutputTerm,
    generate,
    generate_text,
    load_inference_model,
    sample_next,
)
from qtoolkit.errors import ConfigError
from qtoolkit.pack import model_from_packed, pack_checkpoint
from qtoolkit.training.recipe import load_recipe
from qtoolkit.training.trainer import train
from tests.conftest import SHARED_DATA, save_untrained_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ODD = ["model.vocab_size=297", "model.d_model=36", "model.n_heads=3", "model.d_ff=77", "model.n_layers=3"]
VARIANTS = {
    # the shipped default: ternary per-tensor alpha, int8 activations; INT8 embed/head
    "ternary_all": ("ternary_all", []),
    # per-row alpha, SubLN, tied embedding/head, odd sizes (padding in every kernel)
    "channel_subln_tied_odd": ("ternary_bitnet2b", ["model.tie_embeddings=true", "policy.lm_head=int8",
                                                   "policy._default={name: ternary, granularity: channel}", *ODD]),
    # INT8 first/last blocks (weight-only), learned alpha, base-3 storage
    "middle_learned_base3": ("ternary_middle", ["model.n_layers=4",
                                                "policy._default={name: ternary, alpha: learned, packing: base3}"]),
    # grouped-query attention (4 query heads over 2 k/v heads): GQA KV cache, fused C++ attention
    "gqa": ("ternary_all", ["model.n_kv_heads=2"]),
    # W8A8 attention, fp16 MLP, group-scale ternary (reference path), unfusable q/k/v, bf16 head
    "mixed": ("ternary_all", ["policy._default={name: ternary, granularity: group, group_size: 32}",
                              "policy.blocks.0.attn.q_proj=fp16",
                              "policy.blocks[1].attn.*={name: int8, activations: int8}",
                              "policy.blocks[1].mlp.*=fp16", "policy.lm_head=bf16"]),
    # issue 13's recipes (reference path for group scales, binary, fp16 casts with float inputs)
    **{r: (r, []) for r in ("trilm", "sherry_all", "tequila_all", "ternary_hgf", "binary_all")},
    # ternary-coded methods on the integer kernels: Sherry and Tequila with row scales and int8
    # inputs (Tequila's bias and a correction as output terms), tied Tequila head, int4 and elastic
    # inputs on the reference path
    "kernels_new_codes": ("ternary_all", [
        "policy.blocks[0].*={name: sherry, granularity: channel, activations: int8}",
        "policy.blocks[1].*={name: tequila, granularity: channel, activations: int8, "
        "correction: {rank: 2, gate: channel}}",
        "model.tie_embeddings=true", "policy.embed={name: tequila, granularity: channel}",
        "policy.lm_head={name: tequila, granularity: channel}"]),
    # issue 12's formats on the reference path, odd sizes: 3-bit codes across byte boundaries,
    # trit-planes, GPTQ's scale buffers (uncalibrated: its RTN state), a 5-bit embedding
    "intn_ptqtp_odd": ("ternary_all", [*ODD, "policy.blocks[0].*=int3", "policy.blocks[1].*={name: ptqtp, group_size: 16}",
                                       "policy.blocks[2].*={name: gptq4, group_size: 16, symmetric: true}",
                                       "policy.embed=int5"]),
    "int4_elastic": ("ternary_all", ["policy.blocks[0].*={name: ternary, activations: int4}",
                                     "policy.blocks[1].*={name: int8, activations: elastic, elastic_bits: 6}"]),
}
PATHS = ["auto", "reference", "dequant"]


def perturb(model):
    """Untrained weights are N(0, 0.02): give the logits some range so tolerances mean something;
    give low-rank corrections (B = 0 at the start) and elastic input steps (1 at the start) values."""
    for name, p in model.named_parameters():
        if p.dim() == 2:
            p.mul_(5)
        if name.endswith("lora_b"):
            p.normal_(0, 0.2)
        if name.endswith("act.step"):
            p.fill_(0.05)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    out = {}
    root = tmp_path_factory.mktemp("runtime")
    for key, (recipe, overrides) in VARIANTS.items():
        ckpt = save_untrained_checkpoint(root / f"{key}.pt", recipe, overrides, mutate=perturb)
        out[key] = pack_checkpoint(ckpt, root / f"{key}.safetensors").path
    return out


def needs_native():
    ok, why = kernels.load_extension()
    if not ok:
        pytest.skip(why)
    if kernels.select_backend("auto").name == "reference":
        pytest.skip("no native kernel for this CPU")


def assert_logits_close(a: torch.Tensor, b: torch.Tensor, max_frac=0.05, mean_frac=0.005):
    scale = float(b.abs().max())
    diff = (a - b).abs()
    assert float(diff.max()) <= max_frac * scale, (float(diff.max()), scale)
    assert float(diff.mean()) <= mean_frac * scale, (float(diff.mean()), scale)


def reference_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens of the fake-quantized model (full forward per step) and, per step, the gap
    between its best and second-best logit."""
    ids = list(ids)
    out, gaps = [], []
    with torch.no_grad():
        for _ in range(n):
            top = torch.topk(model(torch.tensor([ids]))[0, -1], 2)
            out.append(int(top.indices[0]))
            gaps.append(float(top.values[0] - top.values[1]))
            ids.append(out[-1])
    return out, gaps


def greedy_divergence(model, ref, ids: list[int], n: int) -> tuple[int | None, float]:
    """(first step where the runtime's greedy tokens differ from the reference's, or None; the
    reference's top-2 gap at that step)."""
    got = list(generate(model, ids, max_new_tokens=n, temperature=0))
    expected, gaps = reference_greedy(ref, ids, n)
    step = next((i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b), None)
    return step, (gaps[step] if step is not None else math.inf)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_the_fake_quantized_model(packed, variant, path):
    if path == "auto":
        needs_native()
    ckpt = load_checkpoint(packed[variant])
    ref = model_from_packed(ckpt)
    model = InferenceModel.from_packed(ckpt, path)
    x = torch.randint(0, ref.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(x)
    got = model(x)
    if path == "dequant":  # the training formula itself: float rounding only
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    else:
        assert_logits_close(got, expected)


def test_layers_get_the_ops_their_specs_ask_for(packed):
    needs_native()
    m = InferenceModel.from_packed(load_checkpoint(packed["mixed"]))
    b0, b1 = m.blocks[0], m.blocks[1]
    assert not b0.fused_qkv and isinstance(b0.k, ReferenceLinear)  # group scales: reference path
    assert b1.fused_qkv and isinstance(b1.qkv, Int8Linear) and b1.qkv.act_int8 and b1.qkv.out_features == 3 * 64
    assert b1.fused_gate_up and isinstance(b1.gate_up, torch.nn.Linear)  # fp16 -> float matmul
    m = InferenceModel.from_packed(load_checkpoint(packed["ternary_all"]))
    assert isinstance(m.blocks[0].qkv, TernaryLinear) and m.blocks[0].qkv.mode == "kernel"
    assert isinstance(m.head, Int8Linear) and not m.head.act_int8 and m.head.mode == "kernel"


def test_new_formats_get_their_ops(packed):
    needs_native()
    m = InferenceModel.from_packed(load_checkpoint(packed["kernels_new_codes"]))
    b0, b1 = m.blocks[0], m.blocks[1]
    assert isinstance(b0.qkv, TernaryLinear) and b0.qkv.mode == "kernel"  # Sherry codes on the ternary kernel
    assert not b1.fused_qkv and isinstance(b1.q, WithOutputTerm) and isinstance(b1.q.op, TernaryLinear)
    assert isinstance(m.head, WithOutputTerm)  # the tied Tequila head keeps its dead-zone bias
    m = InferenceModel.from_packed(load_checkpoint(packed["int4_elastic"]))
    assert isinstance(m.blocks[0].k, ReferenceLinear) and isinstance(m.blocks[1].k, ReferenceLinear)
    m = InferenceModel.from_packed(load_checkpoint(packed["ternary_hgf"]))
    assert isinstance(m.blocks[0].q, WithOutputTerm) and isinstance(m.blocks[0].q.op, TernaryLinear)


def test_ternary_weights_stay_packed_at_two_bits(packed):
    needs_native()
    m = InferenceModel.from_packed(load_checkpoint(packed["ternary_all"]))
    cfg = m.config  # tiny: d=64, f=176, V=512, L=2
    qkv = m.blocks[0].qkv
    assert not hasattr(qkv, "codes") and qkv.packed.dtype == torch.uint8
    assert qkv.packed.numel() == 3 * 64 * 256 // 4  # rows x padded columns / 4 codes per byte
    kp = {64: 256, 176: 256}
    ternary = sum(n * kp[k] // 4 + 4 * n for n, k in [(3 * 64, 64), (64, 64), (2 * 176, 64), (64, 176)])
    int8 = 2 * (cfg.vocab_size * 64 + 4 * cfg.vocab_size)  # embed and head: codes + row scales
    norms = 4 * (2 * 64 * cfg.n_layers + 64)
    assert m.weight_bytes() == cfg.n_layers * ternary + int8 + norms


@pytest.mark.parametrize("variant", ["ternary_all", "channel_subln_tied_odd"])
def test_kernel_and_fallback_paths_agree(packed, variant):
    """Ternary layers are bit-identical between the paths; only the INT8 head's float summation
    order differs, so logits agree to float rounding."""
    needs_native()
    ckpt = load_checkpoint(packed[variant])
    fast = InferenceModel.from_packed(ckpt, "auto")
    slow = InferenceModel.from_packed(ckpt, "reference")
    x = torch.randint(0, fast.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    a, b = fast(x), slow(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    h = torch.randn(5, fast.config.d_model)
    assert torch.equal(fast.blocks[0].qkv(h), slow.blocks[0].qkv(h))


@pytest.mark.parametrize("variant", ["ternary_all", "channel_subln_tied_odd", "gqa"])
@pytest.mark.parametrize("isa", ["avx512-vnni", "avx2"])
def test_one_call_decode_step_is_bit_identical_to_the_op_by_op_path(packed, variant, isa):
    """The C++ Decoder (a whole batch-1 decode step in one parallel region) computes exactly what the
    op-by-op fused path computes, whatever the thread count (rows split unevenly over 3 threads too),
    including the k/v it writes into the cache."""
    needs_native()
    if kernels.ISA_CODES[isa] > kernels.ext().best_isa():
        pytest.skip(f"this CPU lacks {isa}")
    m = InferenceModel.from_packed(load_checkpoint(packed[variant]), isa)
    assert m.has_decoder
    x = torch.randint(0, m.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            caches, outs = [], []
            for one_call in (True, False):
                assert m.use_decoder(one_call).has_decoder == one_call
                cache = m.new_cache(1, 12)
                steps = [m(x[:, :6], cache)] + [m(x[:, t:t + 1], cache) for t in range(6, 12)]
                caches.append(cache)
                outs.append(torch.cat(steps, dim=1))
            assert torch.equal(outs[0], outs[1]), n
            assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    finally:
        torch.set_num_threads(threads)


def test_one_call_decode_step_only_for_all_ternary_models(packed):
    needs_native()
    assert not InferenceModel.from_packed(load_checkpoint(packed["mixed"]), "auto").has_decoder
    assert not InferenceModel.from_packed(load_checkpoint(packed["middle_learned_base3"]), "auto").has_decoder
    assert not InferenceModel.from_packed(load_checkpoint(packed["ternary_all"]), "reference").has_decoder
    assert not InferenceModel.from_packed(load_checkpoint(packed["ternary_all"]), "auto").use_decoder(False).has_decoder


@pytest.mark.parametrize("path", ["auto", "reference"])
def test_kv_cache_decoding_matches_the_full_forward(packed, path):
    if path == "auto":
        needs_native()
    m = InferenceModel.from_packed(load_checkpoint(packed["channel_subln_tied_odd"]), path)
    x = torch.randint(0, m.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    full = m(x)
    cache = m.new_cache(2, 24)
    parts = [m(x[:, :10], cache), m(x[:, 10:16], cache)]  # a prefill, then a chunk after cached positions
    parts += [m(x[:, t:t + 1], cache) for t in range(16, 24)]  # single-token decode steps
    assert cache.length == 24
    assert_logits_close(torch.cat(parts, dim=1), full, max_frac=0.02, mean_frac=0.002)
    last = m(x[:, :8], m.new_cache(2, 8), last_only=True)
    assert last.shape == (2, 1, m.config.vocab_size)
    with pytest.raises(ConfigError, match="exceed the cache length"):
        m(x[:, :3], cache)


@pytest.mark.parametrize("path", ["auto", "reference"])
def test_greedy_generations_identical_to_the_fake_quantized_model(trained_tiny, path, tmp_path):
    if path == "auto":
        needs_native()
    packed_path = pack_checkpoint(trained_tiny, tmp_path / "p.safetensors").path
    ref = model_from_packed(load_checkpoint(packed_path))
    model = load_inference_model(packed_path, kernels=path)
    tok = model.tokenizer
    eos = tok.token_to_id("<|endoftext|>")
    prompts = ["Once upon a time, Lily", "Tom said, \"I like", "The end.", "Mia found a shiny", "Ben"]
    for text in prompts:
        step, gap = greedy_divergence(model, ref, [eos] + tok.encode(text).ids, 40)
        assert step is None, f"{text!r}: differs at step {step} (reference top-2 gap {gap:.4f})"


def test_generation_is_deterministic_for_a_seed(trained_tiny):
    model = load_inference_model(trained_tiny)  # a training checkpoint, packed in memory
    ids = [1, 2, 3]

    def sample(seed):
        return list(generate(model, ids, max_new_tokens=30, temperature=1.0, top_k=50, seed=seed))

    assert sample(5) == sample(5)
    assert sample(5) != sample(6)
    text = "".join(generate_text(model, "Once upon a time", max_new_tokens=20, temperature=0.8, top_k=20, seed=1))
    assert text == "".join(generate_text(model, "Once upon a time", max_new_tokens=20, temperature=0.8, top_k=20,
                                         seed=1))


def test_sampling_rules():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.5, -1.0])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, 0.0, None, g) == 1
    assert sample_next(logits, 5.0, 1, g) == 1  # top-1 is greedy at any temperature
    drawn = {sample_next(logits, 10.0, 3, g) for _ in range(200)}
    assert drawn == {1, 2, 3}  # only the top 3, and (at a high temperature) all of them


def test_generate_stops_at_end_of_text_and_checks_its_arguments(trained_tiny):
    model = load_inference_model(trained_tiny)
    ids = [1, 2, 3]
    first = next(generate(model, ids, max_new_tokens=5))
    stats = GenerationStats()
    assert list(generate(model, ids, max_new_tokens=5, eos_id=first, stats=stats)) == [first]
    assert stats.stopped_at_eos and stats.new_tokens == 1 and stats.prompt_tokens == 3
    limit = model.config.max_seq_len
    for kwargs, match in [(dict(max_new_tokens=limit), "exceed the model's context"),
                          (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1), "temperature"),
                          (dict(top_k=0), "top_k")]:
        with pytest.raises(ConfigError, match=match):
            generate(model, ids, **kwargs)  # checked at the call, before any token is produced
    with pytest.raises(ConfigError, match="empty"):
        generate(model, [], max_new_tokens=3)
    with pytest.raises(ConfigError, match="context"):
        generate_text(model, "Once", max_new_tokens=limit)


def test_a_training_checkpoint_loads_like_its_packed_file(trained_tiny, tmp_path):
    packed_path = pack_checkpoint(trained_tiny, tmp_path / "p.safetensors").path
    a, b = load_inference_model(trained_tiny), load_inference_model(packed_path)
    x = torch.randint(0, 512, (1, 20))
    assert torch.equal(a(x), b(x))
    assert a.tokenizer is not None and a.weight_bytes() == b.weight_bytes()


def test_loading_imports_no_training_code(packed):
    code = (
        "import sys, torch; from qtoolkit.deploy.runtime import load_inference_model; "
        f"m = load_inference_model({str(packed['ternary_all'])!r}); "
        "m(torch.zeros(1, 4, dtype=torch.long)); "
        "bad = [k for k in ('qtoolkit.training.trainer', 'qtoolkit.training.data', 'datasets') if k in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("weights", ["auto", "packed"])
def test_cuda_path(packed, weights):
    ckpt = load_checkpoint(packed["ternary_all"])
    ref = model_from_packed(ckpt)
    model = InferenceModel.from_packed(ckpt, device="cuda", weights=weights)
    assert model.backend.name == ("dense" if weights == "auto" else "dequant") and model.device.type == "cuda"
    x = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        expected = ref(x)
    assert_logits_close(model(x.cuda()).cpu(), expected)
    cache = model.new_cache(1, 12)
    assert len(list(generate(model, [1, 2], max_new_tokens=10))) == 10 and cache.k.is_cuda


# ------------------------------------------------------------------------------ trained `small`


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """A trained `small` ternary_all checkpoint: $QTOOLKIT_SMALL_CKPT or README command 1's run if
    present, else 80 steps trained here on ../shared/data/tinystories (skipped without that data)."""
    candidates = [os.environ.get("QTOOLKIT_SMALL_CKPT"), ROOT / "runs" / "ternary_all-small" / "ckpt.pt"]
    found = next((Path(c) for c in candidates if c and Path(c).is_file()), None)
    if found is not None:
        return found
    data = SHARED_DATA / "tinystories"
    if not data.is_dir():
        pytest.skip(f"no trained small checkpoint and no shared TinyStories at {data} to train one")
    out = tmp_path_factory.mktemp("small-run")
    train(load_recipe("ternary_all", ["model.preset=small", f"data.path={data}", "train.steps=80",
                                      "train.warmup_steps=10", "train.eval_batches=2"]), out)
    return out / "ckpt.pt"


# The trained `small` model meets near-ties: "One day, a big dog" reaches a step where the
# reference's two best logits are 0.003 apart, while float rounding moves logits by up to ~0.05
# (the fake-quantized model itself moves by 0.04 when ATen runs its AVX2 instead of its AVX-512
# kernels). Generations must be identical except after such a tie.
SMALL_PROMPTS = ["Once upon a time, there was a little", "Tom and Sue went to the park. They", "Lily wanted to",
                 "The sun was", "One day, a big dog", "Once upon a time, a cat", "Mom said,", "The bird"]
NEAR_TIE = 0.05


def test_trained_small_checkpoint(small_checkpoint, tmp_path):
    src = small_checkpoint
    packed_path = pack_checkpoint(src, tmp_path / "small.safetensors").path
    ref = model_from_packed(load_checkpoint(packed_path))
    for path in ("auto", "reference"):
        if path == "auto" and kernels.select_backend("auto").name == "reference":
            continue
        model = load_inference_model(packed_path, kernels=path)
        tok = model.tokenizer
        eos = tok.token_to_id("<|endoftext|>")
        x = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert_logits_close(model(x), ref(x))
        identical = 0
        for text in SMALL_PROMPTS:
            step, gap = greedy_divergence(model, ref, [eos] + tok.encode(text).ids, 32)
            assert step is None or gap < NEAR_TIE, f"{path} {text!r}: differs at step {step}, top-2 gap {gap:.4f}"
            identical += step is None
        assert identical >= len(SMALL_PROMPTS) - 2
