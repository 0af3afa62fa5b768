"""Model configuration and named presets.

A `ModelConfig` holds only serializable values (names and numbers), so it round-trips through
YAML recipes and checkpoints. Presets are plain dicts of field overrides; `ModelConfig.from_name`
builds one and `__post_init__` validates the result.

Presets:
    ternarylm-132m  the TernaryLM paper's shape (12 layers, d=768, 12 heads, SwiGLU 2048, vocab 30522,
                    context 512). `num_params()` computes ~131.8M; tests check it against 132M +- 3M.
    small           ~11M parameters with an 8k vocabulary: trains usefully on 2 CPU cores in tens of
                    minutes. At this width a 30k vocabulary would dominate both parameters and step time.
    tiny            a toy model for tests: a training step takes milliseconds.

Each preset also carries training defaults (`TRAIN_DEFAULTS`) that recipes fall back to when they
leave a field unset; e.g. the paper's 1k warmup steps belong to the 132M run, not to `tiny`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from qtoolkit.errors import ConfigError, UnknownNameError, short_repr

# Bounds that no real model reaches but that keep a hostile config from asking for terabytes before
# anything checks it against stored tensors (qtoolkit/verify.py does that exactly).
MAX_DIM = 2**31 - 1  # any single dimension, layer or head count
MAX_LAYERS = 10_000  # a meta model (plans, checks) costs ~1 ms and ~150 kB per block
MAX_SEQ_LEN = 2**20  # RoPE tables are (max_seq_len, head_dim / 2) in fp32, built at model construction


@dataclass
class ModelConfig:
    vocab_size: int = 30522
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    # Grouped-query attention: k/v heads, each shared by n_heads / n_kv_heads query heads (Llama 2 70B,
    # Llama 3). None means n_heads (multi-head attention); __post_init__ fills it in.
    n_kv_heads: int | None = None
    d_ff: int = 2048  # SwiGLU hidden width
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    # BitNet b1.58 2B4T's "SubLN": an extra RMSNorm on the input of o_proj and of down_proj.
    subln: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        errors = self.validate()
        if not errors and self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if errors:
            raise ConfigError("invalid model config: " + "; ".join(f"{k}: {m}" for k, m in errors))

    def validate(self) -> list[tuple[str, str]]:
        """Return (field, message) pairs for every invalid value (empty when valid)."""
        errors = []
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                errors.append((name, f"must be a positive integer, got {short_repr(value)}"))
            elif value > MAX_DIM:
                errors.append((name, f"{value:,} is beyond any model this toolkit can hold (at most {MAX_DIM:,})"))
        if not errors and self.d_model % self.n_heads:
            errors.append(("n_heads", f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}"))
        elif not errors and (self.d_model // self.n_heads) % 2:
            errors.append(("n_heads", f"head dim {self.d_model // self.n_heads} must be even for RoPE"))
        kv = self.n_kv_heads
        if kv is not None:
            if not isinstance(kv, int) or isinstance(kv, bool) or kv < 1:
                errors.append(("n_kv_heads", f"must be a positive integer (or null = n_heads), got {short_repr(kv)}"))
            elif isinstance(self.n_heads, int) and self.n_heads % kv:
                errors.append(("n_kv_heads", f"n_heads={self.n_heads} is not a multiple of n_kv_heads={kv}"))
        if not errors and self.n_layers > MAX_LAYERS:
            errors.append(("n_layers", f"at most {MAX_LAYERS:,} (every layer is a module, even in a memory "
                                       f"plan), got {self.n_layers:,}"))
        if not errors and self.max_seq_len > MAX_SEQ_LEN:
            errors.append(("max_seq_len", f"at most {MAX_SEQ_LEN:,} (the RoPE tables are built for every "
                                          f"position), got {self.max_seq_len:,}"))
        for name, lo, hi in (("rope_theta", 0.0, math.inf), ("norm_eps", 0.0, 1.0), ("init_std", 0.0, math.inf)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                errors.append((name, f"must be a finite number, got {short_repr(value)}"))
            elif not lo < value < hi:
                errors.append((name, f"must be in ({lo:g}, {hi:g}), got {value!r}" if hi < math.inf
                               else f"must be > {lo:g}, got {value!r}"))
        for name in ("tie_embeddings", "subln"):
            if not isinstance(getattr(self, name), bool):
                errors.append((name, f"must be true or false, got {short_repr(getattr(self, name))}"))
        return errors

    @classmethod
    def check_values(cls, values: dict[str, Any]) -> list[tuple[str, str]]:
        """`validate()` for field values that may not construct (no exception raised)."""
        cfg = object.__new__(cls)
        for f in fields(cls):
            setattr(cfg, f.name, values.get(f.name, f.default))
        return cfg.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_dim(self) -> int:
        """Width of the k and v projections: n_kv_heads * head_dim (= d_model without GQA)."""
        return (self.n_kv_heads or self.n_heads) * self.head_dim

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise UnknownNameError(f"unknown model preset {name!r}; available: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config fields: {short_repr(', '.join(sorted(map(str, unknown))), 120)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def num_params(self) -> int:
        """Parameter count computed from the shapes (tied embeddings counted once)."""
        d, f, L, V = self.d_model, self.d_ff, self.n_layers, self.vocab_size
        per_block = 2 * d * d + 2 * d * self.kv_dim + 3 * d * f + 2 * d  # attn q,o + k,v; mlp; two norms
        if self.subln:
            per_block += d + f
        embed = V * d
        head = 0 if self.tie_embeddings else V * d
        return embed + L * per_block + d + head  # + final norm


PRESETS: dict[str, dict[str, Any]] = {
    "ternarylm-132m": dict(
        vocab_size=30522, d_model=768, n_layers=12, n_heads=12, d_ff=2048, max_seq_len=512
    ),
    "small": dict(vocab_size=8192, d_model=256, n_layers=8, n_heads=8, d_ff=704, max_seq_len=256),
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=176, max_seq_len=64),
}

# Training defaults a recipe falls back to for fields it leaves unset (see recipe.TrainConfig).
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "ternarylm-132m": dict(steps=20000, warmup_steps=1000, batch_size=32, seq_len=512,
                           eval_every=500, ckpt_every=1000),
    "small": dict(steps=1500, warmup_steps=100, batch_size=16, seq_len=256,
                  eval_every=100, ckpt_every=250),
    "tiny": dict(steps=60, warmup_steps=5, batch_size=8, seq_len=64, eval_every=20, ckpt_every=20),
}
