// CPU kernels for packed ternary and INT8 layers (qtoolkit inference runtime).
//
// Built on first use by qtoolkit/kernels.py through torch.utils.cpp_extension and cached, as the
// Python module `qtoolkit_kernels`. The file compiles with the compiler's default flags:
// each kernel carries its instruction set in a target attribute and `best_isa()` picks one at run
// time, so one build serves any x86-64 CPU (AVX2 required, AVX-512 VNNI used when present).
//
// ---------------------------------------------------------------------------------------------
// Ternary weight layout in memory (the runtime repacks the on-disk layout into this at load time)
//
//   W is (N, K): N output rows, K inputs, codes c in {-1, 0, +1} stored as digits u = c + 1.
//   Each row is padded with code 0 to Kp = 256 * ceil(K / 256) columns and cut into blocks of 256
//   columns = 64 bytes. Byte j of block b holds the digits of the four columns 256b + j + 64s,
//   s = 0..3, two bits each:
//
//       block b of row i (64 bytes, 2 bits per weight)
//
//       byte j:   bit  7 6 | 5 4 | 3 2 | 1 0                     j = 0 .. 63
//                      u3  | u2  | u1  | u0          u_s = W~[i, 256b + 64s + j] + 1
//
//       row i = [block 0][block 1] ... [block Kp/256 - 1]       rows follow each other: (N, Kp/4) uint8
//
//   One 64-byte load and four (shift, and 3) steps give the digits of 256 consecutive columns as four
//   64-byte vectors, s = 0..3, each lined up with 64 consecutive activation codes x[256b + 64s ..].
//   (AVX2 takes a block as two 32-byte halves: half h, step s -> columns 256b + 64s + 32h + 0..31.)
//
// Arithmetic (identical to the fake-quantized training forward, up to float rounding of the result)
//
//   activations, per token t (row of x):   s_t = (1 / max(max_j |x_tj|, 1e-5)) * 127
//                                          q_tj = clamp(round_half_even(x_tj * s_t), -128, 127)
//       (this is exactly torch's `127.0 / amax.clamp_min(1e-5)`, which evaluates reciprocal * 127)
//   integer dot:   acc_ti = sum_j W~_ij q_tj = sum_j u_ij q_tj - sum_j q_tj       (int32, exact)
//       u_ij in {0,1,2} is unsigned and q_tj signed: one vpdpbusd (AVX-512 VNNI) multiplies 64 pairs
//       and adds them in groups of 4 into int32 lanes; on AVX2 vpmaddubsw gives int16 pair sums
//       |u0 q0 + u1 q1| <= 2 * 2 * 128 = 512 (never saturates), 64 of which fit an int16 lane
//       (64 * 512 = 32768) before vpmaddwd widens them to int32.
//   output:        y_ti = float(acc_ti) * (gamma_i / s_t)            (gamma per tensor or per row)
//
// INT8 weight-only layers (W8, float activations; e.g. the LM head): y_ti = (sum_j x_tj * float(w_ij))
// * scale_i, float accumulation; int8 weights are widened to fp32 in registers, never in memory.
// ---------------------------------------------------------------------------------------------

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>

#include <cpuid.h>
#include <immintrin.h>
#include <omp.h>

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <tuple>
#include <vector>

#define QT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")))
#define QT_AVX2 __attribute__((target("avx2,fma")))

namespace {

constexpr int64_t kBlock = 256;      // columns per block
constexpr int64_t kBlockBytes = 64;  // bytes per block (2 bits per column)

enum Isa : int64_t { kNone = 0, kAvx2 = 1, kAvx512Vnni = 2 };

// ------------------------------------------------------------------------- CPU feature detection

bool os_saves(uint64_t mask) {  // XCR0: the OS saves these register states on context switch
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((static_cast<uint64_t>(hi) << 32 | lo) & mask) == mask;
}

int64_t best_isa() {
  __builtin_cpu_init();
  if (os_saves(0xE6) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni"))
    return kAvx512Vnni;
  if (os_saves(0x6) && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kNone;
}

int64_t checked_isa(int64_t isa) {
  static const int64_t best = best_isa();  // CPUID in a VM can cost microseconds: probe once
  if (isa < 0) isa = best;
  TORCH_CHECK(isa == kAvx2 || isa == kAvx512Vnni, "qtoolkit kernels: unknown instruction set ", isa,
              " (1 = AVX2, 2 = AVX-512 VNNI)");
  TORCH_CHECK(isa <= best, "qtoolkit kernels: this CPU does not support instruction set ", isa);
  return isa;
}

// ------------------------------------------------------------------ activation quantization

inline float token_scale(float amax) {
  const float a = amax < 1e-5f ? 1e-5f : amax;  // clamp_min(1e-5) (NaN passes through, as in torch)
  return (1.0f / a) * 127.0f;
}

QT_AVX512 void quantize_row_avx512(const float* x, int64_t K, int64_t Kp, int8_t* q, float* s, int32_t* sum) {
  __m512 vmax = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= K; j += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + j)));
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - j)) - 1u);
  if (j < K) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail, x + j)));
  const float scale = token_scale(_mm512_reduce_max_ps(vmax));
  const __m512 vs = _mm512_set1_ps(scale);
  const __m512i lo = _mm512_set1_epi32(-128), hi = _mm512_set1_epi32(127);
  __m512i vsum = _mm512_setzero_si512();
  for (j = 0; j + 16 <= K; j += 16) {  // cvtps rounds half to even (MXCSR default), like torch.round
    __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + j), vs));
    c = _mm512_min_epi32(_mm512_max_epi32(c, lo), hi);
    vsum = _mm512_add_epi32(vsum, c);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j), _mm512_cvtepi32_epi8(c));
  }
  if (j < K) {
    __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(tail, x + j), vs));
    c = _mm512_maskz_mov_epi32(tail, _mm512_min_epi32(_mm512_max_epi32(c, lo), hi));
    vsum = _mm512_add_epi32(vsum, c);
    _mm512_mask_cvtepi32_storeu_epi8(q + j, tail, c);
    j = K;
  }
  for (; j < Kp; ++j) q[j] = 0;
  *s = scale;
  *sum = _mm512_reduce_add_epi32(vsum);
}

QT_AVX2 void quantize_row_avx2(const float* x, int64_t K, int64_t Kp, int8_t* q, float* s, int32_t* sum) {
  float amax = 0.f;
  __m256 vmax = _mm256_setzero_ps();
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  int64_t j = 0;
  for (; j + 8 <= K; j += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(x + j), absmask));
  alignas(32) float m[8];
  _mm256_store_ps(m, vmax);
  for (float v : m) amax = v > amax ? v : amax;
  for (int64_t t = j; t < K; ++t) amax = std::fabs(x[t]) > amax ? std::fabs(x[t]) : amax;
  const float scale = token_scale(amax);
  const __m256 vs = _mm256_set1_ps(scale);
  const __m256i lo = _mm256_set1_epi32(-128), hi = _mm256_set1_epi32(127);
  __m256i vsum = _mm256_setzero_si256();
  for (j = 0; j + 8 <= K; j += 8) {
    __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j), vs));
    c = _mm256_min_epi32(_mm256_max_epi32(c, lo), hi);
    vsum = _mm256_add_epi32(vsum, c);
    const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + j), _mm_packs_epi16(p16, p16));
  }
  alignas(32) int32_t v[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(v), vsum);
  int32_t total = 0;
  for (int32_t t : v) total += t;
  for (; j < K; ++j) {
    float r = std::nearbyint(x[j] * scale);
    r = r < -128.f ? -128.f : (r > 127.f ? 127.f : r);
    q[j] = static_cast<int8_t>(r);
    total += static_cast<int32_t>(r);
  }
  for (; j < Kp; ++j) q[j] = 0;
  *s = scale;
  *sum = total;
}

void quantize_rows(const float* x, int64_t M, int64_t K, int64_t Kp, int8_t* q, float* s, int32_t* sum,
                   int64_t isa) {
  for (int64_t m = 0; m < M; ++m) {
    if (isa == kAvx512Vnni)
      quantize_row_avx512(x + m * K, K, Kp, q + m * Kp, s + m, sum + m);
    else
      quantize_row_avx2(x + m * K, K, Kp, q + m * Kp, s + m, sum + m);
  }
}

// -------------------------------------------------------------------------- ternary products

struct TernaryArgs {
  const uint8_t* w;       // (N, Kp / 4) packed digits, layout above
  int64_t N, Kp, M;
  const int8_t* x;        // (M, Kp) activation codes, zero beyond K
  const int32_t* xsum;    // (M,) sum of each token's codes
  int32_t* out_int;       // (M, N) integer dots, or null
  float* out_f;           // (M, N) float outputs (when out_int is null)
  const float* gamma;     // (N,) weight scale of each row
  const float* xscale;    // (M,) s_t
};

inline void store_out(const TernaryArgs& a, int64_t t, int64_t i, int32_t udot) {
  const int32_t v = udot - a.xsum[t];
  if (a.out_int)
    a.out_int[t * a.N + i] = v;
  else
    a.out_f[t * a.N + i] = static_cast<float>(v) * (a.gamma[i] / a.xscale[t]);
}

// ---- AVX-512 VNNI

QT_AVX512 inline __m128i hsum4_512(__m512i a, __m512i b, __m512i c, __m512i d) {
  // -> [sum(a), sum(b), sum(c), sum(d)]
  const __m256i a2 = _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1));
  const __m256i b2 = _mm256_add_epi32(_mm512_castsi512_si256(b), _mm512_extracti64x4_epi64(b, 1));
  const __m256i c2 = _mm256_add_epi32(_mm512_castsi512_si256(c), _mm512_extracti64x4_epi64(c, 1));
  const __m256i d2 = _mm256_add_epi32(_mm512_castsi512_si256(d), _mm512_extracti64x4_epi64(d, 1));
  const __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a2, b2), _mm256_hadd_epi32(c2, d2));
  return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

