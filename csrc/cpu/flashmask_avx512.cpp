// FlashMask attention on AVX-512 with tile GEMMs on register-blocked micro-kernels (bf16_gemm.h):
//   bf16 tensors: bf16 arithmetic, bf16 operands with fp32 accumulation on AVX512-BF16 (`vdpbf16ps`);
//   fp32 tensors: fp32 FMA on AVX-512F.
// Softmax, the mask, dropout and the running statistics are fp32 in both. flashmask_fwd /
// flashmask_bwd choose this path at run time (flashmask_avx512_usable); the portable
// vector-extension path (flashmask_fwd.cpp / flashmask_bwd.cpp) serves every other CPU.
//
// Operands are repacked once per call (O(S * D) each, never S x S), tile-contiguous. With P = 2
// for bf16 (two bf16 along the reduction dimension in one 32-bit word, the layout vdpbf16ps
// reads) and P = 1 for fp32 (plain elements):
//   Qn, dOn   [B][Hq][S_pad][dp]            row-major (A operands of Q K^T, dO V^T);
//   Kt, Vt    [B][Hkv][ncb][dp/P][64][P]    along d (B operands of Q K^T and dO V^T);
//   Krp, Vrp  [B][Hkv][S_pad/P][dp][P]      along the sequence (B operands of P V and dS K);
//   Qrp, dOrp [B][Hq][S_pad/P][dp][P]       along the sequence (B operands of P^T dO, dS^T Q).
// (For fp32 the "rp" layouts are the row-major ones and are not stored twice.) dp = D rounded up
// to 16; padding is zero (padded key columns are masked by ColumnMask, padded query rows are never
// stored and give P = dS = 0 in backward).
//
// Forward (FlashAttention-2 online softmax in base 2, as the portable path): one task per
// (batch, query head, row block); S = Q K^T, scores * scale * log2e, mask, P = exp2(s - m)
// (rounded to bf16 for the bf16 path), O = alpha O + P V in one GEMM (the rescale folded into the
// accumulator load). Backward in one pass per (batch, kv head, key block): for every query head of
// the group and every visible row block, S and dP = dO V^T are recomputed, P = exp2(s - lse2),
// dS = P (dP - delta); dV += P^T dO and dK += dS^T Q stay in the task's tile, dQ += dS K goes to
// the thread's own fp32 dQ buffer; the buffers are summed at the end (no atomics; memory
// threads x B Hq S dp fp32, linear in S). Five GEMMs per tile instead of the portable path's seven.
// Tasks of both passes run largest first by their number of visible tiles, not rows.
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <numeric>
#include <type_traits>
#include <vector>

#include "bf16_gemm.h"
#include "flashmask.h"

// GCC 12 flags its own _mm512_reduce_* expansions (_mm512_undefined_* operands) as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace ernie_cpu {

bool flashmask_avx512_usable(DType dtype) {
  static const bool has_bf16 = bf16k::cpu_has_avx512_bf16(), has_f32 = bf16k::cpu_has_avx512f();
  // ERNIE_CORE_FLASHMASK_PORTABLE=1 forces the portable path (tests run both on one machine).
  const char* force = std::getenv("ERNIE_CORE_FLASHMASK_PORTABLE");
  if (force && force[0] == '1') return false;
  return dtype == DType::kBFloat16 ? has_bf16 : has_f32;
}

