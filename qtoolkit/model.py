"""The decoder-only language model (TernaryLM's architecture), in one file.

    embed -> n_layers x Block -> norm -> lm_head

    Block:  x = x + attn(attn_norm(x))          pre-norm, RMSNorm
            x = x + mlp(mlp_norm(x))
    attn:   q,k,v = q_proj/k_proj/v_proj(x); RoPE on q,k; causal scaled_dot_product_attention;
            [sub_norm if config.subln]; o_proj
            grouped-query attention when n_kv_heads < n_heads: k_proj/v_proj give n_kv_heads heads
            (d_model -> kv_dim), and query head h reads k/v head h // (n_heads / n_kv_heads)
    mlp:    down_proj([sub_norm if config.subln](silu(gate_proj(x)) * up_proj(x)))     SwiGLU

Module names are stable because policies and reports refer to them:
    embed, blocks.{i}.attn.{q,k,v,o}_proj, blocks.{i}.mlp.{gate,up,down}_proj, lm_head
(norms: blocks.{i}.attn_norm, blocks.{i}.mlp_norm, blocks.{i}.attn.sub_norm, blocks.{i}.mlp.sub_norm,
norm). No linear has a bias. Quantization is applied afterwards by `qtoolkit.policy.apply_policy`,
which swaps these nn.Linear/nn.Embedding modules for their quantized versions in place.
"""

from __future__ import annotations

import functools
import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from qtoolkit.config import ModelConfig
from qtoolkit.errors import ConfigError

_BLOCK_NAME = re.compile(r"blocks\.(\d+)\.(?:attn|mlp)\.(\w+?)(?:_proj)?$")


def layer_position(name: str) -> tuple[int | None, str]:
    """(block index, module kind) of a module name: ("blocks.3.mlp.up_proj") -> (3, "up"),
    ("embed") -> (None, "embed"), ("lm_head") -> (None, "lm_head"); anything else (None, name)."""
    m = _BLOCK_NAME.match(name)
    if m:
        return int(m.group(1)), m.group(2)
    return None, name


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables, each (max_len, head_dim // 2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., i], x[..., i + hd/2]) of x (B, nh, T, hd) by position angles (T, hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def repeat_kv(x: Tensor, n_heads: int) -> Tensor:
    """(B, n_kv, T, hd) -> (B, n_heads, T, hd): k/v head g serves query heads g*r .. g*r + r - 1."""
    r = n_heads // x.shape[1]
    return x if r == 1 else x.repeat_interleave(r, dim=1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, cfg.kv_dim, bias=False)
        self.v_proj = nn.Linear(d, cfg.kv_dim, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.sub_norm = RMSNorm(d, cfg.norm_eps) if cfg.subln else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, C = x.shape
        # (B, T, C) -> (B, nh, T, hd); k, v: (B, n_kv, T, hd)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = repeat_kv(k, self.n_heads), repeat_kv(v, self.n_heads)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, C)
        if self.sub_norm is not None:
            y = self.sub_norm(y)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.sub_norm = RMSNorm(cfg.d_ff, cfg.norm_eps) if cfg.subln else None

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        if self.sub_norm is not None:
            h = self.sub_norm(h)
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class DecoderLM(nn.Module):
    activation_checkpointing: bool = False  # recompute each block in the backward (`hidden_states`); not state

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # Under `with torch.device("meta")` (memory plans, checkpoint checks) a model has shapes only:
        # skip initialisation, whose normal_ on meta tensors costs seconds (it imports torch._dynamo).
        meta = torch.empty(0).device.type == "meta"
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model,
                                  _weight=torch.empty(cfg.vocab_size, cfg.d_model) if meta else None)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if meta:
            cos = sin = torch.empty(cfg.max_seq_len, cfg.head_dim // 2)
        else:
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if not meta:
            self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        # GPT-2: residual-stream output projections are scaled down by depth.
        resid_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_resid = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=resid_std if is_resid else std)

    def hidden_states(self, idx: Tensor) -> Tensor:
        """idx (B, T) token ids -> final normalized hidden states (B, T, d_model): lm_head's input
        (what a classification head reads, see qtoolkit.evaluate.classifier; the chunked loss of
        training.loss reads them too).

        With `activation_checkpointing` set (the trainer's `train.activation_checkpointing`), each
        block keeps only its input for the backward and recomputes its activations there
        (`torch.utils.checkpoint`): activation memory drops from every block's to one block's plus
        a (B, T, d_model) tensor per block, for one more forward of the blocks per step."""
        T = idx.shape[1]
        if T > self.config.max_seq_len:
            raise ConfigError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed(idx)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, cos, sin, use_reentrant=False) if recompute else block(x, cos, sin)
        return self.norm(x)

    def forward(self, idx: Tensor) -> Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab_size)."""
        return self.lm_head(self.hidden_states(idx))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # shared (tied) parameters counted once


@functools.lru_cache(maxsize=4)
def _meta_model(fields: tuple[tuple[str, object], ...]) -> DecoderLM:
    with torch.device("meta"):
        return DecoderLM(ModelConfig(**dict(fields)))


def meta_model(cfg: ModelConfig) -> DecoderLM:
    """A shapes-only DecoderLM of `cfg` on the meta device (no memory), cached per config: memory
    plans, recipe checks, checkpoint checks and search spaces of one process share it. Read it,
    never modify it (apply a policy to a model of your own)."""
    return _meta_model(tuple(cfg.to_dict().items()))
