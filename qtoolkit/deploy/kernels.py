"""CPU kernels for packed ternary and INT8 layers: which path runs, and the pure-PyTorch fallback.

Three paths compute the quantized layers of the inference runtime (`qtoolkit.deploy.runtime`):

    avx512-vnni | avx2   the C++ extension `csrc/ternary_kernels.cpp`: ternary weights stay packed at
                         2 bits per weight and are multiplied by int8 activation codes with integer
                         accumulation (vpdpbusd on AVX-512 VNNI, vpmaddubsw on AVX2); INT8 weight-only
                         layers (the LM head) widen int8 weights to fp32 in registers.
    reference            pure PyTorch, for machines without a compiler or without AVX2 (or forced):
                         ternary codes unpacked once to int8 and multiplied by the same activation codes
                         with `torch._int_mm` (exact int32); INT8 weight-only layers by `F.linear` on the
                         widened codes. Identical integer accumulations, hence bit-identical ternary
                         outputs; INT8 weight-only outputs differ only by float summation order.
    dequant / dense      (the runtime's GPU layouts, `runtime.InferenceModel.from_packed(weights=...)`):
                         the packed form unpacked per call, or weights dequantized once at load to
                         bf16/fp16/fp32 (the CUDA default); no custom CUDA kernel.

Choosing: `select_backend(kernels)` with kernels (or the env var QTOOLKIT_KERNELS) one of
    auto (default)    the best native path this CPU supports, else reference (the reason is kept)
    reference         force the fallback
    avx2 | avx512-vnni   force one instruction set (an error if the CPU or the build lacks it)

The extension is compiled on first use with `torch.utils.cpp_extension.load` into
$QTOOLKIT_CACHE/ext (default ~/.cache/qtoolkit/ext), one directory per torch and Python version;
later processes load the cached library in milliseconds. A first build takes 15-60 s, so the
functions that may trigger it take a `progress(stage, done, total)` callback and call it with
`("compiling C++ kernels", 0, 1)` before a build and `(..., 1, 1)` after (never when the cached
library is loaded), which the CLI renders as a one-time notice. It compiles with the default flags; each
kernel carries its instruction set as a function attribute and the CPU is probed at run time.

The ternary weight layout in memory (drawn in full in the C++ file): rows padded with code 0 to
Kp = 256 * ceil(K / 256) columns; each 256-column block is 64 bytes, byte j holding the digits
u = c + 1 of columns j, j + 64, j + 128, j + 192 in bits 0-1, 2-3, 4-5, 6-7:

    row i:  | block 0 (64 B)                   | block 1 | ...        (N, Kp / 4) uint8
    byte j of a block:  [u(192+j) u(128+j) u(64+j) u(j)]   (bits 7..0, two per code)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from qtoolkit.errors import ConfigError
from qtoolkit.quantizers.base import int8_per_token_codes

BLOCK = 256  # columns per packed block (64 bytes)
ENV = "QTOOLKIT_KERNELS"
CHOICES = ("auto", "reference", "avx2", "avx512-vnni")
ISA_CODES = {"avx2": 1, "avx512-vnni": 2}
ISA_NAMES = {v: k for k, v in ISA_CODES.items()}
SOURCE = Path(__file__).resolve().parent / "csrc" / "ternary_kernels.cpp"
EXT_NAME = "qtoolkit_kernels"


@dataclass(frozen=True)
class Backend:
    """The path that computes quantized layers, and why it was chosen."""

    name: str  # "avx512-vnni" | "avx2" | "reference"
    reason: str

    @property
    def native(self) -> bool:
        return self.name in ISA_CODES

    @property
    def isa(self) -> int:
        return ISA_CODES.get(self.name, 0)

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "reason": self.reason}


# ------------------------------------------------------------------------------ extension


def extension_dir() -> Path:
    root = Path(os.environ.get("QTOOLKIT_CACHE") or Path.home() / ".cache" / "qtoolkit")
    # keyed by the source's content too: two checkouts with different kernels never share a build
    source = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    tag = f"torch{torch.__version__.split('+')[0]}-py{sys.version_info.major}{sys.version_info.minor}-{source}"
    return root / "ext" / f"{EXT_NAME}-{tag}"


BUILD_STAGE = "compiling C++ kernels"
Progress = Callable[[str, int, int | None], None]  # (stage, done, total)


def extension_built(build_dir: Path | None = None) -> bool:
    """Whether the library is already compiled in `build_dir` (then loading it takes milliseconds)."""
    build_dir = build_dir or extension_dir()
    return any((build_dir / f"{EXT_NAME}{suffix}").is_file() for suffix in (".so", ".pyd"))


_lock = threading.Lock()
_loaded: dict[str, tuple[bool, str]] = {}  # build dir -> (ok, reason): one attempt per process
_EXT = None  # the loaded module


def load_extension(progress: Progress | None = None) -> tuple[bool, str]:
    """Compile (first time) and load the C++ kernels: (loaded, reason if not). Never prints; a build
    is announced through `progress` (module docstring)."""
    build_dir = extension_dir()
    with _lock:
        if _EXT is not None:
            return True, ""
        if str(build_dir) not in _loaded:
            _loaded[str(build_dir)] = compile_extension(build_dir, progress)
        return _loaded[str(build_dir)]


def compile_extension(build_dir: Path, progress: Progress | None = None) -> tuple[bool, str]:
    """Build (or reuse the cached build in `build_dir`) and import the module `qtoolkit_kernels`."""
    global _EXT
    building = progress is not None and not extension_built(build_dir)
    if building:
        progress(BUILD_STAGE, 0, 1)
    try:
        from torch.utils import cpp_extension

        build_dir.mkdir(parents=True, exist_ok=True)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            module = cpp_extension.load(
                name=EXT_NAME,
                sources=[str(SOURCE)],
                # -fopenmp: at::parallel_for is an inline `#pragma omp parallel`; without it, it runs serially.
                # The library then uses the libgomp torch has already loaded (same soname).
                extra_cflags=["-O3", "-ffp-contract=off", "-std=c++17", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                verbose=False,
            )
    except Exception as e:  # no compiler, no ninja, a failed build: the fallback runs
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
        return False, f"C++ extension unavailable ({type(e).__name__}: {lines[0][:200]})"
    finally:
        if building:
            progress(BUILD_STAGE, 1, 1)
    if not hasattr(module, "ternary_linear"):
        return False, "C++ extension built but it lacks its functions"
    _EXT = module
    return True, ""


def ext():
    """The compiled module (loading it if needed); RuntimeError with the reason when unavailable."""
    ok, why = load_extension()
    if not ok:
        raise RuntimeError(why)
    return _EXT


def select_backend(kernels: str | None = None, progress: Progress | None = None) -> Backend:
    """Pick the kernel path: `kernels` argument > $QTOOLKIT_KERNELS > auto (see module docstring);
    `progress` hears of a first-use build."""
    source = "argument" if kernels is not None else ENV
    choice = kernels if kernels is not None else (os.environ.get(ENV) or "auto")
    if choice not in CHOICES:
        raise ConfigError(f"kernels ({source}) must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "reference":
        how = f"{ENV}=reference" if source == ENV else "kernels='reference' requested"
        return Backend("reference", f"forced ({how})")
    ok, why = load_extension(progress)
    if not ok:
        if choice != "auto":
            raise ConfigError(f"kernels={choice} requested but {why}")
        return Backend("reference", why)
    best = int(_EXT.best_isa())
    if choice == "auto":
        if best == 0:
            return Backend("reference", "this CPU lacks AVX2 (or the OS does not enable it)")
        name = ISA_NAMES[best]
        detail = "AVX-512 VNNI present" if best == 2 else "AVX2 present, no AVX-512 VNNI"
        return Backend(name, f"auto: {detail}; C++ extension loaded")
    if ISA_CODES[choice] > best:
        raise ConfigError(f"kernels={choice} requested but this CPU supports only "
                          f"{ISA_NAMES.get(best, 'no native kernel')}")
    return Backend(choice, f"forced ({source}: {choice})")


# ------------------------------------------------------------------------------ weight layout


def padded_cols(k: int) -> int:
    return -(-k // BLOCK) * BLOCK


def pack_ternary(codes: Tensor) -> Tensor:
    """(N, K) int8 codes in {-1, 0, 1} -> (N, Kp / 4) uint8 in the kernel layout (module docstring)."""
    n, k = codes.shape
    kp = padded_cols(k)
    u = torch.ones(n, kp, dtype=torch.uint8, device=codes.device)  # padding: digit 1 = code 0
    u[:, :k] = (codes.to(torch.int16) + 1).to(torch.uint8)
    u = u.view(n, kp // BLOCK, 4, 64)  # [row, block, s, j] = column 256 b + 64 s + j
    packed = u[:, :, 0] | (u[:, :, 1] << 2) | (u[:, :, 2] << 4) | (u[:, :, 3] << 6)
    return packed.reshape(n, kp // 4).contiguous()


def unpack_ternary(packed: Tensor, k: int) -> Tensor:
    """Inverse of `pack_ternary`: (N, Kp / 4) uint8 -> (N, k) int8 codes."""
    n, nbytes = packed.shape
    p = packed.view(n, nbytes // 64, 1, 64)
    # arange, not torch.tensor([0, 2, 4, 6]): no host-to-device copy, so a CUDA graph can capture it
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=packed.device).view(1, 1, 4, 1)
    u = (p >> shifts) & 3  # (N, blocks, 4, 64)
    return (u.reshape(n, -1)[:, :k].to(torch.int8) - 1)


# ------------------------------------------------------------------------------ the products


def quantize_activations(x: Tensor, kp: int, backend: Backend) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token int8 codes of x (M, K) padded with zeros to kp columns: (codes int8 (M, kp),
    s fp32 (M,), sum of codes int32 (M,)), the training quantizer's codes and scales exactly."""
    if backend.native:
        return ext().quantize_activations(x.contiguous(), kp, backend.isa)
    codes, s = int8_per_token_codes(x)
    q = F.pad(codes.to(torch.int8), (0, kp - x.shape[1]))
    return q, s.reshape(-1), q.sum(dim=1, dtype=torch.int32)