namespace {

using bf16k::Accum;

constexpr int kTile = 64;  // rows and columns per tile (kBlockM = kBlockN)
static_assert(kBlockM == kTile && kBlockN == kTile, "the AVX-512 path assumes square 64 tiles");

// Element traits: E is the stored element (bf16 bits or float), W the GEMM's k-step word.
template <class E>
struct Elem;
template <>
struct Elem<uint16_t> {
  static constexpr int P = 2;
  using W = uint32_t;
  using T = bf16;  // tensor dtype
};
template <>
struct Elem<float> {
  static constexpr int P = 1;
  using W = float;
  using T = float;
};

// Every function of this path is compiled for AVX512-BF16 (a superset of what the fp32 instantiation
// needs): GCC emits AVX512-BF16 instructions only for the bf16 intrinsics (or __bf16 arithmetic,
// not used here), which only the bf16 instantiation contains, so the fp32 path runs on any
// AVX-512F CPU (flashmask_avx512_usable checks exactly that per dtype).
#define ERNIE_AVX512_TARGET ERNIE_BF16_TARGET

template <class E>
ERNIE_AVX512_TARGET inline void tile_gemm(int nv, Accum mode, int M, int kp, const E* A, int64_t a_rs, int64_t a_ks,
                                          const E* B, int64_t ldb, float* C, int64_t ldc,
                                          const float* row_scale = nullptr) {
  using W = typename Elem<E>::W;
  bf16k::gemm(nv, mode, M, kp, reinterpret_cast<const W*>(A), a_rs, a_ks, reinterpret_cast<const W*>(B), ldb, C, ldc,
              row_scale);
}

// Repacked operands of one call. Offsets below are in elements E; a k-step is P elements.
template <class E>
struct Packed {
  static constexpr int P = Elem<E>::P;
  int dp = 0, s_pad = 0, ncb = 0;
  int64_t head = 0;  // elements per head of every layout (s_pad * dp)
  std::vector<E> qn_, don_, kt_, vt_, krp_, vrp_, qrp_, dorp_;
  const E *qn = nullptr, *don = nullptr, *kt = nullptr, *vt = nullptr, *krp = nullptr, *vrp = nullptr,
          *qrp = nullptr, *dorp = nullptr;
};

// The pack_* loops are orphaned `omp for nowait`: called inside the caller's parallel region (one
// region per call: on a loaded machine every extra fork/join barrier costs time), their buffers
// allocated and zeroed beforehand by the caller (`alloc`).

// Row-major [S_pad][dp] copy of each head (zero padding).
template <class E>
void pack_natural(const FlashMaskParams& p, const void* src_, const int64_t* st, int heads, int dp, int s_pad,
                  std::vector<E>& dst) {
#pragma omp for schedule(static) nowait
  for (int64_t bh = 0; bh < int64_t(p.B) * heads; ++bh) {
    const int b = int(bh / heads), h = int(bh % heads);
    const E* src = static_cast<const E*>(src_) + b * st[0] + h * st[2];
    E* out = dst.data() + bh * s_pad * dp;
    for (int j = 0; j < p.S; ++j) std::copy(src + j * st[1], src + j * st[1] + p.D, out + int64_t(j) * dp);
  }
}

// Along d, tile-contiguous: element (cb, d / P, jj, d % P) = x[64 cb + jj][d].
template <class E>
void pack_t(const FlashMaskParams& p, const void* src_, const int64_t* st, int dp, int ncb, std::vector<E>& dst) {
  constexpr int P = Elem<E>::P;
  const int64_t head = int64_t(ncb) * kTile * dp;
#pragma omp for schedule(static) nowait
  for (int64_t bh = 0; bh < int64_t(p.B) * p.Hkv; ++bh) {
    const int b = int(bh / p.Hkv), h = int(bh % p.Hkv);
    const E* src = static_cast<const E*>(src_) + b * st[0] + h * st[2];
    E* out = dst.data() + bh * head;
    for (int j = 0; j < p.S; ++j) {
      E* tile = out + int64_t(j / kTile) * kTile * dp + (j % kTile) * P;
      const E* row = src + j * st[1];
      for (int d = 0; d < p.D; ++d) tile[(d / P) * P * kTile + d % P] = row[d];
    }
  }
}

// Along the sequence: word (j / 2, d) = (x[j][d], x[j + 1][d]) (bf16 only; fp32 uses pack_natural).
// Two rows at a time, 16 columns per step: zero-extend each to 32 bits, second row in the high half.
template <class E>
ERNIE_AVX512_TARGET void pack_rp(const FlashMaskParams& p, const void* src_, const int64_t* st, int heads, int dp,
                                 int s_pad, std::vector<E>& dst) {
  static_assert(sizeof(E) == 2, "pair packing is for bf16");
  const int64_t head = int64_t(s_pad) * dp;
#pragma omp for schedule(static) nowait
  for (int64_t bh = 0; bh < int64_t(p.B) * heads; ++bh) {
    const int b = int(bh / heads), h = int(bh % heads);
    const uint16_t* src = reinterpret_cast<const uint16_t*>(src_) + b * st[0] + h * st[2];
    uint32_t* out = reinterpret_cast<uint32_t*>(dst.data() + bh * head);
    for (int j = 0; j < p.S; j += 2) {
      const uint16_t* r0 = src + j * st[1];
      const uint16_t* r1 = j + 1 < p.S ? src + (j + 1) * st[1] : nullptr;
      uint32_t* o = out + int64_t(j / 2) * dp;
      for (int d = 0; d < p.D; d += 16) {
        const __mmask16 m = p.D - d >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (p.D - d)) - 1);
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r0 + d));
        const __m512i hi = r1 ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r1 + d)) : _mm512_setzero_si512();
        _mm512_mask_storeu_epi32(o + d, m, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
  }
}

