// Register-blocked bf16 micro-kernel on AVX512-BF16 (`vdpbf16ps`): C (fp32) (+)= A . B with bf16
// operands and fp32 accumulation. Torch-free and reusable by any CPU kernel.
//
// `vdpbf16ps acc, a, b` adds a[2i] * b[2i] + a[2i + 1] * b[2i + 1] to fp32 lane i (16 lanes), so
// both operands come as 32-bit words holding a bf16 pair along the reduction dimension k:
//   A: word (m, kp) = (A[m][2kp], A[m][2kp + 1]) at A[m * a_rs + kp * a_ks] (uint32 units), read
//      by a broadcast; any layout whose pairs are adjacent in memory works (row-major A[M][K]:
//      a_rs = K / 2, a_ks = 1; the "pair-transposed" P^T of a [K][M] tile: a_rs = 1, a_ks = M);
//   B: "pair-interleaved" (VNNI) words, B[kp * ldb + n] = (B[2kp][n], B[2kp + 1][n]), n the
//      output column, so one 64-byte load feeds 16 output lanes.
// Low (first) half of a word is the even k. K is even; odd sizes are zero-padded by the caller.
//
// Every function here is compiled for AVX512-BF16 through a target attribute, so the file builds
// with or without -march=native; callers must check `cpu_has_avx512_bf16()` at run time first.
// At the end, an fp32 sibling (FMA on AVX-512F, `cpu_has_avx512f()`) with the same operand
// addressing, so one tiled algorithm can be written for both element types.
#pragma once

#include <immintrin.h>

#include <cstdint>

#ifndef ERNIE_R4
#define ERNIE_R4 6
#endif
#define ERNIE_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

namespace ernie_cpu {
namespace bf16k {

// The running CPU (and OS) executes AVX512-BF16 instructions.
inline bool cpu_has_avx512_bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

enum class Accum : int {
  kOverwrite = 0,  // C = A . B
  kAdd = 1,        // C += A . B
  kScaleAdd = 2,   // C = row_scale[m] * C + A . B (the online-softmax rescale folded into the GEMM)
};

ERNIE_BF16_TARGET inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }

// R rows x NV vectors of C stay in registers while the kp word pairs stream through.
template <int NV, int R>
ERNIE_BF16_TARGET inline void gemm_rows(Accum mode, int kp, const uint32_t* A, int64_t a_rs, int64_t a_ks,
                                        const uint32_t* B, int64_t ldb, float* C, int64_t ldc,
                                        const float* row_scale) {
  __m512 c[R][NV];
  for (int r = 0; r < R; ++r) {
    const __m512 s = mode == Accum::kScaleAdd ? _mm512_set1_ps(row_scale[r]) : _mm512_setzero_ps();
    for (int v = 0; v < NV; ++v) {
      if (mode == Accum::kOverwrite) {
        c[r][v] = _mm512_setzero_ps();
      } else {
        const __m512 old = _mm512_loadu_ps(C + r * ldc + 16 * v);
        c[r][v] = mode == Accum::kAdd ? old : _mm512_mul_ps(old, s);
      }
    }
  }
  for (int k = 0; k < kp; ++k) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) b[v] = as_bh(_mm512_loadu_si512(B + k * ldb + 16 * v));
    for (int r = 0; r < R; ++r) {
      const __m512bh a = as_bh(_mm512_set1_epi32(int(A[r * a_rs + k * a_ks])));
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], a, b[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + 16 * v, c[r][v]);
}

// Rows per register block: about 16-24 accumulators, the rest of the 32 registers for B and A.
template <int NV>
constexpr int rows_per_block() {
  return NV <= 1 ? 8 : NV == 2 ? 8 : NV <= 3 ? 6 : NV <= 4 ? ERNIE_R4 : NV <= 8 ? 2 : 1;
}