template <int R>
QT_AVX512 inline void reduce_store_512(const TernaryArgs& a, int64_t t, int64_t i, const __m512i* acc) {
  if constexpr (R == 4) {  // the epilogue of store_out on 4 rows at once (same IEEE operations)
    const __m128i v = _mm_sub_epi32(hsum4_512(acc[0], acc[1], acc[2], acc[3]), _mm_set1_epi32(a.xsum[t]));
    if (a.out_int) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(a.out_int + t * a.N + i), v);
    } else {
      const __m128 g = _mm_div_ps(_mm_loadu_ps(a.gamma + i), _mm_set1_ps(a.xscale[t]));
      _mm_storeu_ps(a.out_f + t * a.N + i, _mm_mul_ps(_mm_cvtepi32_ps(v), g));
    }
  } else {
    for (int r = 0; r < R; ++r) store_out(a, t, i + r, _mm512_reduce_add_epi32(acc[r]));
  }
}

// One token (decode): R rows share each activation load. The digits are not shifted down: step s is
// masked in place, p & (3 << 2s) = 4^s u, and multiplied into its own accumulator, which then holds
// 4^s times the step's dot; each lane is a multiple of 4^s, so an arithmetic shift by 2s at the end
// divides it exactly. 4 vpdpbusd and 4 ands per 64 bytes instead of 4 + 3 shifts + 4 ands: 512-bit
// shifts and vpdpbusd share one port (port 0 on Intel), which bounded this loop (7 -> 4 port-0 uops).
// |4^s u x| <= 128 * 128, so an int32 lane holds 2^31 / (4 * 2^14) = 32768 blocks (K up to 8M).
// The four step accumulators of a row as one: exact, every lane of S_s is 4^s times an integer.
QT_AVX512 inline __m512i combine_steps(__m512i s0, __m512i s1, __m512i s2, __m512i s3) {
  return _mm512_add_epi32(_mm512_add_epi32(s0, _mm512_srai_epi32(s1, 2)),
                          _mm512_add_epi32(_mm512_srai_epi32(s2, 4), _mm512_srai_epi32(s3, 6)));
}

template <int R>
QT_AVX512 void gemv_rows_vnni(const TernaryArgs& a, int64_t i) {
  static_assert(R == 1 || R == 4, "1 or 4 rows");
  const int64_t rb = a.Kp / 4, nb = a.Kp / kBlock;
  const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0C);
  const __m512i m2 = _mm512_set1_epi8(0x30), m3 = _mm512_set1_epi8(static_cast<char>(0xC0));
  const uint8_t* w = a.w + i * rb;
  // row r, step s -> accumulator S<s>_<r>; named registers, not arrays (GCC spills arrays of vectors)
  __m512i S0_0 = _mm512_setzero_si512(), S1_0 = S0_0, S2_0 = S0_0, S3_0 = S0_0, S0_1 = S0_0, S1_1 = S0_0;
  __m512i S2_1 = S0_0, S3_1 = S0_0, S0_2 = S0_0, S1_2 = S0_0, S2_2 = S0_0, S3_2 = S0_0, S0_3 = S0_0;
  __m512i S1_3 = S0_0, S2_3 = S0_0, S3_3 = S0_0;
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* xb = a.x + b * kBlock;
    const __m512i x0 = _mm512_loadu_si512(xb), x1 = _mm512_loadu_si512(xb + 64);
    const __m512i x2 = _mm512_loadu_si512(xb + 128), x3 = _mm512_loadu_si512(xb + 192);
#define QT_TERNARY_ROW(r)                                                          \
  {                                                                                \
    const __m512i p = _mm512_loadu_si512(w + (r) * rb + b * kBlockBytes);          \
    S0_##r = _mm512_dpbusd_epi32(S0_##r, _mm512_and_si512(p, m0), x0);             \
    S1_##r = _mm512_dpbusd_epi32(S1_##r, _mm512_and_si512(p, m1), x1);             \
    S2_##r = _mm512_dpbusd_epi32(S2_##r, _mm512_and_si512(p, m2), x2);             \
    S3_##r = _mm512_dpbusd_epi32(S3_##r, _mm512_and_si512(p, m3), x3);             \
  }
    QT_TERNARY_ROW(0)
    if constexpr (R == 4) {
      QT_TERNARY_ROW(1)
      QT_TERNARY_ROW(2)
      QT_TERNARY_ROW(3)
    }
#undef QT_TERNARY_ROW
  }
  const __m512i acc[4] = {combine_steps(S0_0, S1_0, S2_0, S3_0), combine_steps(S0_1, S1_1, S2_1, S3_1),
                          combine_steps(S0_2, S1_2, S2_2, S3_2), combine_steps(S0_3, S1_3, S2_3, S3_3)};
  reduce_store_512<R>(a, 0, i, acc);
}

// Several tokens (prefill): R rows are unpacked once into `u` (R x Kp digits, L1-resident) and
// every T-token tile of the input reuses them: R x T accumulators, R + 1 loads per 64 x R x T MACs.
template <int R, int T>
QT_AVX512 void micro_vnni(const TernaryArgs& a, const uint8_t* u, int64_t t0, int64_t i) {
  const int64_t Kp = a.Kp;
  const int8_t* x = a.x + t0 * Kp;
  __m512i acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_si512();
  for (int64_t k = 0; k < Kp; k += 64) {
    __m512i ur[R];
    for (int r = 0; r < R; ++r) ur[r] = _mm512_loadu_si512(u + r * Kp + k);
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      const __m512i xt = _mm512_loadu_si512(x + t * Kp + k);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[t][r] = _mm512_dpbusd_epi32(acc[t][r], ur[r], xt);
    }
  }
  for (int t = 0; t < T; ++t) reduce_store_512<R>(a, t0 + t, i, acc[t]);
}

template <int R>
QT_AVX512 void gemm_rows_vnni(const TernaryArgs& a, const uint8_t* u, int64_t i) {
  int64_t t = 0;
  for (; t + 4 <= a.M; t += 4) micro_vnni<R, 4>(a, u, t, i);
  switch (a.M - t) {
    case 3: micro_vnni<R, 3>(a, u, t, i); break;
    case 2: micro_vnni<R, 2>(a, u, t, i); break;
    case 1: micro_vnni<R, 1>(a, u, t, i); break;
    default: break;
  }
}

QT_AVX512 void unpack_rows_512(const TernaryArgs& a, int64_t i, int rows, uint8_t* u) {
  const int64_t rb = a.Kp / 4, nb = a.Kp / kBlock;
  const __m512i m3 = _mm512_set1_epi8(3);
  for (int r = 0; r < rows; ++r) {
    const uint8_t* w = a.w + (i + r) * rb;
    uint8_t* ur = u + r * a.Kp;
    for (int64_t b = 0; b < nb; ++b) {
      const __m512i p = _mm512_loadu_si512(w + b * kBlockBytes);
      for (int s = 0; s < 4; ++s)
        _mm512_storeu_si512(ur + b * kBlock + 64 * s, _mm512_and_si512(_mm512_srli_epi16(p, 2 * s), m3));
    }
  }
}

QT_AVX512 void ternary_rows_vnni(const TernaryArgs& a, int64_t r0, int64_t r1) {
  if (a.M == 1) {
    int64_t i = r0;
    for (; i + 4 <= r1; i += 4) gemv_rows_vnni<4>(a, i);
    for (; i < r1; ++i) gemv_rows_vnni<1>(a, i);
    return;
  }
  std::vector<uint8_t> u(4 * a.Kp);
  for (int64_t i = r0; i < r1; i += 4) {
    const int rows = static_cast<int>(std::min<int64_t>(4, r1 - i));
    unpack_rows_512(a, i, rows, u.data());
    switch (rows) {
      case 4: gemm_rows_vnni<4>(a, u.data(), i); break;
      case 3: gemm_rows_vnni<3>(a, u.data(), i); break;
      case 2: gemm_rows_vnni<2>(a, u.data(), i); break;
      default: gemm_rows_vnni<1>(a, u.data(), i); break;
    }
  }
}

// ---- AVX2 (vpmaddubsw into int16, widened every 64 steps)

QT_AVX2 inline int32_t hsum_madd_256(__m256i acc16) {
  const __m256i v = _mm256_madd_epi16(acc16, _mm256_set1_epi16(1));
  const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i s2 = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xB1)));
}

template <int R>
QT_AVX2 void gemv_rows_avx2(const TernaryArgs& a, int64_t i) {
  const int64_t rb = a.Kp / 4, nb = a.Kp / kBlock;
  const __m256i m3 = _mm256_set1_epi8(3);
  const uint8_t* w = a.w + i * rb;
  int32_t total[R] = {};
  for (int64_t b0 = 0; b0 < nb; b0 += 8) {  // 8 blocks x 2 halves x 4 steps = 64 int16 additions
    __m256i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
    for (int64_t b = b0; b < std::min(nb, b0 + 8); ++b) {
      for (int h = 0; h < 2; ++h) {
        __m256i p[R];
        for (int r = 0; r < R; ++r)
          p[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * rb + b * kBlockBytes + 32 * h));
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s) {
          const __m256i xs =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.x + b * kBlock + 64 * s + 32 * h));
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            const __m256i ur = _mm256_and_si256(_mm256_srli_epi16(p[r], 2 * s), m3);
            acc[r] = _mm256_add_epi16(acc[r], _mm256_maddubs_epi16(ur, xs));
          }
        }
      }
    }
    for (int r = 0; r < R; ++r) total[r] += hsum_madd_256(acc[r]);
  }
  for (int r = 0; r < R; ++r) store_out(a, 0, i + r, total[r]);
}

