"""Parameter names of a Llama-family model in Hugging Face transformers and in qtoolkit's DecoderLM.

    transformers (LlamaForCausalLM, BitNetForCausalLM)          qtoolkit DecoderLM
    model.embed_tokens.weight                                   embed.weight
    model.layers.{i}.input_layernorm.weight                     blocks.{i}.attn_norm.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight            blocks.{i}.attn.{q,k,v,o}_proj.weight
    model.layers.{i}.self_attn.attn_sub_norm.weight  (BitNet)   blocks.{i}.attn.sub_norm.weight
    model.layers.{i}.post_attention_layernorm.weight            blocks.{i}.mlp_norm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight             blocks.{i}.mlp.{gate,up,down}_proj.weight
    model.layers.{i}.mlp.ffn_sub_norm.weight  (BitNet)          blocks.{i}.mlp.sub_norm.weight
    model.norm.weight                                           norm.weight
    lm_head.weight                                              lm_head.weight

The two models compute the same function from the same tensors: no weight is permuted. Both rotate
the pairs (x[i], x[i + head_dim/2]) of each head by RoPE (transformers' `rotate_half`, qtoolkit's
`apply_rope`) with the same frequencies theta^(-2i/head_dim), and both share k/v head h // r among
query heads (grouped-query attention). `tests/interop/test_hf_import.py` checks it on logits.
Module names (for `modules_to_not_convert`) are the parameter names without ".weight".
"""

from __future__ import annotations

import re

# (qtoolkit pattern, transformers pattern); "{i}" is the block index
_PAIRS = [
    ("embed", "model.embed_tokens"),
    ("blocks.{i}.attn_norm", "model.layers.{i}.input_layernorm"),
    ("blocks.{i}.attn.{p}_proj", "model.layers.{i}.self_attn.{p}_proj"),
    ("blocks.{i}.attn.sub_norm", "model.layers.{i}.self_attn.attn_sub_norm"),
    ("blocks.{i}.mlp_norm", "model.layers.{i}.post_attention_layernorm"),
    ("blocks.{i}.mlp.{p}_proj", "model.layers.{i}.mlp.{p}_proj"),
    ("blocks.{i}.mlp.sub_norm", "model.layers.{i}.mlp.ffn_sub_norm"),
    ("norm", "model.norm"),
    ("lm_head", "lm_head"),
]


def _regex(pattern: str) -> re.Pattern:
    body = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>[a-z]+)")
    return re.compile(body + r"(?P<suffix>(?:\.weight)?)")


_TO_HF = [(_regex(ours), theirs) for ours, theirs in _PAIRS]
_FROM_HF = [(_regex(theirs), ours) for ours, theirs in _PAIRS]


def _translate(name: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for regex, target in table:
        m = regex.fullmatch(name)
        if m:
            groups = m.groupdict()
            out = target.replace("{i}", groups.get("i") or "").replace("{p}", groups.get("p") or "")
            return out + groups["suffix"]
    return None


def to_hf(name: str) -> str:
    """The transformers name of a qtoolkit module or parameter name."""
    out = _translate(name, _TO_HF)
    if out is None:
        raise KeyError(f"no transformers name for {name!r}")
    return out


def from_hf(name: str) -> str | None:
    """The qtoolkit name of a transformers module or parameter name (None: not part of DecoderLM)."""
    return _translate(name, _FROM_HF)