template <int NV>
ERNIE_BF16_TARGET inline void gemm_nv(Accum mode, int M, int kp, const uint32_t* A, int64_t a_rs, int64_t a_ks,
                                      const uint32_t* B, int64_t ldb, float* C, int64_t ldc, const float* row_scale) {
  constexpr int R = rows_per_block<NV>();
  int m = 0;
  for (; m + R <= M; m += R)
    gemm_rows<NV, R>(mode, kp, A + m * a_rs, a_rs, a_ks, B, ldb, C + m * ldc, ldc, row_scale ? row_scale + m : nullptr);
  if constexpr (R > 4 && NV <= 4)
    for (; m + 4 <= M; m += 4)
      gemm_rows<NV, 4>(mode, kp, A + m * a_rs, a_rs, a_ks, B, ldb, C + m * ldc, ldc, row_scale ? row_scale + m : nullptr);
  for (; m < M; ++m)
    gemm_rows<NV, 1>(mode, kp, A + m * a_rs, a_rs, a_ks, B, ldb, C + m * ldc, ldc, row_scale ? row_scale + m : nullptr);
}

// C[M][16 nv] (mode) A . B over kp bf16 pairs; nv in 1..16 (N up to 256 columns).
ERNIE_BF16_TARGET inline void gemm(int nv, Accum mode, int M, int kp, const uint32_t* A, int64_t a_rs, int64_t a_ks,
                                   const uint32_t* B, int64_t ldb, float* C, int64_t ldc,
                                   const float* row_scale = nullptr) {
  switch (nv) {
#define ERNIE_BF16_GEMM_CASE(N) \
  case N:                       \
    return gemm_nv<N>(mode, M, kp, A, a_rs, a_ks, B, ldb, C, ldc, row_scale);
    ERNIE_BF16_GEMM_CASE(1)
    ERNIE_BF16_GEMM_CASE(2)
    ERNIE_BF16_GEMM_CASE(3)
    ERNIE_BF16_GEMM_CASE(4)
    ERNIE_BF16_GEMM_CASE(5)
    ERNIE_BF16_GEMM_CASE(6)
    ERNIE_BF16_GEMM_CASE(7)
    ERNIE_BF16_GEMM_CASE(8)
    ERNIE_BF16_GEMM_CASE(9)
    ERNIE_BF16_GEMM_CASE(10)
    ERNIE_BF16_GEMM_CASE(11)
    ERNIE_BF16_GEMM_CASE(12)
    ERNIE_BF16_GEMM_CASE(13)
    ERNIE_BF16_GEMM_CASE(14)
    ERNIE_BF16_GEMM_CASE(15)
    ERNIE_BF16_GEMM_CASE(16)
#undef ERNIE_BF16_GEMM_CASE
    default:
      break;
  }
}

// ---- conversions ---------------------------------------------------------------------------------

// 16 fp32 -> 16 bf16 (round to nearest even), as 256 bits.
ERNIE_BF16_TARGET inline __m256i cvt16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

// Two fp32 rows of 16 -> 16 pair words (lo[n], hi[n]): the pair-interleaved layout of 2 k-rows.
ERNIE_BF16_TARGET inline __m512i interleave_pairs(__m512 lo, __m512 hi) {
  // cvtne2ps(a, b) puts b in elements 0..15 and a in 16..31; then element n pairs with n + 16.
  const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, both);
}

// 2^x for 16 lanes: x = n + f, |f| <= 1/2, 2^f by a degree-6 polynomial, times 2^n by vscalefps.
// x < -126 (masked scores are -inf) gives exactly 0.
ERNIE_BF16_TARGET inline __m512 exp2_16(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-126.0f)), _mm512_set1_ps(127.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5403530393381608e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}


// ---- the fp32 sibling: same addressing with single fp32 elements instead of bf16 pairs ----------
// C[M][16 NV] (mode) A . B, A(m, k) = A[m * a_rs + k * a_ks] (broadcast), B[k * ldb + n]; FMA.
#define ERNIE_F32_TARGET __attribute__((target("avx512f,avx512dq,fma")))