template <int R, int T>
QT_AVX2 void micro_avx2(const TernaryArgs& a, const uint8_t* u, int64_t t0, int64_t i) {
  const int64_t Kp = a.Kp;
  const int8_t* x = a.x + t0 * Kp;
  int32_t total[T][R] = {};
  for (int64_t k0 = 0; k0 < Kp; k0 += 64 * 32) {  // 64 steps of 32 columns per int16 accumulator
    __m256i acc[T][R];
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_si256();
    for (int64_t k = k0; k < std::min(Kp, k0 + 64 * 32); k += 32) {
      __m256i ur[R];
      for (int r = 0; r < R; ++r) ur[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + r * Kp + k));
#pragma GCC unroll 2
      for (int t = 0; t < T; ++t) {
        const __m256i xt = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + t * Kp + k));
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) acc[t][r] = _mm256_add_epi16(acc[t][r], _mm256_maddubs_epi16(ur[r], xt));
      }
    }
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r) total[t][r] += hsum_madd_256(acc[t][r]);
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) store_out(a, t0 + t, i + r, total[t][r]);
}

template <int R>
QT_AVX2 void gemm_rows_avx2(const TernaryArgs& a, const uint8_t* u, int64_t i) {
  int64_t t = 0;
  for (; t + 2 <= a.M; t += 2) micro_avx2<R, 2>(a, u, t, i);
  if (t < a.M) micro_avx2<R, 1>(a, u, t, i);
}

QT_AVX2 void unpack_rows_256(const TernaryArgs& a, int64_t i, int rows, uint8_t* u) {
  const int64_t rb = a.Kp / 4, nb = a.Kp / kBlock;
  const __m256i m3 = _mm256_set1_epi8(3);
  for (int r = 0; r < rows; ++r) {
    const uint8_t* w = a.w + (i + r) * rb;
    uint8_t* ur = u + r * a.Kp;
    for (int64_t b = 0; b < nb; ++b)
      for (int h = 0; h < 2; ++h) {
        const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * kBlockBytes + 32 * h));
        for (int s = 0; s < 4; ++s)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(ur + b * kBlock + 64 * s + 32 * h),
                              _mm256_and_si256(_mm256_srli_epi16(p, 2 * s), m3));
      }
  }
}

QT_AVX2 void ternary_rows_avx2(const TernaryArgs& a, int64_t r0, int64_t r1) {
  if (a.M == 1) {
    int64_t i = r0;
    for (; i + 4 <= r1; i += 4) gemv_rows_avx2<4>(a, i);
    for (; i < r1; ++i) gemv_rows_avx2<1>(a, i);
    return;
  }
  std::vector<uint8_t> u(4 * a.Kp);
  for (int64_t i = r0; i < r1; i += 4) {
    const int rows = static_cast<int>(std::min<int64_t>(4, r1 - i));
    unpack_rows_256(a, i, rows, u.data());
    switch (rows) {
      case 4: gemm_rows_avx2<4>(a, u.data(), i); break;
      case 3: gemm_rows_avx2<3>(a, u.data(), i); break;
      case 2: gemm_rows_avx2<2>(a, u.data(), i); break;
      default: gemm_rows_avx2<1>(a, u.data(), i); break;
    }
  }
}

// Rows are split among threads in tiles of 4; small products stay on one thread.
void run_ternary(const TernaryArgs& a, int64_t isa) {
  const int64_t tiles = (a.N + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / (4 * a.Kp * a.M));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    const int64_t r0 = t0 * 4, r1 = std::min(a.N, t1 * 4);
    if (isa == kAvx512Vnni)
      ternary_rows_vnni(a, r0, r1);
    else
      ternary_rows_avx2(a, r0, r1);
  });
}

// ------------------------------------------------------------ INT8 weights, float activations

// Streaming a large int8 matrix past the caches. In decode, a weight matrix at least kStreamBytes
// large (the LM head of a 30k vocabulary: 23 MB) may be read with non-temporal prefetches: its lines
// then bypass the L2 -> L3 victim path and do not evict the other weights (the ternary blocks, 21 MB
// at 132M) from the last-level cache. That pays only where the cache cannot hold a token's weights
// anyway (measured on an EPYC with a 32 MB L3: 330 -> 410 tokens/s for ternarylm-132m). Where it can,
// it costs: the head then comes from DRAM on every token instead of from the L3 (a Xeon with a 480 MB
// L3: 7 GB/s instead of 23 GB/s from one core, 3.3 ms instead of 1.0 ms per token for that head).
constexpr int64_t kStreamBytes = int64_t{8} << 20;

// The last-level cache's size (sysconf; QTOOLKIT_LLC_BYTES overrides it, e.g. to compare both modes).
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    if (const char* env = std::getenv("QTOOLKIT_LLC_BYTES")) return static_cast<int64_t>(std::atoll(env));
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return static_cast<int64_t>(l3 > 0 ? l3 : (l2 > 0 ? l2 : 0));
  }();
  return bytes;
}

// Whether a matrix of `bytes` is streamed past the caches when a token reads `token_bytes` in all.
bool stream_past_cache(int64_t bytes, int64_t token_bytes) {
  return bytes >= kStreamBytes && token_bytes > last_level_cache_bytes();
}

struct Int8Args {
  const int8_t* w;  // (N, K)
  int64_t N, K, M;
  const float* x;       // (M, K)
  const float* scale;   // (N,)
  float* out;           // (M, N)
  bool stream = false;  // one token: read w with non-temporal prefetches (stream_past_cache)
};

template <int R>
QT_AVX512 void w8_rows_avx512(const Int8Args& a, int64_t i, float* wf) {
  // R rows widened to fp32 once (wf: R x K), then every token reads them from L1/L2.
  const int64_t K = a.K;
  for (int r = 0; r < R; ++r) {
    const int8_t* w = a.w + (i + r) * K;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
      _mm512_storeu_ps(wf + r * K + k, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                           _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)))));
    for (; k < K; ++k) wf[r * K + k] = static_cast<float>(w[k]);
  }
  const __mmask16 tail = static_cast<__mmask16>((1u << (K % 16)) - 1u);
  for (int64_t t = 0; t < a.M; ++t) {
    const float* x = a.x + t * K;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m512 xv = _mm512_loadu_ps(x + k);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(wf + r * K + k), xv, acc[r]);
    }
    if (k < K) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + k);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, wf + r * K + k), xv, acc[r]);
    }
    for (int r = 0; r < R; ++r) a.out[t * a.N + i + r] = _mm512_reduce_add_ps(acc[r]) * a.scale[i + r];
  }
}

QT_AVX512 void w8_rows_range_avx512(const Int8Args& a, int64_t r0, int64_t r1) {
  int64_t i = r0;  // several tokens (one token on AVX-512 VNNI: w8_gemv_vnni_rows)
  std::vector<float> wf(4 * a.K);
  for (; i + 4 <= r1; i += 4) w8_rows_avx512<4>(a, i, wf.data());
  for (; i < r1; ++i) w8_rows_avx512<1>(a, i, wf.data());
}

// ---- one token through INT8 weights on AVX-512 VNNI, exactly (to float rounding) the float product
//
// Widening int8 weights to fp32 costs 3-4 instructions per 16 weights, which for the 23 MB LM head is
// more work than all the ternary layers together. Instead the float input is written as three byte
// planes and multiplied by the int8 rows with vpdpbusd (64 products per instruction), exactly:
//
//   t_j = x_j * s,  s = 127 / amax (as the activation codes)     t_j = a_j + b_j / 256 + c_j / 65536 + e_j
//   a_j = floor(t_j) in [-128, 127] (stored + 128 as u8)         b_j = floor(256 (t_j - a_j)) in [0, 255]
//   c_j = min(255, rint(65536 (t_j - a_j) - 256 b_j))            |e_j| <= 2^-16 (the only approximation)
//
// The subtractions and the scalings by 256 are exact in fp32, so x_j is represented to ~24 bits, as
// well as fp32 holds it. Per row: A = sum (a_j + 128) w_j, B = sum b_j w_j, Cc = sum c_j w_j (int32,
// exact), W = sum w_j, and y = scale_i / s * ((A - 128 W) + B / 256 + Cc / 65536), the bracket exact in
// int64 and the product in double, rounded once to fp32. The fp32 weight-only path sums in another
// order; the two agree to float rounding (the tests' tolerance for the head, rtol 1e-5).

QT_AVX512 void w8_planes_avx512(const float* x, int64_t K, int64_t Kp, uint8_t* planes, float* s_out) {
  // planes: 3 x Kp bytes (a + 128, b, c), Kp = K rounded up to 64; bytes beyond K are 0 (the weights
  // there are masked to 0 anyway)
  __m512 vmax = _mm512_setzero_ps();
  for (int64_t j = 0; j < K; j += 16) {
    const __mmask16 m = K - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - j)) - 1u);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + j)));
  }
  const float s = token_scale(_mm512_reduce_max_ps(vmax));
  const __m512 vs = _mm512_set1_ps(s), k256 = _mm512_set1_ps(256.0f);
  const __m512 lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f), c255 = _mm512_set1_ps(255.0f);
  for (int64_t j = 0; j < Kp; j += 16) {
    const __mmask16 m = j >= K ? 0 : (K - j >= 16 ? static_cast<__mmask16>(0xFFFF)
                                                   : static_cast<__mmask16>((1u << (K - j)) - 1u));
    const __m512 t = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + j), vs);
    const __m512 fa = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 u = _mm512_mul_ps(_mm512_sub_ps(t, fa), k256);
    const __m512 fb = _mm512_roundscale_ps(u, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 v = _mm512_mul_ps(_mm512_sub_ps(u, fb), k256);
    const __m512 fc = _mm512_min_ps(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), c255);
    const __m512i a = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(fa, lo), hi)), _mm512_set1_epi32(128));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(planes + j), _mm512_cvtepi32_epi8(_mm512_maskz_mov_epi32(m, a)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(planes + Kp + j), _mm512_cvtepi32_epi8(_mm512_maskz_cvtps_epi32(m, fb)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(planes + 2 * Kp + j), _mm512_cvtepi32_epi8(_mm512_maskz_cvtps_epi32(m, fc)));
  }
  *s_out = s;
}