def int_matmul(a: Tensor, b_t: Tensor) -> Tensor:
    """a (M, K) int8 @ b_t.T (b_t: (N, K) int8) -> int32 (M, N), exact."""
    if a.device.type == "cpu" and hasattr(torch, "_int_mm"):
        return torch._int_mm(a, b_t.t())
    # float sums of integer products are exact while every partial sum stays below 2^24 (fp32)
    dtype = torch.float32 if a.shape[1] * 128 * 128 < 2**24 else torch.float64
    return (a.to(dtype) @ b_t.to(dtype).t()).to(torch.int32)


def ternary_matmul_int(q: Tensor, qsum: Tensor, packed: Tensor, backend: Backend) -> Tensor:
    """Integer accumulations sum_j W~_ij q_tj (M, N) int32 of codes q (M, Kp) and a packed weight."""
    if backend.native:
        return ext().ternary_matmul_int(q.contiguous(), qsum.contiguous(), packed, backend.isa)
    return int_matmul(q, unpack_ternary(packed, q.shape[1]))


def ternary_linear(x: Tensor, packed: Tensor, gamma: Tensor, backend: Backend) -> Tensor:
    """y = float(sum_j W~_ij q_tj) * (gamma_i / s_t) for x (M, K) fp32 (native kernels)."""
    return ext().ternary_linear(x.contiguous(), packed, gamma, backend.isa)


def ternary_linear_reference(x: Tensor, codes: Tensor, gamma: Tensor) -> Tensor:
    """The fallback of `ternary_linear`, from unpacked int8 codes (N, K): the same integers and the
    same float epilogue, hence bit-identical outputs."""
    q, s = int8_per_token_codes(x)
    acc = int_matmul(q.to(torch.int8), codes)
    return acc.float() * (gamma / s)


def int8_linear(x: Tensor, codes: Tensor, scale: Tensor, backend: Backend) -> Tensor:
    """Weight-only INT8: y = (x @ codes.T) * scale, float activations, fp32 accumulation."""
    if backend.native:
        return ext().int8_linear(x.contiguous(), codes, scale, backend.isa)
    return F.linear(x, codes.to(x.dtype)) * scale


__all__ = ["BLOCK", "BUILD_STAGE", "Backend", "extension_built", "extension_dir", "int8_linear", "int_matmul", "load_extension", "pack_ternary",
           "padded_cols", "quantize_activations", "select_backend", "ternary_linear", "ternary_linear_reference",
           "ternary_matmul_int", "unpack_ternary"]
