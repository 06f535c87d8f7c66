// Mask bookkeeping and the fp32 micro-GEMM shared by the FlashMask forward and backward.
#include <algorithm>
#include <climits>

#include "flashmask.h"

namespace ernie_cpu {

const char* flashmask_check(const FlashMaskParams& p) {
  if (p.B <= 0 || p.S <= 0 || p.Hq <= 0 || p.Hkv <= 0 || p.D <= 0) return "empty or negative size";
  if (p.Hq % p.Hkv != 0) return "query heads must be a multiple of key/value heads";
  if (p.D > 256) return "head dim above 256 is not supported by the CPU kernel";
  if (p.idx_heads != 1 && p.idx_heads != p.Hkv) return "mask heads must be 1 or the key/value head count";
  if (p.causal && p.n_idx != 1 && p.n_idx != 2) return "causal FlashMask takes 1 or 2 indices per column";
  if (!p.causal && p.n_idx != 2 && p.n_idx != 4) return "bidirectional FlashMask takes 2 or 4 indices per column";
  if (!(p.dropout_p >= 0.0 && p.dropout_p <= 1.0)) return "dropout_p must be in [0, 1]";
  return "";
}

ColumnMask::ColumnMask(const FlashMaskParams& p) {
  ncb_ = (p.S + kBlockN - 1) / kBlockN;
  s_pad_ = ncb_ * kBlockN;
  const int nbm = p.B * p.idx_heads;
  const int64_t total = int64_t(nbm) * s_pad_;
  // Padding columns are masked for every row: lower span [0, INT_MAX), upper span [0, INT_MAX).
  ls_.assign(total, 0);
  le_.assign(total, INT_MAX);
  us_.assign(total, 0);
  ue_.assign(total, INT_MAX);
  const int n = p.n_idx;
  for (int bm = 0; bm < nbm; ++bm) {
    const int32_t* idx = p.idx + int64_t(bm) * p.S * n;
    int32_t* ls = ls_.data() + int64_t(bm) * s_pad_;
    int32_t* le = le_.data() + int64_t(bm) * s_pad_;
    int32_t* us = us_.data() + int64_t(bm) * s_pad_;
    int32_t* ue = ue_.data() + int64_t(bm) * s_pad_;
    for (int j = 0; j < p.S; ++j) {
      const int32_t* c = idx + int64_t(j) * n;
      ls[j] = c[0];
      if (p.causal) {  // the whole upper triangle is masked
        le[j] = n == 2 ? c[1] : INT_MAX;
        us[j] = 0;
        ue[j] = INT_MAX;
      } else if (n == 2) {  // LTS, UTE
        le[j] = INT_MAX;
        us[j] = 0;
        ue[j] = c[1];
      } else {  // LTS, LTE, UTS, UTE
        le[j] = c[1];
        us[j] = c[2];
        ue[j] = c[3];
      }
    }
  }
  blk_.resize(int64_t(nbm) * ncb_ * 8);
  for (int bm = 0; bm < nbm; ++bm) {
    const int32_t* arrays[4] = {ls(bm), le(bm), us(bm), ue(bm)};
    for (int cb = 0; cb < ncb_; ++cb) {
      int32_t* out = blk_.data() + (int64_t(bm) * ncb_ + cb) * 8;
      for (int a = 0; a < 4; ++a) {
        const int32_t* x = arrays[a] + cb * kBlockN;
        out[2 * a] = *std::min_element(x, x + kBlockN);
        out[2 * a + 1] = *std::max_element(x, x + kBlockN);
      }
    }
  }
}

// A tile is fully masked when, for every column, its row range [r0, r1) lies inside the masked
// span of each triangle it touches; unmasked when it misses the span of every column. Min/max
// over the block make both tests conservative: anything else is "partial" and masked per element.
TileKind ColumnMask::classify(int bm, int r0, int r1, int cb) const {
  const int32_t* m = blk_.data() + (int64_t(bm) * ncb_ + cb) * 8;
  const int c0 = cb * kBlockN, c1 = c0 + kBlockN;
  const bool has_lower = r1 - 1 >= c0;  // some row i >= some column j
  const bool has_upper = r0 < c1 - 1;   // some row i < some column j
  const bool lower_masked = m[1] <= r0 && m[2] >= r1;                   // max ls <= r0, min le >= r1
  const bool upper_masked = m[5] <= r0 && m[6] >= r1;                   // max us <= r0, min ue >= r1
  const bool lower_free = m[0] >= r1 || m[3] <= r0;                     // min ls >= r1 or max le <= r0
  const bool upper_free = m[4] >= r1 || m[7] <= r0;                     // min us >= r1 or max ue <= r0
  if ((!has_lower || lower_masked) && (!has_upper || upper_masked)) return TileKind::kMasked;
  if ((!has_lower || lower_free) && (!has_upper || upper_free)) return TileKind::kUnmasked;
  return TileKind::kPartial;
}

void mask_tile(float* s, int nr, int r0, int c0, const ColumnMask& cm, int bm) {
  const int32_t* ls = cm.ls(bm) + c0;
  const int32_t* le = cm.le(bm) + c0;
  const int32_t* us = cm.us(bm) + c0;
  const int32_t* ue = cm.ue(bm) + c0;
  const vfloat neg_inf = vsplat(-kInf);
  for (int r = 0; r < nr; ++r) {
    const vint i = vspliti(r0 + r);
    for (int v = 0; v < kBlockN / kVecLen; ++v) {
      const int off = v * kVecLen;
      const vint j = viota() + (c0 + off);
      const vint in_lower = (vloadi(ls + off) <= i) & (i < vloadi(le + off));
      const vint in_upper = (vloadi(us + off) <= i) & (i < vloadi(ue + off));
      const vint masked = i >= j ? in_lower : in_upper;
      float* row = s + r * kBlockN + off;
      vstore(row, masked ? neg_inf : vload(row));
    }
  }
}

template <class T>
static void transpose_heads(const FlashMaskParams& p, const void* src_, const int64_t* stride, int dp, int s_pad,
                            float* dst_all) {
  const int64_t heads = int64_t(p.B) * p.Hkv;
#pragma omp parallel for num_threads(p.num_threads) schedule(static)
  for (int64_t bh = 0; bh < heads; ++bh) {
    const int b = int(bh / p.Hkv), hk = int(bh % p.Hkv);
    const T* src = static_cast<const T*>(src_) + b * stride[0] + hk * stride[2];
    float* dst = dst_all + bh * dp * s_pad;
    std::fill(dst, dst + int64_t(dp) * s_pad, 0.f);
    for (int j0 = 0; j0 < p.S; j0 += kBlockN) {  // a block of rows at a time keeps dst lines in cache
      const int j1 = std::min(p.S, j0 + kBlockN);
      for (int j = j0; j < j1; ++j) {
        const T* row = src + j * stride[1];
        for (int d = 0; d < p.D; ++d) dst[int64_t(d) * s_pad + j] = to_float(row[d]);
      }
    }
  }
}

TransposedKV::TransposedKV(const FlashMaskParams& p) {
  dp = round_up16(p.D);
  s_pad = (p.S + kBlockN - 1) / kBlockN * kBlockN;
  kt.resize(int64_t(p.B) * p.Hkv * dp * s_pad);
  vt.resize(kt.size());
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    transpose_heads<T>(p, p.k, p.k_stride, dp, s_pad, kt.data());
    transpose_heads<T>(p, p.v, p.v_stride, dp, s_pad, vt.data());
  });
}