inline float w8_vnni_out(int32_t A, int32_t B, int32_t Cc, int32_t W, float scale, float s) {
  const int64_t t = (static_cast<int64_t>(A) - 128 * static_cast<int64_t>(W)) * 65536 + static_cast<int64_t>(B) * 256 + Cc;
  return static_cast<float>(static_cast<double>(t) * (static_cast<double>(scale) / (static_cast<double>(s) * 65536.0)));
}

// R = 1 or 4 rows of one token; `wsum` (N,) row sums of the codes, or (Sums) computed here with one
// more vpdpbusd against ones. The accumulators are named registers, not arrays: with arrays GCC kept
// a stack copy of each, one 64-byte store per vpdpbusd, and those stores (stuck behind the loads
// that miss the cache) filled the store buffer and stalled the core, which then kept too few of the
// head's 23 MB of loads in flight (7 GB/s from one core against 29 GB/s for a plain read).
template <int R, bool Sums, bool Stream>
QT_AVX512 void w8_gemv_vnni_rows(const Int8Args& a, int64_t i, const uint8_t* planes, int64_t Kp, float s,
                                 const int32_t* wsum) {
  static_assert(R == 1 || R == 4, "1 or 4 rows");
  const int64_t K = a.K;
  const int8_t* w = a.w + i * K;
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i A0 = _mm512_setzero_si512(), B0 = A0, C0 = A0, W0 = A0, A1 = A0, B1 = A0, C1 = A0, W1 = A0;
  __m512i A2 = A0, B2 = A0, C2 = A0, W2 = A0, A3 = A0, B3 = A0, C3 = A0, W3 = A0;
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 m = K - k >= 64 ? ~__mmask64{0} : (__mmask64{1} << (K - k)) - 1;
    const __m512i pa = _mm512_loadu_si512(planes + k), pb = _mm512_loadu_si512(planes + Kp + k);
    const __m512i pc = _mm512_loadu_si512(planes + 2 * Kp + k);
    if constexpr (Stream)  // 8 rows ahead: the 4-row tile after next
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (r + 8) * K + k), _MM_HINT_NTA);
#define QT_W8_ROW(r)                                                    \
  {                                                                     \
    const __m512i x = _mm512_maskz_loadu_epi8(m, w + (r) * K + k);      \
    A##r = _mm512_dpbusd_epi32(A##r, pa, x);                            \
    B##r = _mm512_dpbusd_epi32(B##r, pb, x);                            \
    C##r = _mm512_dpbusd_epi32(C##r, pc, x);                            \
    if constexpr (Sums) W##r = _mm512_dpbusd_epi32(W##r, ones, x);      \
  }
    QT_W8_ROW(0)
    if constexpr (R == 4) {
      QT_W8_ROW(1)
      QT_W8_ROW(2)
      QT_W8_ROW(3)
    }
#undef QT_W8_ROW
  }
  if constexpr (R == 4) {  // the 12 (16) horizontal sums four at a time (integers: any order is exact)
    alignas(16) int32_t sa[4], sb[4], sc[4], sw[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(sa), hsum4_512(A0, A1, A2, A3));
    _mm_store_si128(reinterpret_cast<__m128i*>(sb), hsum4_512(B0, B1, B2, B3));
    _mm_store_si128(reinterpret_cast<__m128i*>(sc), hsum4_512(C0, C1, C2, C3));
    if constexpr (Sums) _mm_store_si128(reinterpret_cast<__m128i*>(sw), hsum4_512(W0, W1, W2, W3));
    for (int r = 0; r < 4; ++r)
      a.out[i + r] = w8_vnni_out(sa[r], sb[r], sc[r], Sums ? sw[r] : wsum[i + r], a.scale[i + r], s);
  } else {
    const int32_t wr = Sums ? _mm512_reduce_add_epi32(W0) : wsum[i];
    a.out[i] = w8_vnni_out(_mm512_reduce_add_epi32(A0), _mm512_reduce_add_epi32(B0), _mm512_reduce_add_epi32(C0), wr,
                           a.scale[i], s);
  }
}

template <bool Sums, bool Stream>
QT_AVX512 void w8_gemv_range_vnni_t(const Int8Args& a, int64_t r0, int64_t r1, const uint8_t* planes, int64_t Kp,
                                    float s, const int32_t* wsum) {
  int64_t i = r0;
  for (; i + 4 <= r1 && i + 12 <= a.N; i += 4) w8_gemv_vnni_rows<4, Sums, Stream>(a, i, planes, Kp, s, wsum);
  for (; i + 4 <= r1; i += 4) w8_gemv_vnni_rows<4, Sums, false>(a, i, planes, Kp, s, wsum);  // no prefetch past N
  for (; i < r1; ++i) w8_gemv_vnni_rows<1, Sums, false>(a, i, planes, Kp, s, wsum);
}

QT_AVX512 void w8_gemv_range_vnni(const Int8Args& a, int64_t r0, int64_t r1, const uint8_t* planes, int64_t Kp,
                                  float s, const int32_t* wsum) {
  if (wsum)
    a.stream ? w8_gemv_range_vnni_t<false, true>(a, r0, r1, planes, Kp, s, wsum)
             : w8_gemv_range_vnni_t<false, false>(a, r0, r1, planes, Kp, s, wsum);
  else
    a.stream ? w8_gemv_range_vnni_t<true, true>(a, r0, r1, planes, Kp, s, wsum)
             : w8_gemv_range_vnni_t<true, false>(a, r0, r1, planes, Kp, s, wsum);
}

// Row sums of int8 codes (N, K), for w8_gemv_vnni_rows.
std::vector<int32_t> int8_row_sums(const int8_t* w, int64_t N, int64_t K) {
  std::vector<int32_t> out(N);
  for (int64_t i = 0; i < N; ++i) {
    int32_t t = 0;
    for (int64_t k = 0; k < K; ++k) t += w[i * K + k];
    out[i] = t;
  }
  return out;
}

QT_AVX2 inline float hsum_ps_256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int R>
QT_AVX2 void w8_rows_avx2(const Int8Args& a, int64_t i, float* wf) {
  const int64_t K = a.K;
  for (int r = 0; r < R; ++r) {
    const int8_t* w = a.w + (i + r) * K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)
      _mm256_storeu_ps(wf + r * K + k, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                           _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k)))));
    for (; k < K; ++k) wf[r * K + k] = static_cast<float>(w[k]);
  }
  for (int64_t t = 0; t < a.M; ++t) {
    const float* x = a.x + t * K;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 xv = _mm256_loadu_ps(x + k);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(wf + r * K + k), xv, acc[r]);
    }
    for (int r = 0; r < R; ++r) {
      float sum = hsum_ps_256(acc[r]);
      for (int64_t j = k; j < K; ++j) sum += x[j] * wf[r * K + j];
      a.out[t * a.N + i + r] = sum * a.scale[i + r];
    }
  }
}

QT_AVX2 void w8_rows_range_avx2(const Int8Args& a, int64_t r0, int64_t r1) {
  std::vector<float> wf(4 * a.K);
  int64_t i = r0;
  for (; i + 4 <= r1; i += 4) w8_rows_avx2<4>(a, i, wf.data());
  for (; i < r1; ++i) w8_rows_avx2<1>(a, i, wf.data());
}

void run_int8(const Int8Args& a, int64_t isa) {
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / (a.K * a.M));
  if (a.M == 1 && isa == kAvx512Vnni) {  // one token: byte planes and vpdpbusd (w8_gemv_vnni_rows)
    const int64_t Kp = (a.K + 63) / 64 * 64;
    std::vector<uint8_t> planes(3 * Kp);
    float s = 0.f;
    w8_planes_avx512(a.x, a.K, Kp, planes.data(), &s);
    at::parallel_for(0, a.N, grain, [&](int64_t r0, int64_t r1) {
      w8_gemv_range_vnni(a, r0, r1, planes.data(), Kp, s, nullptr);
    });
    return;
  }
  at::parallel_for(0, a.N, grain, [&](int64_t r0, int64_t r1) {
    if (isa == kAvx512Vnni)
      w8_rows_range_avx512(a, r0, r1);
    else
      w8_rows_range_avx2(a, r0, r1);
  });
}

// ------------------------------------------------------- attention over the KV cache, SwiGLU
//
// The non-linear parts of a decoder block as single calls, so a decode step is a handful of ops
// instead of ~25 small tensor ops per block. Float math follows the PyTorch ops they replace
// (`apply_rope`'s formula exactly; exp by a Cephes polynomial, ~1 ulp), so results differ from the
// PyTorch path by float rounding only.

QT_AVX2 inline __m256 exp256(__m256 x) {  // Cephes expf, as in avx_mathfun
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(0.693359375f)));
  x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(-2.12194440e-4f)));
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

