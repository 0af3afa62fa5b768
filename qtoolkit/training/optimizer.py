"""The training run's AdamW, with the block linears' moments optionally kept in bf16
(`train.optimizer_state`).

AdamW holds two moments per trainable value, exp_avg (m) and exp_avg_sq (v): 8 bytes in fp32, as
much as the fp32 weight and its gradient together. `train.optimizer_state: bf16` keeps m and v of
the block linears' (latent) weights in bf16, 4 bytes per weight instead of 8; every other parameter
keeps fp32 moments:

    block linears   blocks.*.attn.{q,k,v,o}_proj.weight, blocks.*.mlp.{gate,up,down}_proj.weight:
                    almost all of a model's values outside the embedding; their gradients are dense
                    and every step updates every value. bf16 moments (DeepSeek-V3, arXiv 2412.19437
                    sec. 3.3, trains its fp32 master weights with bf16 AdamW moments).
    embedding/head  fp32: a row's gradient is zero on every step its token is absent, so v of a rare
                    token decays over hundreds of steps towards values whose update m / sqrt(v) is
                    large; 8-bit optimizers keep these in 32 bits for that reason (bitsandbytes'
                    StableEmbedding, arXiv 2110.02861 sec. 2.3).
    norms, scales   fp32: a few thousand values, nothing to save; a learned quantizer scale's step
                    size decides every weight it scales.

bf16 has fp32's exponent range, so v (gradients squared, ~1e-12 here) neither underflows nor
overflows as it would in fp16; what it lacks is precision, 8 significant bits. The EMA
v <- beta2 v + (1 - beta2) g^2 moves v by a relative (1 - beta2)(g^2/v - 1) per step, and with
round-to-nearest every move smaller than half a bf16 step (2^-9 = 0.2%) is lost: with beta2 = 0.999
v could never decay at all, and at 0.95 small moves are still dropped, always towards the stored
value. So both moments are updated in fp32 and written back with stochastic rounding (round up with
probability equal to the distance to the lower bf16 value; "Revisiting BFloat16 Training",
arXiv 2010.06192; torchao's `_fp32_to_bf16_sr`): the stored value is unbiased, and the lost
precision becomes noise that averages out over steps. The step's own update uses the fp32 values
before rounding. docs/training.md measures the loss with and without.

Stochastic rounding draws its random bits from a generator seeded by (train.seed, step, parameter
index), not from torch's global generator: the run's other randomness is untouched, every process of
a data-parallel run rounds alike, and a resumed run draws the same bits as an uninterrupted one
(the checkpoint's optimizer state is all that resume needs, as with torch's AdamW).

Checkpoints hold the moments in their own dtype (plain tensors, loaded with weights_only=True).
Loading a state of the other precision converts it (`LowPrecisionAdamW.load_state_dict`; torch's
AdamW casts bf16 moments to fp32 by itself), so `--resume` may change `train.optimizer_state`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_SEED_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9)  # splitmix64 constants: spread (seed, step, index)


def low_precision_params(model: nn.Module) -> list[nn.Parameter]:
    """The weights whose moments `train.optimizer_state` may lower: the trainable weights of the
    linear layers inside the blocks (module docstring)."""
    out, seen = [], set()
    for name, module in model.named_modules():
        if name.startswith("blocks.") and isinstance(module, nn.Linear) and module.weight.requires_grad:
            if id(module.weight) not in seen:
                seen.add(id(module.weight))
                out.append(module.weight)
    return out


def optimizer_state_bytes(model: nn.Module, optimizer_state: str = "fp32") -> int:
    """Bytes of AdamW's two moments for `model`'s trainable parameters (works on the meta device)."""
    low = {id(p) for p in low_precision_params(model)} if optimizer_state != "fp32" else set()
    low_size = torch.finfo(STATE_DTYPES[optimizer_state]).bits // 8
    return sum(2 * p.numel() * (low_size if id(p) in low else 4) for p in model.parameters() if p.requires_grad)


def stochastic_round_(target: Tensor, source: Tensor, generator: torch.Generator | None = None,
                      noise: Tensor | None = None) -> Tensor:
    """Write fp32 `source` into bf16 `target`, rounding each value up (in magnitude) with probability
    equal to its distance from the value below: a bf16 number is the top 16 bits of an fp32 one, so
    add 16 random bits to the low half and truncate. Unbiased: E[target] = source. inf stays inf.
    `noise`: the random bits (int32 in [0, 2^16), source's shape), else drawn from `generator`."""
    if noise is None:
        noise = torch.randint(0, 1 << 16, source.shape, dtype=torch.int32, device=source.device, generator=generator)
    bits = source.contiguous().view(torch.int32).add(noise).bitwise_and_(-65536)  # -65536 = 0xFFFF0000
    return target.copy_(bits.view(torch.float32))


class LowPrecisionAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments; torch.optim.AdamW's arithmetic and
    state layout: `step`, `exp_avg`, `exp_avg_sq`) whose moments of `low_params` are kept in
    `state_dtype` (bf16) with stochastic rounding; `rounding="nearest"` (for comparison only) rounds
    to nearest. Moments of the other parameters are fp32 and updated exactly as torch's
    single-tensor AdamW does. `seed`: the stochastic rounding's (module docstring)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, low_params=(), state_dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0, rounding: str = "stochastic"):
        if rounding not in ("stochastic", "nearest"):
            raise ValueError(f"rounding must be stochastic or nearest, got {rounding!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.low = {id(p) for p in low_params}
        self.state_dtype = state_dtype
        self.seed = seed
        self.rounding = rounding

    def _generator(self, index: int, step: int, device: torch.device) -> torch.Generator:
        mixed = (self.seed * _SEED_MIX[0] + step * _SEED_MIX[1] + index) % (1 << 63)
        return torch.Generator(device=device).manual_seed(mixed)

    def _store(self, exp_avg: Tensor, m: Tensor, exp_avg_sq: Tensor, v: Tensor, generator: torch.Generator) -> None:
        if self.rounding == "nearest":
            exp_avg.copy_(m)
            exp_avg_sq.copy_(v)
            return
        # one draw of 32 random bits per value serves both moments (the draw is most of the cost)
        bits = torch.randint(-(1 << 31), (1 << 31) - 1, m.shape, dtype=torch.int32, device=m.device,
                             generator=generator)
        stochastic_round_(exp_avg, m, noise=bits & 0xFFFF)
        stochastic_round_(exp_avg_sq, v, noise=(bits >> 16) & 0xFFFF)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                index += 1  # the parameter's position in the optimizer: part of its rounding seed
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                if not state:
                    dtype = self.state_dtype if id(p) in self.low else p.dtype
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                step_t += 1
                step = step_t.item()
                if wd != 0:
                    p.mul_(1 - lr * wd)
                if exp_avg.dtype == p.dtype:  # full precision: in place, as torch.optim.AdamW
                    exp_avg.lerp_(grad, 1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    m, v = exp_avg, exp_avg_sq
                else:  # in fp32, then stored rounded; this step uses the unrounded values
                    g = grad.float()
                    m = exp_avg.float().lerp_(g, 1 - beta1)
                    v = exp_avg_sq.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    self._store(exp_avg, m, exp_avg_sq, v, self._generator(index, int(step), p.device))
                bias_correction1 = 1 - beta1**step
                bias_correction2_sqrt = (1 - beta2**step) ** 0.5
                denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
                p.addcdiv_(m, denom, value=-lr / bias_correction1)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader casts every moment to its parameter's dtype; the low-precision ones are cast
        back (exact for bf16 saved as bf16; a fp32 state saved by an fp32 run is rounded once)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and id(p) in self.low:
                    for key in ("exp_avg", "exp_avg_sq"):
                        if key in state:
                            state[key] = state[key].to(self.state_dtype)


def build_adamw(groups: list[dict[str, Any]], model: nn.Module, lr: float, betas: tuple[float, float], eps: float,
                optimizer_state: str = "fp32", seed: int = 0, fused: bool | None = None) -> torch.optim.Optimizer:
    """The trainer's optimizer over `groups` (trainer.param_groups): torch.optim.AdamW when every
    moment is fp32 (`fused` as torch's flag), else `LowPrecisionAdamW` with the block linears' moments
    in `optimizer_state`."""
    if optimizer_state == "fp32":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
    return LowPrecisionAdamW(groups, lr=lr, betas=betas, eps=eps, low_params=low_precision_params(model),
                             state_dtype=STATE_DTYPES[optimizer_state], seed=seed)


__all__ = ["STATE_DTYPES", "LowPrecisionAdamW", "build_adamw", "low_precision_params", "optimizer_state_bytes",
           "stochastic_round_"]
