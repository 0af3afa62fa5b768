"""`qtool export --format gguf`: read back with gguf.GGUFReader, and run by a reference of llama.cpp's
`llama` graph (adjacent-pair RoPE) written here from the GGUF tensors alone.

Tolerances: an fp16 model exported as F16 gives our logits to float32 rounding (the same weights;
max |diff| <= 1e-4 of max |logit|), which checks names, shapes, the q/k RoPE permutation and GQA;
ternary codes read back from TQ2_0/TQ1_0/Q8_0 blocks equal qtoolkit's exactly, and the block scales
are fp16(alpha) exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qtoolkit.checkpoint import load_checkpoint
from qtoolkit.errors import ConfigError, ConversionError
from qtoolkit.interop.gguf_export import export_gguf, rope_permutation
from qtoolkit.pack import model_from_checkpoint, pack_checkpoint, packed_form, unpack_layers
from tests.conftest import save_untrained_checkpoint
from tests.interop.conftest import train_bpe

gguf = pytest.importorskip("gguf")

WIDE = ["model.d_model=256", "model.d_ff=512", "model.n_kv_heads=2", "model.vocab_size=400"]  # 256-multiples


def perturb(model):
    for p in model.parameters():
        if p.dim() == 2:
            p.mul_(5)


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    from tests.conftest import write_corpus

    d = tmp_path_factory.mktemp("bpe")
    write_corpus(d / "a.txt", 300)
    return train_bpe(d, 380).to_str()  # fewer tokens than vocab_size: padding


def checkpoint(path, tokenizer_json, recipe="ternary_all", overrides=WIDE):
    p = save_untrained_checkpoint(path, recipe, overrides, mutate=perturb)
    ckpt = torch.load(p, weights_only=True)
    ckpt["tokenizer"] = tokenizer_json
    torch.save(ckpt, p)
    return p


def read(path):
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return r, fields, {t.name: t for t in r.tensors}


def dequantized(t) -> np.ndarray:
    rows = int(t.shape[1]) if len(t.shape) > 1 else 1
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(rows, -1) if len(t.shape) > 1 else \
        np.asarray(t.data, dtype=np.float32)


def tq2_0_codes_by_hand(t) -> tuple[np.ndarray, np.ndarray]:
    """(codes (rows, cols), d (rows, blocks)) of a TQ2_0 tensor, read from the bytes as the module
    docstring draws them: weight 128a + 32s + j of a block in byte 32a + j, bits 2s."""
    rows, cols = int(t.shape[1]), int(t.shape[0])
    blocks = np.asarray(t.data).reshape(rows, cols // 256, 66)
    qs, d = blocks[..., :64].reshape(rows, cols // 256, 2, 1, 32), blocks[..., 64:].copy().view(np.float16)
    digits = (qs >> (2 * np.arange(4).reshape(1, 1, 1, 4, 1))) & 3  # (rows, nb, a, s, j)
    return digits.reshape(rows, cols).astype(np.int8) - 1, d.reshape(rows, -1)


def test_tensors_types_shapes_and_metadata(tmp_path, tokenizer_json):
    ckpt_path = checkpoint(tmp_path / "t.pt", tokenizer_json)
    result = export_gguf(ckpt_path, tmp_path / "m.gguf", "tq2_0")
    r, fields, tensors = read(tmp_path / "m.gguf")
    assert fields["general.architecture"] == "llama"
    assert (fields["llama.block_count"], fields["llama.embedding_length"], fields["llama.feed_forward_length"]) == (2, 256, 512)
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (4, 2)
    assert fields["llama.rope.dimension_count"] == 64 and fields["llama.context_length"] == 64
    expected = {"token_embd.weight": ("Q8_0", (256, 400)), "output_norm.weight": ("F32", (256,)),
                "output.weight": ("Q8_0", (256, 400))}
    for i in range(2):
        expected.update({f"blk.{i}.attn_norm.weight": ("F32", (256,)), f"blk.{i}.ffn_norm.weight": ("F32", (256,)),
                         f"blk.{i}.attn_q.weight": ("TQ2_0", (256, 256)), f"blk.{i}.attn_k.weight": ("TQ2_0", (256, 128)),
                         f"blk.{i}.attn_v.weight": ("TQ2_0", (256, 128)), f"blk.{i}.attn_output.weight": ("TQ2_0", (256, 256)),
                         f"blk.{i}.ffn_gate.weight": ("TQ2_0", (256, 512)), f"blk.{i}.ffn_up.weight": ("TQ2_0", (256, 512)),
                         f"blk.{i}.ffn_down.weight": ("TQ2_0", (512, 256))})
    got = {name: (t.tensor_type.name, tuple(int(x) for x in t.shape)) for name, t in tensors.items()}
    assert got == expected
    assert result.file_bytes == (tmp_path / "m.gguf").stat().st_size and not result.fallbacks
    assert result.tensor_bytes == sum(int(t.n_bytes) for t in r.tensors)
    assert result.packed_bytes["2bit"] > result.packed_bytes["base3"] > 0


@pytest.mark.parametrize("target", ["tq2_0", "tq1_0", "q8_0", "f16"])
def test_ternary_codes_read_back_exactly(tmp_path, tokenizer_json, target):
    """Codes decoded from the blocks equal qtoolkit's (q/k rows in GGUF's RoPE order); every block's
    d is fp16(alpha); int8 layers keep their codes in Q8_0 with d = fp16(row scale)."""
    ckpt_path = checkpoint(tmp_path / "t.pt", tokenizer_json)
    export_gguf(ckpt_path, tmp_path / "m.gguf", target)
    _, _, tensors = read(tmp_path / "m.gguf")
    for name, (entry, q) in unpack_layers(packed_form(load_checkpoint(ckpt_path))).items():
        if entry.kind == "param":
            continue
        gname = {"embed": "token_embd", "lm_head": "output"}.get(name)
        if gname is None:
            i, kind = name.split(".")[1], name.split(".")[-1]
            gname = f"blk.{i}." + {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                                   "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[kind]
        t = tensors[f"{gname}.weight"]
        codes, scales = q.codes.numpy(), q.scales.numpy().reshape(-1)
        if name.endswith(("q_proj", "k_proj")):
            codes = codes[rope_permutation(codes.shape[0] // 64, 64)]
        w = dequantized(t)
        if entry.spec["name"] == "ternary":
            alpha16 = np.float32(np.float16(scales[0]))
            assert np.array_equal(np.sign(w).astype(np.int8), codes)  # the codes, exactly
            assert np.array_equal(np.abs(w[w != 0]), np.full((w != 0).sum(), alpha16))  # d = fp16(alpha)
            if t.tensor_type.name == "TQ2_0":
                by_hand, d = tq2_0_codes_by_hand(t)
                assert np.array_equal(by_hand, codes) and set(np.unique(d)) <= {np.float16(0), np.float16(scales[0])}
            assert t.tensor_type.name == {"tq2_0": "TQ2_0", "tq1_0": "TQ1_0", "q8_0": "Q8_0", "f16": "F16"}[target]
        elif target != "f16":  # int8: Q8_0 blocks hold the int8 codes unchanged
            assert t.tensor_type.name == "Q8_0"
            blocks = np.asarray(t.data).reshape(codes.shape[0], -1, 34)
            assert np.array_equal(blocks[..., 2:].copy().view(np.int8).reshape(codes.shape), codes)
            d = blocks[..., :2].copy().view(np.float16).reshape(codes.shape[0], -1)
            assert np.array_equal(d, np.repeat(scales.astype(np.float16)[:, None], d.shape[1], axis=1))


def llama_cpp_reference(path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of llama.cpp's `llama` graph computed from a GGUF file: RMSNorm, RoPE on adjacent
    pairs (x[2i], x[2i+1]) ("normal" rope), grouped-query attention, SwiGLU; float32, no
    activation quantization."""
    _, f, tensors = read(path)
    W = {name: torch.from_numpy(dequantized(t).astype(np.float32)) for name, t in tensors.items()}
    nh, nkv, eps = f["llama.attention.head_count"], f["llama.attention.head_count_kv"], f["llama.attention.layer_norm_rms_epsilon"]
    d, hd, base = f["llama.embedding_length"], f["llama.rope.dimension_count"], f["llama.rope.freq_base"]
    T = ids.shape[0]
    theta = base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.outer(torch.arange(T, dtype=torch.float64), theta).float()
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.reshape(-1)

    def rope(x):  # (T, heads, hd), adjacent pairs
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)

    x = W["token_embd.weight"][ids]
    for i in range(f["llama.block_count"]):
        p = f"blk.{i}."
        h = norm(x, W[p + "attn_norm.weight"])
        q = rope((h @ W[p + "attn_q.weight"].T).view(T, nh, hd))
        k = rope((h @ W[p + "attn_k.weight"].T).view(T, nkv, hd)).repeat_interleave(nh // nkv, dim=1)
        v = (h @ W[p + "attn_v.weight"].T).view(T, nkv, hd).repeat_interleave(nh // nkv, dim=1)
        y = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                             is_causal=True)
        x = x + y.transpose(0, 1).reshape(T, d) @ W[p + "attn_output.weight"].T
        h = norm(x, W[p + "ffn_norm.weight"])
        g = torch.nn.functional.silu(h @ W[p + "ffn_gate.weight"].T) * (h @ W[p + "ffn_up.weight"].T)
        x = x + g @ W[p + "ffn_down.weight"].T
    head = W.get("output.weight", W["token_embd.weight"])
    return norm(x, W["output_norm.weight"]) @ head.T


@pytest.mark.parametrize("arch", [[], ["model.tie_embeddings=true"], ["model.n_kv_heads=1"]], ids=["gqa", "tied", "mqa"])
def test_llama_graph_on_the_file_gives_our_logits(tmp_path, tokenizer_json, arch):
    """fp16 weights are F16 in the file, so only the graph can differ: names, the RoPE permutation of
    attn_q/attn_k, GQA and the tied head are all checked on logits."""
    ckpt_path = checkpoint(tmp_path / "t.pt", tokenizer_json, "fp16_all", WIDE + arch)
    export_gguf(ckpt_path, tmp_path / "m.gguf", "tq2_0")
    model, _ = model_from_checkpoint(load_checkpoint(ckpt_path))
    ids = torch.randint(0, 400, (48,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids[None])[0]
    got = llama_cpp_reference(tmp_path / "m.gguf", ids)
    assert float(expected.abs().max()) > 1.0
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))