QT_AVX2 inline float dot256(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum_ps_256(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

QT_AVX2 inline void axpy256(float alpha, const float* x, float* y, int64_t n) {  // y += alpha * x
  const __m256 va = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// p[j] <- exp(p[j] - m) for j < n; returns their sum.
QT_AVX2 inline float softmax_exp(float* p, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 vsum = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + j), vm));
    _mm256_storeu_ps(p + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum_ps_256(vsum);
  for (; j < n; ++j) {
    p[j] = std::exp(p[j] - m);
    sum += p[j];
  }
  return sum;
}

// Attention of T rotated queries (qd, T x hd) over cache positions 0 .. pos + t, one head. V = hd / 8:
// the query and the output stay in 2V registers, so each key costs V FMAs for the score and V for
// the output, with no stores in between.
template <int V>
QT_AVX2 void attend_queries(const float* qd, int64_t T, int64_t pos, const float* kc, const float* vc, float scale,
                            float* y, int64_t ystride, float* p) {
  constexpr int64_t hd = 8 * V;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t n = pos + t + 1;
    __m256 q[V];
    for (int v = 0; v < V; ++v) q[v] = _mm256_loadu_ps(qd + t * hd + 8 * v);
    float m = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
      const float* k = kc + j * hd;
      __m256 a0 = _mm256_mul_ps(q[0], _mm256_loadu_ps(k));
      __m256 a1 = V > 1 ? _mm256_mul_ps(q[V > 1 ? 1 : 0], _mm256_loadu_ps(k + 8)) : _mm256_setzero_ps();
#pragma GCC unroll 16
      for (int v = 2; v < V; v += 2) {
        a0 = _mm256_fmadd_ps(q[v], _mm256_loadu_ps(k + 8 * v), a0);
        if (v + 1 < V) a1 = _mm256_fmadd_ps(q[v + 1], _mm256_loadu_ps(k + 8 * v + 8), a1);
      }
      p[j] = hsum_ps_256(_mm256_add_ps(a0, a1)) * scale;
      m = p[j] > m ? p[j] : m;
    }
    const float sum = softmax_exp(p, n, m);
    __m256 o[V];
    for (int v = 0; v < V; ++v) o[v] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const __m256 pj = _mm256_set1_ps(p[j]);
      const float* vv = vc + j * hd;
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v) o[v] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vv + 8 * v), o[v]);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / sum);
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(y + t * ystride + 8 * v, _mm256_mul_ps(o[v], inv));
  }
}

// Any head size: the same computation with the output accumulated in memory.
QT_AVX2 void attend_queries_any(const float* qd, int64_t T, int64_t pos, const float* kc, const float* vc,
                                int64_t hd, float scale, float* y, int64_t ystride, float* p) {
  for (int64_t t = 0; t < T; ++t) {
    const int64_t n = pos + t + 1;
    float m = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
      p[j] = dot256(qd + t * hd, kc + j * hd, hd) * scale;
      m = p[j] > m ? p[j] : m;
    }
    const float sum = softmax_exp(p, n, m);
    float* out = y + t * ystride;
    std::fill(out, out + hd, 0.0f);
    for (int64_t j = 0; j < n; ++j) axpy256(p[j], vc + j * hd, out, hd);
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < hd; ++i) out[i] *= inv;
  }
}

// One (batch row, k/v head g) with its r query heads h = g*r .. g*r + r - 1 (r = 1 without grouped-query
// attention): rotate k of tokens pos .. pos+T-1 (RoPE) and store k and v in head g's cache, then for each
// query head rotate q and attend: token t sees cache positions 0 .. pos + t.
QT_AVX2 void attend_group(const float* qkv, int64_t T, int64_t C, int64_t Ckv, int64_t hd, int64_t g, int64_t r,
                          float* kc, float* vc, const float* cos, const float* sin, int64_t half, int64_t pos,
                          float scale, float* y, std::vector<float>& qrot, std::vector<float>& p) {
  const int64_t row_len = C + 2 * Ckv;  // (T, C + 2 Ckv) rows: [q | k | v], head h at columns h * hd
  for (int64_t t = 0; t < T; ++t) {
    const float* row = qkv + t * row_len;
    const float* cs = cos + (pos + t) * half;
    const float* sn = sin + (pos + t) * half;
    const float* k = row + C + g * hd;
    float* kd = kc + (pos + t) * hd;
    for (int64_t i = 0; i < half; ++i) {  // apply_rope: (x1 cos - x2 sin, x1 sin + x2 cos)
      kd[i] = k[i] * cs[i] - k[i + half] * sn[i];
      kd[i + half] = k[i] * sn[i] + k[i + half] * cs[i];
    }
    std::copy(row + C + Ckv + g * hd, row + C + Ckv + (g + 1) * hd, vc + (pos + t) * hd);
  }
  for (int64_t h = g * r; h < (g + 1) * r; ++h) {
    for (int64_t t = 0; t < T; ++t) {
      const float* q = qkv + t * row_len + h * hd;
      const float* cs = cos + (pos + t) * half;
      const float* sn = sin + (pos + t) * half;
      float* qd = qrot.data() + t * hd;
      for (int64_t i = 0; i < half; ++i) {
        qd[i] = q[i] * cs[i] - q[i + half] * sn[i];
        qd[i + half] = q[i] * sn[i] + q[i + half] * cs[i];
      }
    }
    float* out = y + h * hd;
    switch (hd) {
      case 16: attend_queries<2>(qrot.data(), T, pos, kc, vc, scale, out, C, p.data()); break;
      case 32: attend_queries<4>(qrot.data(), T, pos, kc, vc, scale, out, C, p.data()); break;
      case 64: attend_queries<8>(qrot.data(), T, pos, kc, vc, scale, out, C, p.data()); break;
      case 128: attend_queries<16>(qrot.data(), T, pos, kc, vc, scale, out, C, p.data()); break;
      default: attend_queries_any(qrot.data(), T, pos, kc, vc, hd, scale, out, C, p.data()); break;
    }
  }
}

// o = silu(g) * u = g / (1 + exp(-g)) * u over n elements. Element i's result depends on whether it falls
// in the 8-wide part or the tail, so a caller splitting a row starts every piece at a multiple of 8.
QT_AVX2 void silu_mul_span(const float* g, const float* u, int64_t n, float* o) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 sv = _mm256_div_ps(gv, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
    _mm256_storeu_ps(o + i, _mm256_mul_ps(sv, _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

QT_AVX2 void silu_mul_rows(const float* gu, int64_t M, int64_t F, float* out) {
  // each row of gu is [g (F) | u (F)]
  for (int64_t m = 0; m < M; ++m) silu_mul_span(gu + m * 2 * F, gu + m * 2 * F + F, F, out + m * F);
}

// ----------------------------------------------------------------------------------- torch ops

void check_2d(const at::Tensor& t, at::ScalarType dtype, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == dtype && t.is_contiguous(), what, " must be a contiguous 2-D ",
              c10::toString(dtype), " tensor");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_activations(const at::Tensor& x, int64_t Kp, int64_t isa) {
  RECORD_FUNCTION("qtoolkit::quantize_activations", std::vector<c10::IValue>());
  isa = checked_isa(isa);
  check_2d(x, at::kFloat, "x");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(Kp >= K && Kp % kBlock == 0, "Kp must be a multiple of 256 and >= K");
  at::Tensor q = at::empty({M, Kp}, x.options().dtype(at::kChar));
  at::Tensor s = at::empty({M}, x.options());
  at::Tensor sum = at::empty({M}, x.options().dtype(at::kInt));
  quantize_rows(x.data_ptr<float>(), M, K, Kp, q.data_ptr<int8_t>(), s.data_ptr<float>(), sum.data_ptr<int32_t>(), isa);
  return {q, s, sum};
}

void check_packed(const at::Tensor& w) {
  check_2d(w, at::kByte, "packed weight");
  TORCH_CHECK(w.size(1) % kBlockBytes == 0, "packed weight rows must be a multiple of 64 bytes");
}

at::Tensor ternary_matmul_int(const at::Tensor& q, const at::Tensor& qsum, const at::Tensor& w, int64_t isa) {
  RECORD_FUNCTION("qtoolkit::ternary_matmul_int", std::vector<c10::IValue>());
  isa = checked_isa(isa);
  check_2d(q, at::kChar, "activation codes");
  check_packed(w);
  TORCH_CHECK(q.size(1) == w.size(1) * 4, "activation codes must have Kp = 4 * packed row bytes columns");
  TORCH_CHECK(qsum.dim() == 1 && qsum.size(0) == q.size(0) && qsum.scalar_type() == at::kInt && qsum.is_contiguous(),
              "code sums must be a contiguous int32 vector, one per token");
  const int64_t M = q.size(0), N = w.size(0);
  at::Tensor out = at::empty({M, N}, q.options().dtype(at::kInt));
  if (M == 0 || N == 0) return out;
  TernaryArgs a{w.data_ptr<uint8_t>(), N, w.size(1) * 4, M, q.data_ptr<int8_t>(), qsum.data_ptr<int32_t>(),
                out.data_ptr<int32_t>(), nullptr, nullptr, nullptr};
  run_ternary(a, isa);
  return out;
}

at::Tensor ternary_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& gamma, int64_t isa) {
  RECORD_FUNCTION("qtoolkit::ternary_linear", std::vector<c10::IValue>());
  isa = checked_isa(isa);
  check_2d(x, at::kFloat, "x");
  check_packed(w);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), Kp = w.size(1) * 4;
  TORCH_CHECK(K <= Kp, "x has more columns than the packed weight");
  TORCH_CHECK(gamma.dim() == 1 && gamma.size(0) == N && gamma.scalar_type() == at::kFloat && gamma.is_contiguous(),
              "gamma must be a contiguous float32 vector, one per output row");
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  std::vector<int8_t> q(M * Kp);
  std::vector<float> s(M);
  std::vector<int32_t> qsum(M);
  quantize_rows(x.data_ptr<float>(), M, K, Kp, q.data(), s.data(), qsum.data(), isa);
  TernaryArgs a{w.data_ptr<uint8_t>(), N, Kp, M, q.data(), qsum.data(), nullptr, out.data_ptr<float>(),
                gamma.data_ptr<float>(), s.data()};
  run_ternary(a, isa);
  return out;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, int64_t isa) {
  RECORD_FUNCTION("qtoolkit::int8_linear", std::vector<c10::IValue>());
  isa = checked_isa(isa);
  check_2d(x, at::kFloat, "x");
  check_2d(w, at::kChar, "int8 weight");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "x and the int8 weight disagree on the number of inputs");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == N && scale.scalar_type() == at::kFloat && scale.is_contiguous(),
              "scale must be a contiguous float32 vector, one per output row");
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  Int8Args a{w.data_ptr<int8_t>(), N, K, M, x.data_ptr<float>(), scale.data_ptr<float>(), out.data_ptr<float>()};
  // one layer alone does not know the model: assume the rest of a token's weights are as large as it
  // (the head of ternarylm-132m: 23 MB, its ternary blocks: 21 MB)
  a.stream = M == 1 && stream_past_cache(N * K, 2 * N * K);
  run_int8(a, isa);
  return out;
}