template <class E>
void alloc(std::vector<E>& v, int64_t heads, const Packed<E>& pk) { v.assign(heads * pk.head, E(0)); }

// The sequence-paired layout (P = 2) or, for P = 1, the row-major one (`natural`, when given, is reused).
template <class E>
void pack_seq(const FlashMaskParams& p, const void* src, const int64_t* st, int heads, const Packed<E>& pk,
              const E* natural, std::vector<E>& storage) {
  if (Elem<E>::P == 1 && natural) return;
  if constexpr (Elem<E>::P == 1) {
    pack_natural(p, src, st, heads, pk.dp, pk.s_pad, storage);
  } else {
    pack_rp(p, src, st, heads, pk.dp, pk.s_pad, storage);
  }
}

int mask_head(const FlashMaskParams& p, int b, int hk) { return b * p.idx_heads + (p.idx_heads == 1 ? 0 : hk); }

// Largest first: task indices sorted by their number of visible tiles (descending, stable).
std::vector<int64_t> order_by_work(const std::vector<int>& work) {
  std::vector<int64_t> order(work.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return work[a] > work[b]; });
  return order;
}

ERNIE_AVX512_TARGET inline __mmask16 keep_mask(uint64_t row_key, int j0, uint32_t threshold) {
  const vint keep = dropout_keep16(row_key, j0, threshold);  // the one call into the dropout hash
  __m512i k;
  std::memcpy(&k, &keep, sizeof k);
  return _mm512_test_epi32_mask(k, k);
}

// 16 fp32 values stored as E (bf16: round to nearest even).
template <class E>
ERNIE_AVX512_TARGET inline void store16(E* dst, __m512 x) {
  if constexpr (std::is_same_v<E, float>) {
    _mm512_storeu_ps(dst, x);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), bf16k::cvt16(x));
  }
}