// Register-blocked kernel: R rows x NV vectors of C stay in registers while K streams through
// (R * NV = 16 accumulators: half the AVX-512 register file, the rest holds B and A broadcasts).
template <int NV, int R, bool TA>
static inline void gemm_rows(bool acc, int K, const float* A, int lda, const float* B, int ldb, float* C,
                             int ldc) {
  vfloat c[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = acc ? vload(C + r * ldc + v * kVecLen) : vfloat{};
  for (int k = 0; k < K; ++k) {
    vfloat b[NV];
    for (int v = 0; v < NV; ++v) b[v] = vload(B + int64_t(k) * ldb + v * kVecLen);
    for (int r = 0; r < R; ++r) {
      const vfloat a = vsplat(TA ? A[int64_t(k) * lda + r] : A[r * lda + k]);
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) vstore(C + r * ldc + v * kVecLen, c[r][v]);
}

template <int NV, bool TA>
static void gemm_nv(bool acc, int M, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc) {
  constexpr int R = NV <= 4 ? 16 / NV : (NV <= 8 ? 2 : 1);
  auto a_at = [&](int i) { return TA ? A + i : A + int64_t(i) * lda; };
  int i = 0;
  for (; i + R <= M; i += R) gemm_rows<NV, R, TA>(acc, K, a_at(i), lda, B, ldb, C + int64_t(i) * ldc, ldc);
  for (; i < M; ++i) gemm_rows<NV, 1, TA>(acc, K, a_at(i), lda, B, ldb, C + int64_t(i) * ldc, ldc);
}

template <int NV>
static void gemm_nv(bool acc, bool ta, int M, int K, const float* A, int lda, const float* B, int ldb, float* C,
                    int ldc) {
  ta ? gemm_nv<NV, true>(acc, M, K, A, lda, B, ldb, C, ldc) : gemm_nv<NV, false>(acc, M, K, A, lda, B, ldb, C, ldc);
}

void gemm(int nv, bool accumulate, bool trans_a, int M, int K, const float* A, int lda, const float* B, int ldb,
          float* C, int ldc) {
  switch (nv) {
#define ERNIE_GEMM_CASE(N) \
  case N:                  \
    return gemm_nv<N>(accumulate, trans_a, M, K, A, lda, B, ldb, C, ldc);
    ERNIE_GEMM_CASE(1)
    ERNIE_GEMM_CASE(2)
    ERNIE_GEMM_CASE(3)
    ERNIE_GEMM_CASE(4)
    ERNIE_GEMM_CASE(5)
    ERNIE_GEMM_CASE(6)
    ERNIE_GEMM_CASE(7)
    ERNIE_GEMM_CASE(8)
    ERNIE_GEMM_CASE(9)
    ERNIE_GEMM_CASE(10)
    ERNIE_GEMM_CASE(11)
    ERNIE_GEMM_CASE(12)
    ERNIE_GEMM_CASE(13)
    ERNIE_GEMM_CASE(14)
    ERNIE_GEMM_CASE(15)
    ERNIE_GEMM_CASE(16)
#undef ERNIE_GEMM_CASE
    default:
      break;
  }
}

}  // namespace ernie_cpu