at::Tensor attention_step(const at::Tensor& qkv, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& cos, const at::Tensor& sin, int64_t pos, int64_t n_heads) {
  // qkv (B*T, C + 2 Ckv) fused projections, C = n_heads * hd, Ckv = n_kv_heads * hd; caches
  // (B, n_kv_heads, max_len, hd) of one layer; cos/sin (max_seq_len, hd/2) RoPE tables. Writes
  // positions pos..pos+T-1 of the caches; returns (B*T, C). Query head h reads k/v head h / r,
  // r = n_heads / n_kv_heads (grouped-query attention; r = 1 is plain multi-head attention).
  RECORD_FUNCTION("qtoolkit::attention_step", std::vector<c10::IValue>());
  checked_isa(kAvx2);
  check_2d(qkv, at::kFloat, "qkv");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.scalar_type() == at::kFloat && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.scalar_type() == at::kFloat,
              "caches must be contiguous float32 (B, n_kv_heads, max_len, head_dim) tensors");
  const int64_t B = k_cache.size(0), nkv = k_cache.size(1), L = k_cache.size(2), hd = k_cache.size(3);
  TORCH_CHECK(n_heads >= nkv && nkv > 0 && n_heads % nkv == 0, "n_heads must be a multiple of the caches' heads");
  const int64_t r = n_heads / nkv, C = n_heads * hd, Ckv = nkv * hd, half = hd / 2;
  const int64_t T = qkv.size(0) / std::max<int64_t>(B, 1);
  TORCH_CHECK(qkv.size(1) == C + 2 * Ckv && qkv.size(0) == B * T && hd % 2 == 0,
              "qkv, caches and n_heads disagree");
  TORCH_CHECK(pos >= 0 && pos + T <= L, "positions beyond the cache");
  check_2d(cos, at::kFloat, "cos");
  check_2d(sin, at::kFloat, "sin");
  TORCH_CHECK(cos.size(1) == half && sin.size(1) == half && cos.size(0) >= pos + T && sin.size(0) >= pos + T,
              "RoPE tables too short");
  at::Tensor y = at::empty({B * T, C}, qkv.options());
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  const float *q = qkv.data_ptr<float>(), *cs = cos.data_ptr<float>(), *sn = sin.data_ptr<float>();
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>(), *out = y.data_ptr<float>();
  // One task per (batch row, k/v head): it writes that head's cache and then reads it, so no task
  // reads a cache another task writes.
  const int64_t work = r * T * (pos + T) * hd;
  at::parallel_for(0, B * nkv, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, work)), [&](int64_t b0, int64_t b1) {
    std::vector<float> qrot(T * hd), p(pos + T);
    for (int64_t bg = b0; bg < b1; ++bg) {
      const int64_t b = bg / nkv, g = bg % nkv;
      attend_group(q + b * T * (C + 2 * Ckv), T, C, Ckv, hd, g, r, kc + bg * L * hd, vc + bg * L * hd, cs, sn, half,
                   pos, scale, out + b * T * C, qrot, p);
    }
  });
  return y;
}

at::Tensor silu_mul(const at::Tensor& gu) {
  RECORD_FUNCTION("qtoolkit::silu_mul", std::vector<c10::IValue>());
  checked_isa(kAvx2);
  check_2d(gu, at::kFloat, "gate_up");
  TORCH_CHECK(gu.size(1) % 2 == 0, "gate_up must have an even number of columns");
  const int64_t M = gu.size(0), F = gu.size(1) / 2;
  at::Tensor out = at::empty({M, F}, gu.options());
  const float* g = gu.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, F)), [&](int64_t m0, int64_t m1) {
    silu_mul_rows(g + m0 * 2 * F, m1 - m0, F, o + m0 * F);
  });
  return out;
}


QT_AVX2 void rms_norm_row(const float* x, const float* w, int64_t C, float eps, float* y) {
  // y = x * (1 / sqrt(mean(x^2) + eps)) * w, as F.rms_norm (float32; summation order differs)
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= C; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float ss = hsum_ps_256(acc);
  for (; i < C; ++i) ss += x[i] * x[i];
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(C) + eps);
  const __m256 vr = _mm256_set1_ps(r);
  for (i = 0; i + 8 <= C; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vr), _mm256_loadu_ps(w + i)));
  for (; i < C; ++i) y[i] = x[i] * r * w[i];
}

QT_AVX2 void add_rows(float* x, const float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(d + i)));
  for (; i < n; ++i) x[i] += d[i];
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  RECORD_FUNCTION("qtoolkit::rms_norm", std::vector<c10::IValue>());
  checked_isa(kAvx2);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1, "x must be contiguous float32");
  const int64_t C = x.size(-1), M = x.numel() / std::max<int64_t>(C, 1);
  TORCH_CHECK(w.numel() == C && w.is_contiguous() && w.scalar_type() == at::kFloat, "norm weight must match x");
  at::Tensor y = at::empty(x.sizes(), x.options());
  for (int64_t m = 0; m < M; ++m)
    rms_norm_row(x.data_ptr<float>() + m * C, w.data_ptr<float>(), C, static_cast<float>(eps), y.data_ptr<float>() + m * C);
  return y;
}

at::Tensor add_rms_norm(const at::Tensor& x, const at::Tensor& d, const at::Tensor& w, double eps) {
  RECORD_FUNCTION("qtoolkit::add_rms_norm", std::vector<c10::IValue>());
  checked_isa(kAvx2);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && d.scalar_type() == at::kFloat &&
                  d.is_contiguous() && d.numel() == x.numel(), "x and delta must be contiguous float32 of one size");
  add_rows(x.data_ptr<float>(), d.data_ptr<float>(), x.numel());
  return rms_norm(x, w, eps);
}

// ------------------------------------------------------------------ a whole decode step, one call
//
// Batch-1 decode of a model whose block linears are all packed ternary (fused qkv and gate/up), with
// an int8 embedding and an int8 weight-only head: the same kernels and the same float operations, in
// the same order per element, as the op-by-op path (RuntimeBlock._fused_forward), so the logits are
// bit-identical to it. What changes is the scheduling. The op-by-op path makes ~10 Python calls and
// ~5 OpenMP fork/joins per layer, and a fork/join waits for every thread: on a shared machine, where
// one of the two threads is often descheduled for milliseconds, a token then costs tens of
// milliseconds. Here the step is one call and one parallel region, cut into phases of independent
// work items (row tiles of a linear, k/v heads of attention):
//
//   per layer   qkv rows | attention heads | o rows | gate+up rows and their silu | down rows
//   then        head rows (int8 weights; on VNNI the byte-plane kernel w8_gemv_vnni_rows)
//
// A thread takes the next item of the current phase from an atomic counter; the thread that
// completes a phase's last item runs the phase's small serial tail (residual add, RMSNorm, the next
// linear's activation codes: C or F floats) and opens the next phase. Nobody waits for a thread that
// is not working: a descheduled thread holds no item, the others do its share, and it rejoins
// wherever the step has got to. Items are ~64K weights (a few microseconds), so a phase ends at most
// one item after its work is done. The result of a row never depends on which thread computes it.

struct PhaseState {
  std::atomic<int64_t> next{0}, done{0};
  std::atomic<int> complete{0};
};

// Spin briefly (the other thread is usually mid-item), then give the core away.
inline void wait_for(const std::atomic<int>& flag) {
  for (int spins = 0; !flag.load(std::memory_order_acquire); ++spins) {
    if (spins < 1000)
      _mm_pause();
    else
      sched_yield();
  }
}

struct PackedTernary {
  at::Tensor packed, gamma;  // (N, Kp / 4) uint8 kernel layout, (N,) fp32
  int64_t N = 0, K = 0, Kp = 0;
};

struct DecoderLayer {
  PackedTernary qkv, o, gate_up, down;
  at::Tensor attn_norm, mlp_norm, attn_sub_norm, mlp_sub_norm;  // sub-norms defined only with subln
};