// 16 elements (masked tail) as fp32.
ERNIE_AVX512_TARGET inline __m512 load16f(const float* x, __mmask16 m) { return _mm512_maskz_loadu_ps(m, x); }
ERNIE_AVX512_TARGET inline __m512 load16f(const bf16* x, __mmask16 m) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// sum_d a[d] b[d] in fp32.
template <class T>
ERNIE_AVX512_TARGET float row_dot(const T* a, const T* b, int n) {
  __m512 acc = _mm512_setzero_ps();
  for (int d = 0; d < n; d += 16) {
    const __mmask16 m = n - d >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - d)) - 1);
    acc = _mm512_fmadd_ps(load16f(a + d, m), load16f(b + d, m), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// ---- forward -------------------------------------------------------------------------------------

template <class E>
struct FwdScratch {
  std::vector<float> s, acc, m, l, alpha;
  std::vector<E> pn;
  explicit FwdScratch(int dp) : s(kTile * kTile), acc(kTile * dp), m(kTile), l(kTile), alpha(kTile), pn(kTile * kTile) {}
};

// Scores (fp32, unscaled) of one tile -> online-softmax state and the probabilities pn (as E).
template <class E>
ERNIE_AVX512_TARGET void softmax_tile(const float* s, float sl, float* m, float* l, float* alpha, E* pn,
                                      const Dropout& drop, const uint64_t* row_keys, int c0) {
  const __m512 vsl = _mm512_set1_ps(sl);
  for (int r = 0; r < kTile; ++r) {
    __m512 x[4];
    __m512 mx = _mm512_set1_ps(-kInf);
    for (int v = 0; v < 4; ++v) {
      x[v] = _mm512_mul_ps(_mm512_loadu_ps(s + r * kTile + 16 * v), vsl);
      mx = _mm512_max_ps(mx, x[v]);
    }
    const float tile_max = _mm512_reduce_max_ps(mx);
    E* prow = pn + r * kTile;
    if (tile_max == -kInf) {  // nothing visible in this tile for this row: state unchanged
      std::fill(prow, prow + kTile, E(0));
      alpha[r] = 1.0f;
      continue;
    }
    const float m_new = std::max(m[r], tile_max);
    alpha[r] = m_new == m[r] ? 1.0f : std::exp2(m[r] - m_new);  // m = -inf (first visible tile) -> 0
    const __m512 vm = _mm512_set1_ps(m_new);
    __m512 sum = _mm512_setzero_ps();
    for (int v = 0; v < 4; ++v) {
      __m512 pv = bf16k::exp2_16(_mm512_sub_ps(x[v], vm));
      sum = _mm512_add_ps(sum, pv);
      if (drop.on) pv = _mm512_maskz_mov_ps(keep_mask(row_keys[r], c0 + 16 * v, drop.threshold), pv);
      store16(prow + 16 * v, pv);
    }
    l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);
    m[r] = m_new;
  }
}

template <class E>
ERNIE_AVX512_TARGET void fwd_task(const FlashMaskParams& p, const ColumnMask& cm, const Packed<E>& pk,
                                  const Dropout& drop, int b, int h, int rb, FwdScratch<E>& w) {
  using T = typename Elem<E>::T;
  constexpr int P = Elem<E>::P;
  const int dp = pk.dp, nvd = dp / 16, kd = dp / P, kn = kTile / P;
  const int hk = h / (p.Hq / p.Hkv), bm = mask_head(p, b, hk);
  const int r0 = rb * kTile, nr = std::min(kTile, p.S - r0);
  const E* q = pk.qn + (int64_t(b) * p.Hq + h) * pk.head + int64_t(r0) * dp;
  const E* kt = pk.kt + (int64_t(b) * p.Hkv + hk) * pk.head;
  const E* vrp = pk.vrp + (int64_t(b) * p.Hkv + hk) * pk.head;
  const float sl = p.scale * kLog2e;
  std::fill(w.m.begin(), w.m.end(), -kInf);
  std::fill(w.l.begin(), w.l.end(), 0.f);
  std::fill(w.acc.begin(), w.acc.end(), 0.f);
  uint64_t row_keys[kTile] = {};
  if (drop.on) drop.row_keys(b, h, r0, nr, row_keys);
  for (int cb = 0; cb < pk.ncb; ++cb) {
    const TileKind kind = cm.classify(bm, r0, r0 + nr, cb);
    if (kind == TileKind::kMasked) continue;
    const int c0 = cb * kTile;
    tile_gemm<E>(4, Accum::kOverwrite, kTile, kd, q, kd, 1, kt + int64_t(cb) * kTile * dp, kTile, w.s.data(),
                 kTile);  // S = Q K^T
    if (kind == TileKind::kPartial) mask_tile(w.s.data(), nr, r0, c0, cm, bm);
    softmax_tile<E>(w.s.data(), sl, w.m.data(), w.l.data(), w.alpha.data(), w.pn.data(), drop, row_keys, c0);
    tile_gemm<E>(nvd, Accum::kScaleAdd, kTile, kn, w.pn.data(), kn, 1, vrp + int64_t(c0) * dp, dp, w.acc.data(), dp,
                 w.alpha.data());  // O = alpha O + P V
  }
  T* out = static_cast<T*>(p.out) + b * p.o_stride[0] + r0 * p.o_stride[1] + h * p.o_stride[2];
  float* lse = p.lse + (int64_t(b) * p.Hq + h) * p.S + r0;
  for (int r = 0; r < nr; ++r) {
    const bool empty = w.l[r] == 0.f;  // the row sees no column: output 0, lse = -inf
    const float norm = drop.on ? drop.rescale / w.l[r] : 1.0f / w.l[r];
    store_row(w.acc.data() + r * dp, out + r * p.o_stride[1], p.D, empty ? 0.f : norm);
    lse[r] = empty ? -kInf : (w.m[r] + std::log2(w.l[r])) * kLn2;
  }
}