inline bool cpu_has_avx512f() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}

template <int NV, int R>
ERNIE_F32_TARGET inline void gemm_rows_f32(Accum mode, int K, const float* A, int64_t a_rs, int64_t a_ks,
                                           const float* B, int64_t ldb, float* C, int64_t ldc,
                                           const float* row_scale) {
  __m512 c[R][NV];
  for (int r = 0; r < R; ++r) {
    const __m512 s = mode == Accum::kScaleAdd ? _mm512_set1_ps(row_scale[r]) : _mm512_setzero_ps();
    for (int v = 0; v < NV; ++v) {
      if (mode == Accum::kOverwrite) {
        c[r][v] = _mm512_setzero_ps();
      } else {
        const __m512 old = _mm512_loadu_ps(C + r * ldc + 16 * v);
        c[r][v] = mode == Accum::kAdd ? old : _mm512_mul_ps(old, s);
      }
    }
  }
  for (int k = 0; k < K; ++k) {
    __m512 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(B + k * ldb + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * a_rs + k * a_ks]);
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + 16 * v, c[r][v]);
}

template <int NV>
ERNIE_F32_TARGET inline void gemm_nv_f32(Accum mode, int M, int K, const float* A, int64_t a_rs, int64_t a_ks,
                                         const float* B, int64_t ldb, float* C, int64_t ldc, const float* row_scale) {
  constexpr int R = rows_per_block<NV>();
  int m = 0;
  for (; m + R <= M; m += R)
    gemm_rows_f32<NV, R>(mode, K, A + m * a_rs, a_rs, a_ks, B, ldb, C + m * ldc, ldc,
                         row_scale ? row_scale + m : nullptr);
  if constexpr (R > 4 && NV <= 4)
    for (; m + 4 <= M; m += 4)
      gemm_rows_f32<NV, 4>(mode, K, A + m * a_rs, a_rs, a_ks, B, ldb, C + m * ldc, ldc, row_scale ? row_scale + m : nullptr);
  for (; m < M; ++m)
    gemm_rows_f32<NV, 1>(mode, K, A + m * a_rs, a_rs, a_ks, B, ldb, C + m * ldc, ldc,
                         row_scale ? row_scale + m : nullptr);
}

ERNIE_F32_TARGET inline void gemm(int nv, Accum mode, int M, int K, const float* A, int64_t a_rs, int64_t a_ks,
                                  const float* B, int64_t ldb, float* C, int64_t ldc,
                                  const float* row_scale = nullptr) {
  switch (nv) {
#define ERNIE_F32_GEMM_CASE(N) \
  case N:                      \
    return gemm_nv_f32<N>(mode, M, K, A, a_rs, a_ks, B, ldb, C, ldc, row_scale);
    ERNIE_F32_GEMM_CASE(1)
    ERNIE_F32_GEMM_CASE(2)
    ERNIE_F32_GEMM_CASE(3)
    ERNIE_F32_GEMM_CASE(4)
    ERNIE_F32_GEMM_CASE(5)
    ERNIE_F32_GEMM_CASE(6)
    ERNIE_F32_GEMM_CASE(7)
    ERNIE_F32_GEMM_CASE(8)
    ERNIE_F32_GEMM_CASE(9)
    ERNIE_F32_GEMM_CASE(10)
    ERNIE_F32_GEMM_CASE(11)
    ERNIE_F32_GEMM_CASE(12)
    ERNIE_F32_GEMM_CASE(13)
    ERNIE_F32_GEMM_CASE(14)
    ERNIE_F32_GEMM_CASE(15)
    ERNIE_F32_GEMM_CASE(16)
#undef ERNIE_F32_GEMM_CASE
    default:
      break;
  }
}

}  // namespace bf16k
}  // namespace ernie_cpu