class Decoder {
 public:
  Decoder(const std::vector<std::vector<at::Tensor>>& layers, at::Tensor embed_codes, at::Tensor embed_scale,
          at::Tensor norm, at::Tensor head_codes, at::Tensor head_scale, at::Tensor cos, at::Tensor sin,
          int64_t n_heads, int64_t n_kv_heads, double eps, int64_t isa)
      : embed_codes_(std::move(embed_codes)), embed_scale_(std::move(embed_scale)), norm_(std::move(norm)),
        head_codes_(std::move(head_codes)), head_scale_(std::move(head_scale)), cos_(std::move(cos)),
        sin_(std::move(sin)), nh_(n_heads), nkv_(n_kv_heads), eps_(static_cast<float>(eps)), isa_(checked_isa(isa)) {
    check_2d(embed_codes_, at::kChar, "embedding codes");
    check_2d(head_codes_, at::kChar, "head codes");
    check_2d(cos_, at::kFloat, "cos");
    check_2d(sin_, at::kFloat, "sin");
    C_ = embed_codes_.size(1);
    V_ = head_codes_.size(0);
    hd_ = 2 * cos_.size(1);
    TORCH_CHECK(nkv_ > 0 && nh_ % nkv_ == 0 && nh_ * hd_ == C_, "heads, head_dim and d_model disagree");
    TORCH_CHECK(head_codes_.size(1) == C_, "head codes must be (vocab, d_model)");
    TORCH_CHECK(embed_scale_.numel() == embed_codes_.size(0) && embed_scale_.is_contiguous() &&
                    embed_scale_.scalar_type() == at::kFloat, "embedding scale must be fp32, one per row");
    TORCH_CHECK(head_scale_.numel() == V_ && head_scale_.is_contiguous() && head_scale_.scalar_type() == at::kFloat,
                "head scale must be fp32, one per row");
    TORCH_CHECK(norm_.numel() == C_ && norm_.is_contiguous() && norm_.scalar_type() == at::kFloat, "final norm");
    Ckv_ = nkv_ * hd_;
    for (const auto& t : layers) {
      TORCH_CHECK(t.size() == 10 || t.size() == 12, "a layer is [qkv, qkv_gamma, o, o_gamma, gate_up, gate_up_gamma, "
                  "down, down_gamma, attn_norm, mlp_norm(, attn_sub_norm, mlp_sub_norm)]");
      DecoderLayer L;
      L.qkv = linear(t[0], t[1], C_);
      L.o = linear(t[2], t[3], C_);
      L.gate_up = linear(t[4], t[5], C_);
      TORCH_CHECK(L.gate_up.N % 2 == 0, "gate_up must have an even number of rows");
      F_ = L.gate_up.N / 2;
      L.down = linear(t[6], t[7], F_);
      TORCH_CHECK(L.qkv.N == C_ + 2 * Ckv_ && L.o.N == C_ && L.down.N == C_, "layer shapes disagree with the model");
      L.attn_norm = norm_weight(t[8], C_);
      L.mlp_norm = norm_weight(t[9], C_);
      if (t.size() == 12) {
        L.attn_sub_norm = norm_weight(t[10], C_);
        L.mlp_sub_norm = norm_weight(t[11], F_);
      }
      maxKp_ = std::max({maxKp_, L.qkv.Kp, L.o.Kp, L.gate_up.Kp, L.down.Kp});
      layers_.push_back(std::move(L));
    }
    // every phase of a step has at least one item (a phase without items would never complete)
    TORCH_CHECK(C_ > 0 && V_ > 0 && (layers_.empty() || F_ > 0), "empty model dimensions");
    if (isa_ == kAvx512Vnni) head_wsum_ = int8_row_sums(head_codes_.data_ptr<int8_t>(), V_, C_);
    int64_t token_bytes = V_ * C_;  // weight bytes a step reads
    for (const auto& L : layers_)
      for (const PackedTernary* w : {&L.qkv, &L.o, &L.gate_up, &L.down}) token_bytes += w->packed.numel();
    stream_head_ = stream_past_cache(V_ * C_, token_bytes);
  }

  // idx (1, 1) int64; caches (n_layers, 1, n_kv_heads, max_len, head_dim) fp32; writes position pos of
  // every layer's cache and returns the logits (1, 1, V).
  at::Tensor step(const at::Tensor& idx, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t pos) {
    RECORD_FUNCTION("qtoolkit::decode_step", std::vector<c10::IValue>());
    TORCH_CHECK(idx.numel() == 1 && idx.scalar_type() == at::kLong && idx.device().is_cpu(), "idx must be one int64 id");
    const int64_t tok = idx.data_ptr<int64_t>()[0];
    TORCH_CHECK(tok >= 0 && tok < embed_codes_.size(0), "token id ", tok, " outside the vocabulary");
    const int64_t nl = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(k_cache.device().is_cpu() && v_cache.device().is_cpu(), "the decoder's caches must be CPU tensors");
    TORCH_CHECK(k_cache.dim() == 5 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                    k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat &&
                    k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == nl && k_cache.size(1) == 1 &&
                    k_cache.size(2) == nkv_ && k_cache.size(4) == hd_,
                "caches must be contiguous fp32 (n_layers, 1, n_kv_heads, max_len, head_dim)");
    const int64_t Lmax = k_cache.size(3);
    TORCH_CHECK(pos >= 0 && pos < Lmax && pos < cos_.size(0), "position ", pos, " beyond the cache");
    at::Tensor logits = at::empty({1, 1, V_}, head_scale_.options());
    const bool stream = step_streams_head();  // how this step reads the head
    const int64_t C = C_, F = F_, Ckv = Ckv_, hd = hd_, r = nh_ / nkv_, isa = isa_;
    // shared state: the residual stream x, the current linear's input codes, each op's output
    std::vector<float> x(C), h(std::max(C, F)), qkv(C + 2 * Ckv), y(C), o(C), gu(2 * F), m(F), d(C);
    std::vector<int8_t> q(maxKp_);
    float s = 0.f;
    int32_t qsum = 0;
    const int64_t Kp_head = (C + 63) / 64 * 64;  // the head's input as byte planes (VNNI, w8_gemv_vnni_rows)
    std::vector<uint8_t> planes(3 * Kp_head);
    float s_head = 0.f;
    float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>(), *out = logits.data_ptr<float>();
    const float *cs = cos_.data_ptr<float>(), *sn = sin_.data_ptr<float>();
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));

    auto quantize = [&](const PackedTernary& w, const float* in) {
      quantize_rows(in, 1, w.K, w.Kp, q.data(), &s, &qsum, isa);
    };
    auto rows = [&](const PackedTernary& w, float* dst, int64_t r0, int64_t r1) {
      TernaryArgs a{w.packed.data_ptr<uint8_t>(), w.N, w.Kp, 1, q.data(), &qsum, nullptr, dst,
                    w.gamma.data_ptr<float>(), &s};
      if (isa == kAvx512Vnni)
        ternary_rows_vnni(a, r0, r1);
      else
        ternary_rows_avx2(a, r0, r1);
    };
    // rows per work item: ~64K weights (a few microseconds), a multiple of 8
    auto rows_per_item = [](int64_t K) { return std::max<int64_t>(8, (int64_t{1} << 16) / K / 8 * 8); };
    auto items = [](int64_t n, int64_t per) { return (n + per - 1) / per; };

    // The phases of the step. Phase kind k of layer l is phase 5 l + k; the last one is the head.
    enum Kind { kQkv = 0, kAttention = 1, kO = 2, kGateUp = 3, kDown = 4 };
    const int64_t nphases = 5 * nl + 1;
    std::vector<int64_t> n_items(nphases), per_item(nphases);
    for (int64_t l = 0; l < nl; ++l) {
      const DecoderLayer& L = layers_[l];
      const int64_t per[5] = {rows_per_item(L.qkv.Kp), 1, rows_per_item(L.o.Kp), rows_per_item(L.gate_up.Kp),
                              rows_per_item(L.down.Kp)};
      const int64_t n[5] = {L.qkv.N, nkv_, C, F, C};
      for (int k = 0; k < 5; ++k) {
        per_item[5 * l + k] = per[k];
        n_items[5 * l + k] = items(n[k], per[k]);
      }
    }
    per_item[nphases - 1] = rows_per_item(C);
    n_items[nphases - 1] = items(V_, per_item[nphases - 1]);

    auto work = [&](int64_t phase, int64_t i) {  // work item i of a phase
      const int64_t per = per_item[phase];
      if (phase == nphases - 1) {
        Int8Args a{head_codes_.data_ptr<int8_t>(), V_, C, 1, h.data(), head_scale_.data_ptr<float>(), out,
                   stream};
        if (isa == kAvx512Vnni)
          w8_gemv_range_vnni(a, i * per, std::min(V_, (i + 1) * per), planes.data(), Kp_head, s_head,
                             head_wsum_.data());
        else
          w8_rows_range_avx2(a, i * per, std::min(V_, (i + 1) * per));
        return;
      }
      const int64_t l = phase / 5;
      const DecoderLayer& L = layers_[l];
      switch (phase % 5) {
        case kQkv: rows(L.qkv, qkv.data(), i * per, std::min(L.qkv.N, (i + 1) * per)); break;
        case kAttention: {
          std::vector<float> qrot(hd), p(pos + 1);
          const int64_t off = ((l * nkv_) + i) * Lmax * hd;
          attend_group(qkv.data(), 1, C, Ckv, hd, i, r, kc + off, vc + off, cs, sn, hd / 2, pos, scale, y.data(), qrot, p);
          break;
        }
        case kO: rows(L.o, o.data(), i * per, std::min(C, (i + 1) * per)); break;
        case kGateUp: {
          const int64_t lo = i * per, hi = std::min(F, (i + 1) * per);
          rows(L.gate_up, gu.data(), lo, hi);          // gate rows
          rows(L.gate_up, gu.data(), F + lo, F + hi);  // up rows
          silu_mul_span(gu.data() + lo, gu.data() + F + lo, hi - lo, m.data() + lo);
          break;
        }
        case kDown: rows(L.down, d.data(), i * per, std::min(C, (i + 1) * per)); break;
      }
    };
    // norm + codes of the residual stream for layer l's qkv (l == nl: the final norm, the head's input)
    auto enter_layer = [&](int64_t l) {
      if (l == nl) {
        rms_norm_row(x.data(), norm_.data_ptr<float>(), C, eps_, h.data());
        if (isa == kAvx512Vnni) w8_planes_avx512(h.data(), C, Kp_head, planes.data(), &s_head);
        return;
      }
      rms_norm_row(x.data(), layers_[l].attn_norm.data_ptr<float>(), C, eps_, h.data());
      quantize(layers_[l].qkv, h.data());
    };
    auto finish = [&](int64_t phase) {  // run once, by the thread that completes the phase's last item
      if (phase == nphases - 1) return;
      const int64_t l = phase / 5;
      const DecoderLayer& L = layers_[l];
      switch (phase % 5) {
        case kQkv: break;
        case kAttention:
          if (L.attn_sub_norm.defined()) {
            rms_norm_row(y.data(), L.attn_sub_norm.data_ptr<float>(), C, eps_, h.data());
            quantize(L.o, h.data());
          } else {
            quantize(L.o, y.data());
          }
          break;
        case kO:
          add_rows(x.data(), o.data(), C);
          rms_norm_row(x.data(), L.mlp_norm.data_ptr<float>(), C, eps_, h.data());
          quantize(L.gate_up, h.data());
          break;
        case kGateUp:
          if (L.mlp_sub_norm.defined()) {
            rms_norm_row(m.data(), L.mlp_sub_norm.data_ptr<float>(), F, eps_, h.data());
            quantize(L.down, h.data());
          } else {
            quantize(L.down, m.data());
          }
          break;
        case kDown:
          add_rows(x.data(), d.data(), C);
          enter_layer(l + 1);
          break;
      }
    };

    {  // embedding: codes[tok] * scale[tok]; then layer 0's input
      const int8_t* e = embed_codes_.data_ptr<int8_t>() + tok * C;
      const float es = embed_scale_.data_ptr<float>()[tok];
      for (int64_t j = 0; j < C; ++j) x[j] = static_cast<float>(e[j]) * es;
      enter_layer(0);
    }
    std::vector<PhaseState> state(nphases);
    std::vector<int64_t> ends(nphases);  // when each phase completed (ns since the step began)
    const auto t0 = std::chrono::steady_clock::now();
    const int nthreads = std::max(1, at::get_num_threads());