// ---- backward ------------------------------------------------------------------------------------

template <class E>
struct BwdScratch {
  std::vector<float> s, dpt, dk, dv;
  std::vector<E> pt, dst, dsn;
  explicit BwdScratch(int dp)
      : s(kTile * kTile), dpt(kTile * kTile), dk(kTile * dp), dv(kTile * dp), pt(kTile * kTile),
        dst(kTile * kTile), dsn(Elem<E>::P == 2 ? kTile * kTile : 0) {}
};

// P and dS of one tile from the scores s and dP = dO V^T (fp32), as A operands: P^T and dS^T for
// P^T dO and dS^T Q (read with a_rs = 1, a_ks = 64 k-steps), dS row-major for dS K. bf16: P^T and
// dS^T as pair words along the rows, dS row-major in dsn; fp32: P and dS row-major serve both ways.
template <class E>
ERNIE_AVX512_TARGET void grads_tile(const float* s, const float* dpt, float sl, const float* lse2, const float* delta,
                                    const Dropout& drop, const uint64_t* row_keys, int c0, E* pt, E* dst, E* dsn) {
  const __m512 vsl = _mm512_set1_ps(sl);
  const __m512 vresc = _mm512_set1_ps(drop.rescale);
  for (int r = 0; r < kTile; r += 2) {
    for (int v = 0; v < 4; ++v) {
      __m512 pr[2], dsr[2];
      for (int e = 0; e < 2; ++e) {
        const int row = r + e, off = row * kTile + 16 * v;
        const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(s + off), vsl, _mm512_set1_ps(lse2[row]));
        const __m512 pv = bf16k::exp2_16(x);
        __m512 dpv = _mm512_loadu_ps(dpt + off);
        if (drop.on) {
          const __mmask16 keep = keep_mask(row_keys[row], c0 + 16 * v, drop.threshold);
          pr[e] = _mm512_maskz_mov_ps(keep, pv);
          dpv = _mm512_maskz_mul_ps(keep, dpv, vresc);
        } else {
          pr[e] = pv;
        }
        dsr[e] = _mm512_mul_ps(pv, _mm512_sub_ps(dpv, _mm512_set1_ps(delta[row])));
        if constexpr (std::is_same_v<E, float>) {
          _mm512_storeu_ps(pt + off, pr[e]);
          _mm512_storeu_ps(dst + off, dsr[e]);
        } else {
          store16(dsn + off, dsr[e]);
        }
      }
      if constexpr (!std::is_same_v<E, float>) {
        const int64_t word = int64_t(r / 2) * kTile + 16 * v;  // (k-step r / 2, column)
        _mm512_storeu_si512(pt + 2 * word, bf16k::interleave_pairs(pr[0], pr[1]));
        _mm512_storeu_si512(dst + 2 * word, bf16k::interleave_pairs(dsr[0], dsr[1]));
      }
    }
  }
}

