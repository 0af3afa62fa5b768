"""The inference kernels: layout, bit-exact integer products, activation codes, path selection.

Every native test runs once per instruction set this CPU supports (AVX-512 VNNI and AVX2 on a
VNNI machine) and skips with the reason when the extension cannot be built; the PyTorch fallback
is always tested against the same references.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qtoolkit.deploy import kernels
from qtoolkit.deploy.kernels import Backend
from qtoolkit.errors import ConfigError
from qtoolkit.quantizers.base import int8_per_token_codes

PATHS = ["avx512-vnni", "avx2", "reference"]
# (tokens, rows, cols): odd sizes, a single element, exact block multiples, more than 8 blocks (the
# AVX2 int16 accumulators are widened every 8 blocks), rows not a multiple of the 4-row tile
SHAPES = [(1, 1, 1), (1, 7, 77), (3, 13, 300), (5, 33, 513), (1, 64, 64), (2, 130, 2048), (17, 9, 1000),
          (4, 4, 256), (6, 5, 4100), (1, 6, 2304), (33, 3, 255)]


def backend(name: str) -> Backend:
    if name == "reference":
        return Backend("reference", "test")
    ok, why = kernels.load_extension()
    if not ok:
        pytest.skip(why)
    best = int(kernels.ext().best_isa())
    if kernels.ISA_CODES[name] > best:
        pytest.skip(f"this CPU does not support {name}")
    return Backend(name, "test")


def random_codes(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-1, 2, (rows, cols), dtype=torch.int8, generator=gen)


def test_pack_unpack_round_trip_any_shape():
    gen = torch.Generator().manual_seed(0)
    for rows, cols in [(1, 1), (3, 255), (5, 256), (2, 257), (7, 1000), (1, 2048)]:
        codes = random_codes(rows, cols, gen)
        packed = kernels.pack_ternary(codes)
        assert packed.dtype == torch.uint8 and packed.shape == (rows, kernels.padded_cols(cols) // 4)
        assert torch.equal(kernels.unpack_ternary(packed, cols), codes)


def test_layout_is_the_documented_one():
    """Byte j of block b holds the digits of columns 256b + j + 64s in bits 2s..2s+1."""
    cols = 600  # 3 blocks, the last one padded
    codes = torch.zeros(2, cols, dtype=torch.int8)
    codes[1, 256 + 5 + 64 * 2] = 1  # block 1, byte 5, s = 2 -> digit 2 at bits 4-5
    codes[1, 3] = -1  # block 0, byte 3, s = 0 -> digit 0 at bits 0-1
    packed = kernels.pack_ternary(codes)
    assert packed.shape == (2, 3 * 64)
    assert int(packed[0, 0]) == 0b01010101  # all digits 1 (code 0)
    assert int(packed[1, 64 + 5]) == 0b01100101
    assert int(packed[1, 3]) == 0b01010100
    assert int(packed[1, -1]) == 0b01010101  # padding columns hold code 0


@pytest.mark.parametrize("path", PATHS)
def test_activation_codes_and_scales_equal_the_training_quantizer(path):
    b = backend(path)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 77, generator=gen) * 3
    x[1] = 0  # max |x| below the 1e-5 floor
    x[2] *= 1e-7
    x[3, 5] = 1e4  # one outlier
    x[4] = torch.arange(77) - 38.5  # many values exactly at half steps after scaling
    codes, s = int8_per_token_codes(x)
    q, qs, qsum = kernels.quantize_activations(x, 256, b)
    assert q.dtype == torch.int8 and q.shape == (6, 256)
    assert torch.equal(q[:, :77].float(), codes)
    assert torch.all(q[:, 77:] == 0)
    assert torch.equal(qs, s.reshape(-1))  # bit for bit: reciprocal-then-multiply, as torch does it
    assert torch.equal(qsum, codes.sum(dim=1).int())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in SHAPES])
def test_integer_accumulations_are_exact(path, shape):
    b = backend(path)
    m, n, k = shape
    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    codes = random_codes(n, k, gen)
    x = torch.randn(m, k, generator=gen)
    q, _, qsum = kernels.quantize_activations(x, kernels.padded_cols(k), b)
    acc = kernels.ternary_matmul_int(q, qsum, kernels.pack_ternary(codes), b)
    assert acc.dtype == torch.int32 and acc.shape == (m, n)
    assert torch.equal(acc.long(), q[:, :k].long() @ codes.long().t())


@pytest.mark.parametrize("path", PATHS)
def test_extreme_codes_do_not_saturate(path):
    """-128 codes against +1 weights: every vpmaddubsw pair is -512 and 64 of them sum to exactly
    -32768 in the AVX2 int16 accumulators; +127 against +1 fills them the other way."""
    b = backend(path)
    k = 4096
    weights = torch.ones(5, k, dtype=torch.int8)
    weights[1] = -1
    weights[2, ::2] = 0
    q = torch.full((3, k), -128, dtype=torch.int8)
    q[1] = 127
    q[2, ::3] = -128
    q[2, 1::3] = 127
    acc = kernels.ternary_matmul_int(q, q.sum(dim=1, dtype=torch.int32), kernels.pack_ternary(weights), b)
    assert torch.equal(acc.long(), q.long() @ weights.long().t())


@pytest.mark.parametrize("path", ["avx512-vnni", "avx2"])
@pytest.mark.parametrize("shape", SHAPES[:8], ids=[f"{m}x{n}x{k}" for m, n, k in SHAPES[:8]])
def test_ternary_linear_kernel_equals_fallback_bitwise(path, shape):
    b = backend(path)
    m, n, k = shape
    gen = torch.Generator().manual_seed(7)
    codes = random_codes(n, k, gen)
    gamma = torch.rand(n, generator=gen) + 0.01
    x = torch.randn(m, k, generator=gen)
    y = kernels.ternary_linear(x, kernels.pack_ternary(codes), gamma, b)
    assert torch.equal(y, kernels.ternary_linear_reference(x, codes, gamma))
    # and the fake-quantized training formula, up to float rounding
    xc, s = int8_per_token_codes(x)
    ref = torch.nn.functional.linear(xc / s, codes.float() * gamma[:, None])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(1, 5, 77), (3, 9, 16), (7, 33, 300), (1, 130, 768), (20, 4, 1000)])
def test_int8_weight_only_linear(path, shape):
    b = backend(path)
    m, n, k = shape
    gen = torch.Generator().manual_seed(3)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    scale = torch.rand(n, generator=gen) / 127
    x = torch.randn(m, k, generator=gen)
    y = kernels.int8_linear(x, w, scale, b)
    exact = (x.double() @ w.double().t()) * scale.double()
    torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))
    one = kernels.int8_linear(x[-1:], w, scale, b)
    torch.testing.assert_close(one.double(), exact[-1:], rtol=1e-5, atol=1e-5 * float(exact.abs().max()))
    if b.name == "avx2":  # one token alone gives the same values as inside a batch (same summation order)
        assert torch.equal(one, y[-1:])


@pytest.mark.parametrize("k", [64, 77, 768, 1000, 3000])
def test_int8_one_token_byte_planes_are_as_exact_as_fp32(k):
    """On VNNI one token goes through byte planes of x (a + b/256 + c/65536, vpdpbusd): its error
    against the exact product stays within a few times PyTorch's fp32 rounding error of the same
    product (measured 1.3-3x), for inputs spanning six orders of magnitude."""
    b = backend("avx512-vnni")
    gen = torch.Generator().manual_seed(k)
    n = 37
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    scale = torch.rand(n, generator=gen) / 127
    x = torch.randn(1, k, generator=gen) * torch.logspace(-3, 3, k)[torch.randperm(k, generator=gen)]
    y = kernels.int8_linear(x, w, scale, b).double()
    exact = (x.double() @ w.double().t()) * scale.double()
    fp32 = ((x @ w.float().t()) * scale).double()  # PyTorch's fp32 product
    err, err_fp32 = (y - exact).abs().max(), (fp32 - exact).abs().max()
    assert err <= 4 * err_fp32 + 1e-7 * float(exact.abs().max()), (float(err), float(err_fp32))



def test_int8_one_token_streamed_past_the_cache_gives_the_same_values(tmp_path):
    """A head-sized matrix (>= 8 MB) read with non-temporal prefetches (chosen when the last-level cache
    cannot hold a token's weights; forced here by QTOOLKIT_LLC_BYTES=1 in a child process) gives the
    same values bit for bit: prefetching changes what the caches keep, not the arithmetic."""
    b = backend("avx512-vnni")
    gen = torch.Generator().manual_seed(5)
    w = torch.randint(-128, 128, (11000, 768), dtype=torch.int8, generator=gen)  # 8.4 MB
    scale = torch.rand(11000, generator=gen) / 127
    x = torch.randn(1, 768, generator=gen)
    torch.save({"w": w, "scale": scale, "x": x}, tmp_path / "in.pt")
    code = ("import sys, torch; from qtoolkit.deploy import kernels; from qtoolkit.deploy.kernels import Backend; "
            "d = torch.load(sys.argv[1]); "
            "torch.save(kernels.int8_linear(d['x'], d['w'], d['scale'], Backend('avx512-vnni', 't')), sys.argv[2])")
    env = {**os.environ, "QTOOLKIT_LLC_BYTES": "1", "OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], env=env, check=True)
    assert torch.equal(torch.load(tmp_path / "out.pt"), kernels.int8_linear(x, w, scale, b))

def test_selection_env_and_argument(monkeypatch):
    monkeypatch.setenv("QTOOLKIT_KERNELS", "reference")
    b = kernels.select_backend()
    assert b.name == "reference" and "QTOOLKIT_KERNELS=reference" in b.reason and not b.native
    assert kernels.select_backend("reference").reason.startswith("forced")
    monkeypatch.setenv("QTOOLKIT_KERNELS", "fastest")
    with pytest.raises(ConfigError, match="QTOOLKIT_KERNELS.*auto, reference, avx2, avx512-vnni"):
        kernels.select_backend()
    with pytest.raises(ConfigError, match="argument"):
        kernels.select_backend("sse")


def test_auto_picks_the_best_native_path(monkeypatch):
    monkeypatch.delenv("QTOOLKIT_KERNELS", raising=False)
    ok, why = kernels.load_extension()
    if not ok:
        pytest.skip(why)
    b = kernels.select_backend()
    best = int(kernels.ext().best_isa())
    assert b.name == {2: "avx512-vnni", 1: "avx2", 0: "reference"}[best]
    assert b.reason.startswith("auto")


def test_without_a_compiler_auto_falls_back_with_the_reason(monkeypatch):
    monkeypatch.setattr(kernels, "load_extension", lambda progress=None: (False, "C++ extension unavailable (no compiler)"))
    monkeypatch.delenv("QTOOLKIT_KERNELS", raising=False)
    b = kernels.select_backend()
    assert b.name == "reference" and "no compiler" in b.reason
    with pytest.raises(ConfigError, match="avx2 requested but C.. extension unavailable"):
        kernels.select_backend("avx2")


def test_a_failed_build_is_reported_not_raised(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    def broken(**kwargs):
        raise RuntimeError("Error building extension 'qtoolkit_kernels': c++: not found")

    monkeypatch.setattr(cpp_extension, "load", broken)
    ok, why = kernels.compile_extension(tmp_path / "ext")
    assert not ok and "RuntimeError" in why and "c++: not found" in why


def test_a_first_build_is_announced_once_and_a_cached_one_is_silent(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    class Built:  # what cpp_extension.load returns, after writing the library into the build directory
        ternary_linear = None

    def fake_load(name, build_directory, **kwargs):
        (tmp_path / "ext" / f"{name}.so").write_bytes(b"")
        return Built()

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(kernels, "_EXT", None)
    events = []
    ok, _ = kernels.compile_extension(tmp_path / "ext", lambda *e: events.append(e))
    assert ok and events == [(kernels.BUILD_STAGE, 0, 1), (kernels.BUILD_STAGE, 1, 1)]
    assert kernels.extension_built(tmp_path / "ext")
    events.clear()
    ok, _ = kernels.compile_extension(tmp_path / "ext", lambda *e: events.append(e))
    assert ok and events == []  # the cached library loads without a notice


def test_extension_is_cached_under_qtoolkit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QTOOLKIT_CACHE", str(tmp_path))
    d = kernels.extension_dir()
    assert d.parent == tmp_path / "ext" and d.name.startswith("qtoolkit_kernels-torch")


@pytest.mark.parametrize("nh,nkv", [(3, 3), (4, 2), (4, 1)])  # multi-head, grouped-query, multi-query
def test_fused_block_ops_match_pytorch(nh, nkv):
    """attention_step / silu_mul / rms_norm / add_rms_norm against the PyTorch ops they replace."""
    backend("avx2")
    import torch.nn.functional as F

    from qtoolkit.model import apply_rope, repeat_kv, rope_tables

    e = kernels.ext()
    gen = torch.Generator().manual_seed(4)
    B, hd, L, pos, T = 2, 16, 20, 5, 4
    C, Ckv = nh * hd, nkv * hd
    cos, sin = rope_tables(hd, 64, 10000.0)
    kc = torch.randn(B, nkv, L, hd, generator=gen)
    vc = torch.randn(B, nkv, L, hd, generator=gen)
    qkv = torch.randn(B * T, C + 2 * Ckv, generator=gen)
    k_ref, v_ref = kc.clone(), vc.clone()
    y = e.attention_step(qkv, kc, vc, cos, sin, pos, nh)
    q, k, v = (t.reshape(B, T, -1, hd).transpose(1, 2) for t in qkv.split((C, Ckv, Ckv), dim=1))
    q, k = apply_rope(q, cos[pos:pos + T], sin[pos:pos + T]), apply_rope(k, cos[pos:pos + T], sin[pos:pos + T])
    k_ref[:, :, pos:pos + T], v_ref[:, :, pos:pos + T] = k, v
    assert torch.equal(kc, k_ref) and torch.equal(vc, v_ref)  # RoPE bit for bit; the cache written in place
    mask = torch.ones(T, pos + T, dtype=torch.bool).tril(diagonal=pos)
    k_all, v_all = (repeat_kv(t[:, :, :pos + T], nh) for t in (k_ref, v_ref))
    ref = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
    torch.testing.assert_close(y, ref.transpose(1, 2).reshape(B * T, C), rtol=1e-5, atol=1e-5)

    gu = torch.randn(3, 2 * 37, generator=gen) * 4
    g, u = gu.split(37, dim=1)
    torch.testing.assert_close(e.silu_mul(gu), F.silu(g) * u, rtol=1e-6, atol=1e-6)
    x, d, w = (torch.randn(3, 37, generator=gen) for _ in range(3))
    w = w[0].contiguous()
    torch.testing.assert_close(e.rms_norm(x, w, 1e-6), F.rms_norm(x, (37,), w, 1e-6), rtol=1e-6, atol=1e-6)
    x0 = x.clone()
    h = e.add_rms_norm(x, d, w, 1e-6)
    assert torch.equal(x, x0 + d)
    torch.testing.assert_close(h, F.rms_norm(x0 + d, (37,), w, 1e-6), rtol=1e-6, atol=1e-6)


def test_attention_step_refuses_query_heads_that_do_not_group():
    backend("avx2")
    from qtoolkit.model import rope_tables

    cos, sin = rope_tables(16, 8, 10000.0)
    kc = torch.zeros(1, 2, 8, 16)
    qkv = torch.zeros(1, 3 * 16 + 2 * 2 * 16)  # 3 query heads over 2 k/v heads
    with pytest.raises(RuntimeError, match="multiple"):
        kernels.ext().attention_step(qkv, kc, kc.clone(), cos, sin, 0, 3)