#pragma omp parallel num_threads(nthreads)
    {
      for (int64_t ph = 0; ph < nphases; ++ph) {
        PhaseState& st = state[ph];
        for (int64_t i; (i = st.next.fetch_add(1, std::memory_order_relaxed)) < n_items[ph];) {
          work(ph, i);
          if (st.done.fetch_add(1, std::memory_order_acq_rel) + 1 == n_items[ph]) {
            finish(ph);
            ends[ph] = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
            st.complete.store(1, std::memory_order_release);
          }
        }
        wait_for(st.complete);
      }
    }
    record_step(ends.back());
    last_phase_ends_ns_ = std::move(ends);
    return logits;
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  // When each phase of the last step completed, in ns from the start of its parallel region: phase
  // 5 l + k is kind k (qkv, attention, o, gate_up, down) of layer l; the last one is the head.
  std::vector<int64_t> last_phase_ends_ns() const { return last_phase_ends_ns_; }
  // Whether steps read the head with non-temporal prefetches: stream_past_cache's guess, or what the
  // trials below measure when auto_stream_head is on. Setting it fixes the choice (and turns the
  // trials off); only what the caches keep changes, never a value.
  bool stream_head() const { return stream_head_; }
  void set_stream_head(bool on) {
    stream_head_ = on;
    auto_stream_ = false;
  }
  bool auto_stream_head() const { return auto_stream_; }
  void set_auto_stream_head(bool on) {
    auto_stream_ = on && V_ * C_ >= kStreamBytes;
    steps_ = 0;
  }

 private:
  static PackedTernary linear(const at::Tensor& packed, const at::Tensor& gamma, int64_t K) {
    check_packed(packed);
    PackedTernary w{packed, gamma, packed.size(0), K, packed.size(1) * 4};
    TORCH_CHECK(w.Kp >= K && w.Kp - K < kBlock, "packed weight does not match its input size");
    TORCH_CHECK(gamma.dim() == 1 && gamma.size(0) == w.N && gamma.scalar_type() == at::kFloat && gamma.is_contiguous(),
                "gamma must be a contiguous float32 vector, one per output row");
    return w;
  }
  static at::Tensor norm_weight(const at::Tensor& w, int64_t n) {
    TORCH_CHECK(w.numel() == n && w.is_contiguous() && w.scalar_type() == at::kFloat, "norm weight of the wrong size");
    return w;
  }

  std::vector<DecoderLayer> layers_;
  // Which way a step reads the head, measured (opt-in: auto_stream_head). The last-level cache a
  // process really gets (a share of a host's L3, other tenants, the KV cache growing) decides whether
  // streaming the head pays, and sysconf cannot say. So every kRetuneSteps steps, kTrialSteps trial
  // steps in blocks of 4 alternate the current choice and the other; the last 3 steps of each block
  // are timed (the first runs on the cache state the previous block left), and the other choice is
  // kept if its median is 3% faster. Off by default: on a loaded 2-core machine whole-step times vary
  // by 2x from one step to the next, and 6 samples per side picked the slower way (the head phase
  // 7.7 ms instead of 2.8 ms, decode 33 instead of 49 tok/s).
  static constexpr int64_t kRetuneSteps = 1024, kTrialSteps = 16;
  bool step_streams_head() const {
    const int64_t s = steps_ % kRetuneSteps;
    if (!auto_stream_ || s >= kTrialSteps) return stream_head_;
    return (s / 4) % 2 ? !stream_head_ : stream_head_;
  }
  void record_step(int64_t ns) {
    if (!auto_stream_) return;
    const int64_t s = steps_++ % kRetuneSteps;
    if (s >= kTrialSteps) return;
    if (s % 4) trial_ns_[(s / 4) % 2].push_back(ns);
    if (s == kTrialSteps - 1) {
      auto median = [](std::vector<int64_t>& v) {
        std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
        return static_cast<double>(v[v.size() / 2]);
      };
      if (median(trial_ns_[1]) < 0.97 * median(trial_ns_[0])) stream_head_ = !stream_head_;
      trial_ns_[0].clear();
      trial_ns_[1].clear();
    }
  }
  bool auto_stream_ = false;
  int64_t steps_ = 0;
  std::vector<int64_t> trial_ns_[2];  // step times of the current choice [0] and the other [1]
  std::vector<int64_t> last_phase_ends_ns_;
  bool stream_head_ = false;        // read the head with non-temporal prefetches (stream_past_cache)
  std::vector<int32_t> head_wsum_;  // row sums of the head's codes (VNNI head kernel)
  at::Tensor embed_codes_, embed_scale_, norm_, head_codes_, head_scale_, cos_, sin_;
  int64_t nh_, nkv_;
  float eps_;
  int64_t isa_;
  int64_t C_ = 0, V_ = 0, hd_ = 0, Ckv_ = 0, F_ = 0, maxKp_ = 0;
};

}  // namespace

// A plain pybind11 module: a call costs ~0.2 us, against ~3 us through the torch.ops dispatcher,
// which matters at ~100 calls per generated token. RECORD_FUNCTION keeps the ops visible to
// torch.profiler.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qtoolkit inference kernels (see the header of ternary_kernels.cpp)";
  m.def("best_isa", &best_isa, "best instruction set this CPU and OS support: 2 AVX-512 VNNI, 1 AVX2, 0 none");
  m.def("quantize_activations", &quantize_activations, "per-token int8 codes: (codes (M, Kp), s (M,), sums (M,))");
  m.def("ternary_matmul_int", &ternary_matmul_int, "integer dots (M, N) of codes (M, Kp) and a packed weight");
  m.def("ternary_linear", &ternary_linear, "float x (M, K) through a packed ternary weight");
  m.def("int8_linear", &int8_linear, "float x (M, K) through int8 weights with row scales (weight-only)");
  m.def("attention_step", &attention_step, "RoPE, KV-cache write and causal attention for one layer");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused (M, 2F) gate/up output");
  m.def("rms_norm", &rms_norm, "RMSNorm of the rows of x");
  m.def("add_rms_norm", &add_rms_norm, "x += delta (in place), then RMSNorm of x");
  pybind11::class_<Decoder>(m, "Decoder", "batch-1 decode steps of an all-ternary model in one call each")
      .def(pybind11::init<const std::vector<std::vector<at::Tensor>>&, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                          at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t, double, int64_t>())
      .def("step", &Decoder::step, "logits (1, 1, V) of one token; writes its k/v at `pos` of every layer",
           pybind11::call_guard<pybind11::gil_scoped_release>())
      .def_property_readonly("num_layers", &Decoder::num_layers)
      .def_property("stream_head", &Decoder::stream_head, &Decoder::set_stream_head,
                    "whether steps read the LM head with non-temporal prefetches (default: where the "
                    "last-level cache cannot hold a step's weights; measured with auto_stream_head); "
                    "setting it fixes the choice; values are the same either way")
      .def_property("auto_stream_head", &Decoder::auto_stream_head, &Decoder::set_auto_stream_head,
                    "re-measure stream_head every 1024 steps (16 trial steps; heads of 8 MB or more); off by default")
      .def_property_readonly("last_phase_ends_ns", &Decoder::last_phase_ends_ns,
                             "when each phase of the last step completed (ns from its start): 5 per layer "
                             "(qkv, attention, o, gate_up, down), then the head");
}