template <class E>
ERNIE_AVX512_TARGET void bwd_task(const FlashMaskParams& p, const ColumnMask& cm, const Packed<E>& pk,
                                  const std::vector<float>& delta, const Dropout& drop, int b, int hk, int cb,
                                  float* dq_acc, BwdScratch<E>& w) {
  using T = typename Elem<E>::T;
  constexpr int P = Elem<E>::P;
  const int dp = pk.dp, nvd = dp / 16, kd = dp / P, kn = kTile / P, group = p.Hq / p.Hkv, nrb = pk.ncb;
  const int bm = mask_head(p, b, hk), c0 = cb * kTile, nc = std::min(kTile, p.S - c0);
  const int64_t bhk = int64_t(b) * p.Hkv + hk;
  const E* kt = pk.kt + bhk * pk.head + int64_t(cb) * kTile * dp;
  const E* vt = pk.vt + bhk * pk.head + int64_t(cb) * kTile * dp;
  const E* krp = pk.krp + bhk * pk.head + int64_t(c0) * dp;
  const E* dsn = P == 2 ? w.dsn.data() : w.dst.data();
  const float sl = p.scale * kLog2e;
  std::fill(w.dk.begin(), w.dk.end(), 0.f);
  std::fill(w.dv.begin(), w.dv.end(), 0.f);
  float lse2[kTile], dl[kTile];
  uint64_t row_keys[kTile] = {};
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const int64_t bh = int64_t(b) * p.Hq + h;
    for (int rb = 0; rb < nrb; ++rb) {
      const int r0 = rb * kTile, nr = std::min(kTile, p.S - r0);
      const TileKind kind = cm.classify(bm, r0, r0 + nr, cb);
      if (kind == TileKind::kMasked) continue;
      const E* qn = pk.qn + bh * pk.head + int64_t(r0) * dp;
      const E* don = pk.don + bh * pk.head + int64_t(r0) * dp;
      const E* qrp = pk.qrp + bh * pk.head + int64_t(r0) * dp;
      const E* dorp = pk.dorp + bh * pk.head + int64_t(r0) * dp;
      const int64_t row_base = bh * p.S + r0;
      for (int r = 0; r < kTile; ++r) {
        // +inf makes P exactly 0: rows that saw nothing (lse = -inf) and padding rows.
        const float lse = r < nr ? p.lse[row_base + r] : -kInf;
        lse2[r] = lse == -kInf ? kInf : lse * kLog2e;
        dl[r] = r < nr ? delta[row_base + r] : 0.f;
      }
      if (drop.on) drop.row_keys(b, h, r0, nr, row_keys);
      tile_gemm<E>(4, Accum::kOverwrite, kTile, kd, qn, kd, 1, kt, kTile, w.s.data(), kTile);     // S = Q K^T
      tile_gemm<E>(4, Accum::kOverwrite, kTile, kd, don, kd, 1, vt, kTile, w.dpt.data(), kTile);  // dP = dO V^T
      if (kind == TileKind::kPartial) mask_tile(w.s.data(), nr, r0, c0, cm, bm);
      grads_tile<E>(w.s.data(), w.dpt.data(), sl, lse2, dl, drop, row_keys, c0, w.pt.data(), w.dst.data(),
                    w.dsn.data());
      tile_gemm<E>(nvd, Accum::kAdd, kTile, kn, w.pt.data(), 1, kTile, dorp, dp, w.dv.data(), dp);   // dV += P^T dO
      tile_gemm<E>(nvd, Accum::kAdd, kTile, kn, w.dst.data(), 1, kTile, qrp, dp, w.dk.data(), dp);  // dK += dS^T Q
      tile_gemm<E>(nvd, Accum::kAdd, kTile, kn, dsn, kn, 1, krp, dp, dq_acc + (bh * pk.s_pad + r0) * dp,
                   dp);  // dQ += dS K
    }
  }
  T* dkp = static_cast<T*>(p.dk) + b * p.dk_stride[0] + c0 * p.dk_stride[1] + hk * p.dk_stride[2];
  T* dvp = static_cast<T*>(p.dv) + b * p.dv_stride[0] + c0 * p.dv_stride[1] + hk * p.dv_stride[2];
  for (int c = 0; c < nc; ++c) {
    store_row(w.dk.data() + c * dp, dkp + c * p.dk_stride[1], p.D, p.scale);
    store_row(w.dv.data() + c * dp, dvp + c * p.dv_stride[1], p.D, drop.on ? drop.rescale : 1.0f);
  }
}

template <class E>
void init_layout(const FlashMaskParams& p, Packed<E>& pk) {
  pk.dp = round_up16(p.D);
  pk.ncb = (p.S + kTile - 1) / kTile;
  pk.s_pad = pk.ncb * kTile;
  pk.head = int64_t(pk.s_pad) * pk.dp;
}