def test_without_the_rope_permutation_the_logits_differ(tmp_path, tokenizer_json, monkeypatch):
    """The check above has teeth: the same file written with q/k rows in qtoolkit's order is off."""
    from qtoolkit.interop import gguf_export

    ckpt_path = checkpoint(tmp_path / "t.pt", tokenizer_json, "fp16_all")
    monkeypatch.setattr(gguf_export, "rope_permutation", lambda heads, hd: np.arange(heads * hd))
    export_gguf(ckpt_path, tmp_path / "m.gguf")
    model, _ = model_from_checkpoint(load_checkpoint(ckpt_path))
    ids = torch.randint(0, 400, (48,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids[None])[0]
    got = llama_cpp_reference(tmp_path / "m.gguf", ids)
    assert float((got - expected).abs().max()) > 0.05 * float(expected.abs().max())


def test_fallbacks_are_listed(tmp_path, tokenizer_json):
    """`small`-like widths: d_ff = 704 is no multiple of 256 -> ffn_down falls back to Q8_0 (codes
    exact); a width no multiple of 32 falls back to F16."""
    ckpt_path = checkpoint(tmp_path / "t.pt", tokenizer_json, overrides=["model.d_model=256", "model.d_ff=704",
                                                                          "model.vocab_size=400"])
    result = export_gguf(ckpt_path, tmp_path / "m.gguf", "tq1_0")
    fell = {t.name: (t.ggml_type, t.fallback) for t in result.fallbacks}
    assert set(fell) == {"blocks.0.mlp.down_proj", "blocks.1.mlp.down_proj"}
    assert fell["blocks.0.mlp.down_proj"] == ("Q8_0", "704 columns are not 256-blocks under one scale each")
    odd = checkpoint(tmp_path / "odd.pt", tokenizer_json, overrides=["model.d_model=256", "model.d_ff=200",
                                                                     "model.vocab_size=400"])
    result = export_gguf(odd, tmp_path / "odd.gguf", "tq2_0")
    assert {t.ggml_type for t in result.fallbacks} == {"F16"}
    assert "not 32-blocks" in result.fallbacks[0].fallback


def test_tokenizer_is_embedded(tmp_path, tokenizer_json):
    import json

    ckpt_path = checkpoint(tmp_path / "t.pt", tokenizer_json)
    result = export_gguf(ckpt_path, tmp_path / "m.gguf")
    _, f, _ = read(tmp_path / "m.gguf")
    tok = json.loads(tokenizer_json)
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == 400 and tokens[:380] == sorted(tok["model"]["vocab"], key=tok["model"]["vocab"].get)
    eos = tok["model"]["vocab"]["<|endoftext|>"]
    assert types[eos] == 3 and types[5] == 1 and set(types[380:]) == {5}  # control, normal, unused padding
    assert f["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    assert f["tokenizer.ggml.eos_token_id"] == eos and f["tokenizer.ggml.add_bos_token"] is False
    assert any("padded" in n for n in result.notes)


def test_packed_checkpoints_export_the_same_file(tmp_path, tokenizer_json):
    ckpt_path = checkpoint(tmp_path / "t.pt", tokenizer_json)
    packed = pack_checkpoint(ckpt_path, tmp_path / "p.safetensors", "base3").path
    a = export_gguf(ckpt_path, tmp_path / "a.gguf", "tq1_0", name="x")
    b = export_gguf(packed, tmp_path / "b.gguf", "tq1_0", name="x")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    assert a.packed_bytes == b.packed_bytes


def test_refusals(tmp_path, tokenizer_json):
    ckpt_path = checkpoint(tmp_path / "t.pt", tokenizer_json)
    with pytest.raises(ConfigError, match="--type must be one of tq2_0, tq1_0, q8_0, f16"):
        export_gguf(ckpt_path, tmp_path / "m.gguf", "q4_0")
    subln = checkpoint(tmp_path / "s.pt", tokenizer_json, "ternary_bitnet2b")
    with pytest.raises(ConversionError, match="subln"):
        export_gguf(subln, tmp_path / "m.gguf")
    no_tok = save_untrained_checkpoint(tmp_path / "n.pt", "ternary_all", WIDE)  # tokenizer "{}"
    with pytest.raises(ConversionError, match="byte-level BPE"):
        export_gguf(no_tok, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