// Visible tiles of each (mask head, block): by row block (rows = true) or by key block.
std::vector<int> visible_tiles(const FlashMaskParams& p, const ColumnMask& cm, int nblocks, bool rows) {
  const int nbm = p.B * p.idx_heads;
  std::vector<int> tiles(int64_t(nbm) * nblocks, 0);
  for (int bm = 0; bm < nbm; ++bm)
    for (int x = 0; x < nblocks; ++x)
      for (int y = 0; y < nblocks; ++y) {
        const int rb = rows ? x : y, cb = rows ? y : x;
        tiles[int64_t(bm) * nblocks + x] +=
            cm.classify(bm, rb * kTile, std::min(p.S, rb * kTile + kTile), cb) != TileKind::kMasked;
      }
  return tiles;
}

template <class E>
void fwd(const FlashMaskParams& p) {
  const ColumnMask cm(p);
  const Dropout drop(p);
  Packed<E> pk;
  init_layout(p, pk);
  alloc(pk.qn_, int64_t(p.B) * p.Hq, pk);
  alloc(pk.kt_, int64_t(p.B) * p.Hkv, pk);
  alloc(pk.vrp_, int64_t(p.B) * p.Hkv, pk);
  pk.qn = pk.qn_.data(), pk.kt = pk.kt_.data(), pk.vrp = pk.vrp_.data();
  const int nrb = pk.ncb;
  const std::vector<int> tiles = visible_tiles(p, cm, nrb, true);
  const int64_t tasks = int64_t(p.B) * p.Hq * nrb;
  std::vector<int> work(tasks);
  for (int64_t t = 0; t < tasks; ++t) {
    const int rb = int(t % nrb), h = int((t / nrb) % p.Hq), b = int(t / (int64_t(nrb) * p.Hq));
    work[t] = tiles[int64_t(mask_head(p, b, h / (p.Hq / p.Hkv))) * nrb + rb];
  }
  const std::vector<int64_t> order = order_by_work(work);
#pragma omp parallel num_threads(p.num_threads)
  {
    pack_natural<E>(p, p.q, p.q_stride, p.Hq, pk.dp, pk.s_pad, pk.qn_);
    pack_t<E>(p, p.k, p.k_stride, pk.dp, pk.ncb, pk.kt_);
    pack_seq<E>(p, p.v, p.v_stride, p.Hkv, pk, nullptr, pk.vrp_);
    FwdScratch<E> w(pk.dp);
#pragma omp barrier
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < tasks; ++i) {
      const int64_t t = order[i];
      const int rb = int(t % nrb), h = int((t / nrb) % p.Hq), b = int(t / (int64_t(nrb) * p.Hq));
      fwd_task<E>(p, cm, pk, drop, b, h, rb, w);
    }
  }
}

template <class E>
void bwd(const FlashMaskParams& p) {
  using T = typename Elem<E>::T;
  constexpr int P = Elem<E>::P;
  const ColumnMask cm(p);
  const Dropout drop(p);
  Packed<E> pk;
  init_layout(p, pk);
  const int64_t nq = int64_t(p.B) * p.Hq, nkv = int64_t(p.B) * p.Hkv;
  alloc(pk.qn_, nq, pk), alloc(pk.don_, nq, pk), alloc(pk.kt_, nkv, pk), alloc(pk.vt_, nkv, pk);
  alloc(pk.krp_, nkv, pk);
  if (P == 2) alloc(pk.qrp_, nq, pk), alloc(pk.dorp_, nq, pk);
  pk.qn = pk.qn_.data(), pk.don = pk.don_.data(), pk.kt = pk.kt_.data(), pk.vt = pk.vt_.data();
  pk.krp = pk.krp_.data();
  pk.qrp = P == 2 ? pk.qrp_.data() : pk.qn;
  pk.dorp = P == 2 ? pk.dorp_.data() : pk.don;
  const int64_t rows = nq * p.S;
  std::vector<float> delta(rows);
  const int ncb = pk.ncb, group = p.Hq / p.Hkv;
  const std::vector<int> tiles = visible_tiles(p, cm, ncb, false);
  const int64_t tasks = nkv * ncb;
  std::vector<int> work(tasks);
  for (int64_t t = 0; t < tasks; ++t) {
    const int cb = int(t % ncb), hk = int((t / ncb) % p.Hkv), b = int(t / (int64_t(ncb) * p.Hkv));
    work[t] = tiles[int64_t(mask_head(p, b, hk)) * ncb + cb] * group;
  }
  const std::vector<int64_t> order = order_by_work(work);
  const int nthreads = int(std::max<int64_t>(1, std::min<int64_t>(p.num_threads, tasks)));
  const int64_t dq_size = nq * pk.head;
  std::vector<std::vector<float>> dq_acc(nthreads);
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = omp_get_thread_num();
    pack_natural<E>(p, p.q, p.q_stride, p.Hq, pk.dp, pk.s_pad, pk.qn_);
    pack_natural<E>(p, p.dout, p.do_stride, p.Hq, pk.dp, pk.s_pad, pk.don_);
    pack_seq<E>(p, p.q, p.q_stride, p.Hq, pk, pk.qn, pk.qrp_);
    pack_seq<E>(p, p.dout, p.do_stride, p.Hq, pk, pk.don, pk.dorp_);
    pack_t<E>(p, p.k, p.k_stride, pk.dp, pk.ncb, pk.kt_);
    pack_t<E>(p, p.v, p.v_stride, pk.dp, pk.ncb, pk.vt_);
    pack_seq<E>(p, p.k, p.k_stride, p.Hkv, pk, nullptr, pk.krp_);
    // delta = rowsum(dO * O) - dlse, fp32.
#pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < rows; ++t) {
      const int i = int(t % p.S), h = int((t / p.S) % p.Hq), b = int(t / (int64_t(p.S) * p.Hq));
      const T* o = static_cast<const T*>(p.out) + b * p.o_stride[0] + i * p.o_stride[1] + h * p.o_stride[2];
      const T* g = static_cast<const T*>(p.dout) + b * p.do_stride[0] + i * p.do_stride[1] + h * p.do_stride[2];
      delta[t] = row_dot(o, g, p.D) - (p.dlse ? p.dlse[t] : 0.f);
    }
    dq_acc[tid].assign(dq_size, 0.f);  // first touch by its own thread
    BwdScratch<E> w(pk.dp);
#pragma omp barrier
    // Static round-robin over the largest-first order (not dynamic): which thread's dQ buffer a
    // unit adds to must not depend on timing, so that dQ is bitwise reproducible.
#pragma omp for schedule(static, 1)
    for (int64_t i = 0; i < tasks; ++i) {
      const int64_t t = order[i];
      const int cb = int(t % ncb), hk = int((t / ncb) % p.Hkv), b = int(t / (int64_t(ncb) * p.Hkv));
      bwd_task<E>(p, cm, pk, delta, drop, b, hk, cb, dq_acc[tid].data(), w);
    }
    // dQ = scale * (sum of the threads' partial sums), rows split between threads.
#pragma omp for schedule(static)
    for (int64_t t = 0; t < rows; ++t) {
      const int i = int(t % p.S), h = int((t / p.S) % p.Hq), b = int(t / (int64_t(p.S) * p.Hq));
      const int64_t off = (int64_t(b) * p.Hq + h) * pk.head + int64_t(i) * pk.dp;
      float* acc = dq_acc[tid].data() + off;
      for (int th = 0; th < nthreads; ++th) {
        if (th == tid || dq_acc[th].empty()) continue;  // empty: a thread the runtime did not start
        const float* other = dq_acc[th].data() + off;
        for (int d = 0; d < p.D; ++d) acc[d] += other[d];
      }
      T* dq = static_cast<T*>(p.dq) + b * p.dq_stride[0] + i * p.dq_stride[1] + h * p.dq_stride[2];
      store_row(acc, dq, p.D, p.scale);
    }
  }
}

}  // namespace

void flashmask_fwd_avx512(const FlashMaskParams& p) {
  p.dtype == DType::kBFloat16 ? fwd<uint16_t>(p) : fwd<float>(p);
}

void flashmask_bwd_avx512(const FlashMaskParams& p) {
  p.dtype == DType::kBFloat16 ? bwd<uint16_t>(p) : bwd<float>(p);
}

}  // namespace ernie_cpu
