// FlashMask attention, bf16 inputs, in bf16 arithmetic: every tile GEMM takes bf16 operands and
// accumulates in fp32 on AVX512-BF16 (`vdpbf16ps`, bf16_gemm.h); softmax, the mask, dropout and
// the running statistics stay fp32. Chosen at run time (flashmask_bf16_usable) by flashmask_fwd /
// flashmask_bwd for bf16 tensors on CPUs that have the instructions; the portable fp32-arithmetic
// path (flashmask_fwd.cpp / flashmask_bwd.cpp) serves every other case.
//
// Operands are repacked once per call (O(S * D) each, never S x S), tile-contiguous:
//   Qn, dOn   [B][Hq][S_pad][dp]        row-major bf16 (A operands: rows of Q . K^T, dO . V^T);
//   Kt, Vt    [B][Hkv][ncb][dp/2][64]   pair words along d (B operands of Q . K^T, dO . V^T);
//   Krp, Vrp  [B][Hkv][S_pad/2][dp]     pair words along the sequence (B of P V and dS K);
//   Qrp, dOrp [B][Hq][S_pad/2][dp]      pair words along the sequence (B of P^T dO and dS^T Q).
// dp = D rounded up to 16; padding is zero (padded key columns are masked by ColumnMask, padded
// query rows are never stored and contribute P = dS = 0 in backward).
//
// Forward (FlashAttention-2 online softmax in base 2, as the portable path): one task per
// (batch, query head, row block); S = Q K^T, then scores * scale * log2e, mask, P = exp2(s - m)
// rounded to bf16, O = alpha O + P V in one GEMM (the rescale is folded into the accumulator load).
// Backward in one pass per (batch, kv head, key block): for every query head of the group and every
// visible row block, S and dP = dO V^T are recomputed, P = exp2(s - lse2), dS = P (dP - delta), then
// dV += P^T dO, dK += dS^T Q stay in the task's tile and dQ += dS K goes to the thread's own fp32
// dQ buffer; the buffers are summed at the end (no atomics; memory threads x B Hq S dp fp32).
// Tasks of both passes run largest first by their number of visible tiles, not rows.
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <numeric>
#include <vector>

#include "bf16_gemm.h"
#include "flashmask.h"

// GCC 12 flags its own _mm512_reduce_* expansions (_mm512_undefined_* operands) as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace ernie_cpu {

bool flashmask_bf16_usable() {
  static const bool has = bf16k::cpu_has_avx512_bf16();
  // ERNIE_CORE_FLASHMASK_PORTABLE=1 forces the portable path (tests run both on one machine).
  const char* force = std::getenv("ERNIE_CORE_FLASHMASK_PORTABLE");
  return has && !(force && force[0] == '1');
}

namespace {

using bf16k::Accum;

constexpr int kTile = 64;  // rows and columns per tile (kBlockM = kBlockN)
static_assert(kBlockM == kTile && kBlockN == kTile, "the bf16 path assumes square 64 tiles");

// Repacked operands of one call (uint16 = bf16 bits, uint32 = a pair of them).
struct Packed {
  int dp = 0, s_pad = 0, ncb = 0;
  int64_t qn_head = 0, rp_head = 0, t_head = 0;  // elements (uint16) per head of each layout
  std::vector<uint16_t> qn, don, kt, vt, krp, vrp, qrp, dorp;
  const uint32_t* w(const std::vector<uint16_t>& v, int64_t head, int64_t stride) const {
    return reinterpret_cast<const uint32_t*>(v.data() + head * stride);
  }
};

const uint16_t* bits(const void* p) { return static_cast<const uint16_t*>(p); }

// Row-major [S_pad][dp] copy of each head (zero padding).
void pack_natural(const FlashMaskParams& p, const void* src_, const int64_t* st, int heads, int dp, int s_pad,
                  std::vector<uint16_t>& dst) {
  dst.assign(int64_t(p.B) * heads * s_pad * dp, 0);
#pragma omp parallel for num_threads(p.num_threads) schedule(static)
  for (int64_t bh = 0; bh < int64_t(p.B) * heads; ++bh) {
    const int b = int(bh / heads), h = int(bh % heads);
    const uint16_t* src = bits(src_) + b * st[0] + h * st[2];
    uint16_t* out = dst.data() + bh * s_pad * dp;
    for (int j = 0; j < p.S; ++j) std::copy(src + j * st[1], src + j * st[1] + p.D, out + int64_t(j) * dp);
  }
}

// Pair words along d, tile-contiguous: word (cb, kp, jj) = (x[j][2kp], x[j][2kp + 1]), j = 64 cb + jj.
void pack_t(const FlashMaskParams& p, const void* src_, const int64_t* st, int dp, int ncb,
            std::vector<uint16_t>& dst) {
  const int64_t head = int64_t(ncb) * kTile * dp;
  dst.assign(int64_t(p.B) * p.Hkv * head, 0);
#pragma omp parallel for num_threads(p.num_threads) schedule(static)
  for (int64_t bh = 0; bh < int64_t(p.B) * p.Hkv; ++bh) {
    const int b = int(bh / p.Hkv), h = int(bh % p.Hkv);
    const uint16_t* src = bits(src_) + b * st[0] + h * st[2];
    uint16_t* out = dst.data() + bh * head;
    for (int j = 0; j < p.S; ++j) {
      uint16_t* tile = out + int64_t(j / kTile) * kTile * dp;
      const int jj = j % kTile;
      const uint16_t* row = src + j * st[1];
      for (int d = 0; d < p.D; ++d) tile[(d / 2) * 2 * kTile + jj * 2 + (d & 1)] = row[d];
    }
  }
}

// Pair words along the sequence: word (jp, d) = (x[2jp][d], x[2jp + 1][d]).
void pack_rp(const FlashMaskParams& p, const void* src_, const int64_t* st, int heads, int dp, int s_pad,
             std::vector<uint16_t>& dst) {
  const int64_t head = int64_t(s_pad) * dp;
  dst.assign(int64_t(p.B) * heads * head, 0);
#pragma omp parallel for num_threads(p.num_threads) schedule(static)
  for (int64_t bh = 0; bh < int64_t(p.B) * heads; ++bh) {
    const int b = int(bh / heads), h = int(bh % heads);
    const uint16_t* src = bits(src_) + b * st[0] + h * st[2];
    uint16_t* out = dst.data() + bh * head;
    for (int j = 0; j < p.S; ++j) {
      const uint16_t* row = src + j * st[1];
      uint16_t* o = out + int64_t(j / 2) * 2 * dp + (j & 1);
      for (int d = 0; d < p.D; ++d) o[2 * d] = row[d];
    }
  }
}

int mask_head(const FlashMaskParams& p, int b, int hk) { return b * p.idx_heads + (p.idx_heads == 1 ? 0 : hk); }

// Largest first: tasks sorted by their number of visible tiles (descending, stable).
std::vector<int64_t> order_by_work(const std::vector<int>& work) {
  std::vector<int64_t> order(work.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return work[a] > work[b]; });
  return order;
}

ERNIE_BF16_TARGET inline __mmask16 keep_mask(uint64_t row_key, int j0, uint32_t threshold) {
  const vint keep = dropout_keep16(row_key, j0, threshold);  // the one call into the dropout hash
  __m512i k;
  std::memcpy(&k, &keep, sizeof k);
  return _mm512_test_epi32_mask(k, k);
}

ERNIE_BF16_TARGET inline float hmax16(__m512 x) { return _mm512_reduce_max_ps(x); }

// ---- forward -------------------------------------------------------------------------------------

struct FwdScratch {
  std::vector<float> s, acc, m, l, alpha;
  std::vector<uint16_t> pn;
  explicit FwdScratch(int dp)
      : s(kTile * kTile), acc(kTile * dp), m(kTile), l(kTile), alpha(kTile), pn(kTile * kTile) {}
};

// Scores (fp32, unscaled) of one tile -> online-softmax state and bf16 probabilities pn.
ERNIE_BF16_TARGET void softmax_tile(const float* s, float sl, float* m, float* l, float* alpha, uint16_t* pn,
                                    const Dropout& drop, const uint64_t* row_keys, int c0) {
  const __m512 vsl = _mm512_set1_ps(sl);
  for (int r = 0; r < kTile; ++r) {
    __m512 x[4];
    __m512 mx = _mm512_set1_ps(-kInf);
    for (int v = 0; v < 4; ++v) {
      x[v] = _mm512_mul_ps(_mm512_loadu_ps(s + r * kTile + 16 * v), vsl);
      mx = _mm512_max_ps(mx, x[v]);
    }
    const float tile_max = hmax16(mx);
    uint16_t* prow = pn + r * kTile;
    if (tile_max == -kInf) {  // nothing visible in this tile for this row: state unchanged
      std::fill(prow, prow + kTile, uint16_t(0));
      alpha[r] = 1.0f;
      continue;
    }
    const float m_new = std::max(m[r], tile_max);
    alpha[r] = std::exp2(m[r] - m_new);  // m = -inf (first visible tile) -> 0
    const __m512 vm = _mm512_set1_ps(m_new);
    __m512 sum = _mm512_setzero_ps();
    for (int v = 0; v < 4; ++v) {
      __m512 pv = bf16k::exp2_16(_mm512_sub_ps(x[v], vm));
      sum = _mm512_add_ps(sum, pv);
      if (drop.on) pv = _mm512_maskz_mov_ps(keep_mask(row_keys[r], c0 + 16 * v, drop.threshold), pv);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(prow + 16 * v), bf16k::cvt16(pv));
    }
    l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);
    m[r] = m_new;
  }
}

ERNIE_BF16_TARGET void fwd_task(const FlashMaskParams& p, const ColumnMask& cm, const Packed& pk, const Dropout& drop,
                                int b, int h, int rb, FwdScratch& w) {
  const int dp = pk.dp, nvd = dp / 16, kpd = dp / 2;
  const int hk = h / (p.Hq / p.Hkv), bm = mask_head(p, b, hk);
  const int r0 = rb * kTile, nr = std::min(kTile, p.S - r0);
  const uint32_t* q = pk.w(pk.qn, int64_t(b) * p.Hq + h, pk.qn_head) + int64_t(r0) * kpd;
  const uint32_t* kt = pk.w(pk.kt, int64_t(b) * p.Hkv + hk, pk.t_head);
  const uint32_t* vrp = pk.w(pk.vrp, int64_t(b) * p.Hkv + hk, pk.rp_head);
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
    bf16k::gemm(4, Accum::kOverwrite, kTile, kpd, q, kpd, 1, kt + int64_t(cb) * kpd * kTile, kTile, w.s.data(),
                kTile);  // S = Q K^T
    if (kind == TileKind::kPartial) mask_tile(w.s.data(), nr, r0, c0, cm, bm);
    softmax_tile(w.s.data(), sl, w.m.data(), w.l.data(), w.alpha.data(), w.pn.data(), drop, row_keys, c0);
    bf16k::gemm(nvd, Accum::kScaleAdd, kTile, kTile / 2, reinterpret_cast<const uint32_t*>(w.pn.data()), kTile / 2,
                1, vrp + int64_t(c0 / 2) * dp, dp, w.acc.data(), dp, w.alpha.data());  // O = alpha O + P V
  }
  bf16* out = static_cast<bf16*>(p.out) + b * p.o_stride[0] + r0 * p.o_stride[1] + h * p.o_stride[2];
  float* lse = p.lse + (int64_t(b) * p.Hq + h) * p.S + r0;
  for (int r = 0; r < nr; ++r) {
    const bool empty = w.l[r] == 0.f;  // the row sees no column: output 0, lse = -inf
    const float norm = drop.on ? drop.rescale / w.l[r] : 1.0f / w.l[r];
    store_row(w.acc.data() + r * dp, out + r * p.o_stride[1], p.D, empty ? 0.f : norm);
    lse[r] = empty ? -kInf : (w.m[r] + std::log2(w.l[r])) * kLn2;
  }
}

// ---- backward ------------------------------------------------------------------------------------

struct BwdScratch {
  std::vector<float> s, dpt, dk, dv;
  std::vector<uint16_t> pt, dst, dsn;
  explicit BwdScratch(int dp)
      : s(kTile * kTile), dpt(kTile * kTile), dk(kTile * dp), dv(kTile * dp), pt(kTile * kTile),
        dst(kTile * kTile), dsn(kTile * kTile) {}
};

// P and dS of one tile from the scores s and dP = dO V^T (fp32): P^T and dS^T as pair words along
// the rows (A operands of P^T dO and dS^T Q), dS row-major (A of dS K). Row pairs at a time.
ERNIE_BF16_TARGET void grads_tile(const float* s, const float* dpt, float sl, const float* lse2, const float* delta,
                                  const Dropout& drop, const uint64_t* row_keys, int c0, uint16_t* pt, uint16_t* dst,
                                  uint16_t* dsn) {
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
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dsn + off), bf16k::cvt16(dsr[e]));
      }
      const int64_t word = int64_t(r / 2) * kTile + 16 * v;  // (kp = r / 2, m = column)
      _mm512_storeu_si512(pt + 2 * word, bf16k::interleave_pairs(pr[0], pr[1]));
      _mm512_storeu_si512(dst + 2 * word, bf16k::interleave_pairs(dsr[0], dsr[1]));
    }
  }
}

ERNIE_BF16_TARGET void bwd_task(const FlashMaskParams& p, const ColumnMask& cm, const Packed& pk,
                                const std::vector<float>& delta, const Dropout& drop, int b, int hk, int cb,
                                float* dq_acc, BwdScratch& w) {
  const int dp = pk.dp, nvd = dp / 16, kpd = dp / 2, group = p.Hq / p.Hkv, nrb = pk.s_pad / kTile;
  const int bm = mask_head(p, b, hk), c0 = cb * kTile, nc = std::min(kTile, p.S - c0);
  const int64_t bhk = int64_t(b) * p.Hkv + hk;
  const uint32_t* kt = pk.w(pk.kt, bhk, pk.t_head) + int64_t(cb) * kpd * kTile;
  const uint32_t* vt = pk.w(pk.vt, bhk, pk.t_head) + int64_t(cb) * kpd * kTile;
  const uint32_t* krp = pk.w(pk.krp, bhk, pk.rp_head) + int64_t(c0 / 2) * dp;
  const float sl = p.scale * kLog2e;
  std::fill(w.dk.begin(), w.dk.end(), 0.f);
  std::fill(w.dv.begin(), w.dv.end(), 0.f);
  float lse2[kTile], dl[kTile];
  uint64_t row_keys[kTile] = {};
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const int64_t bh = int64_t(b) * p.Hq + h;
    for (int rb = 0; rb < nrb; ++rb) {
      const int r0 = rb * kTile, nr = std::min(kTile, p.S - r0);
      if (nr <= 0) break;
      const TileKind kind = cm.classify(bm, r0, r0 + nr, cb);
      if (kind == TileKind::kMasked) continue;
      const uint32_t* qn = pk.w(pk.qn, bh, pk.qn_head) + int64_t(r0) * kpd;
      const uint32_t* don = pk.w(pk.don, bh, pk.qn_head) + int64_t(r0) * kpd;
      const uint32_t* qrp = pk.w(pk.qrp, bh, pk.rp_head) + int64_t(r0 / 2) * dp;
      const uint32_t* dorp = pk.w(pk.dorp, bh, pk.rp_head) + int64_t(r0 / 2) * dp;
      const int64_t row_base = bh * p.S + r0;
      for (int r = 0; r < kTile; ++r) {
        // +inf makes P exactly 0: rows that saw nothing (lse = -inf) and padding rows.
        const float lse = r < nr ? p.lse[row_base + r] : -kInf;
        lse2[r] = lse == -kInf ? kInf : lse * kLog2e;
        dl[r] = r < nr ? delta[row_base + r] : 0.f;
      }
      if (drop.on) drop.row_keys(b, h, r0, nr, row_keys);
      bf16k::gemm(4, Accum::kOverwrite, kTile, kpd, qn, kpd, 1, kt, kTile, w.s.data(), kTile);     // S = Q K^T
      bf16k::gemm(4, Accum::kOverwrite, kTile, kpd, don, kpd, 1, vt, kTile, w.dpt.data(), kTile);  // dP = dO V^T
      if (kind == TileKind::kPartial) mask_tile(w.s.data(), nr, r0, c0, cm, bm);
      grads_tile(w.s.data(), w.dpt.data(), sl, lse2, dl, drop, row_keys, c0, w.pt.data(), w.dst.data(),
                 w.dsn.data());
      const uint32_t* pt = reinterpret_cast<const uint32_t*>(w.pt.data());
      const uint32_t* dst = reinterpret_cast<const uint32_t*>(w.dst.data());
      const uint32_t* dsn = reinterpret_cast<const uint32_t*>(w.dsn.data());
      bf16k::gemm(nvd, Accum::kAdd, kTile, kTile / 2, pt, 1, kTile, dorp, dp, w.dv.data(), dp);   // dV += P^T dO
      bf16k::gemm(nvd, Accum::kAdd, kTile, kTile / 2, dst, 1, kTile, qrp, dp, w.dk.data(), dp);   // dK += dS^T Q
      bf16k::gemm(nvd, Accum::kAdd, kTile, kTile / 2, dsn, kTile / 2, 1, krp, dp,
                  dq_acc + (bh * pk.s_pad + r0) * dp, dp);  // dQ += dS K
    }
  }
  bf16* dkp = static_cast<bf16*>(p.dk) + b * p.dk_stride[0] + c0 * p.dk_stride[1] + hk * p.dk_stride[2];
  bf16* dvp = static_cast<bf16*>(p.dv) + b * p.dv_stride[0] + c0 * p.dv_stride[1] + hk * p.dv_stride[2];
  for (int c = 0; c < nc; ++c) {
    store_row(w.dk.data() + c * dp, dkp + c * p.dk_stride[1], p.D, p.scale);
    store_row(w.dv.data() + c * dp, dvp + c * p.dv_stride[1], p.D, drop.on ? drop.rescale : 1.0f);
  }
}

void init_layout(const FlashMaskParams& p, Packed& pk) {
  pk.dp = round_up16(p.D);
  pk.ncb = (p.S + kTile - 1) / kTile;
  pk.s_pad = pk.ncb * kTile;
  pk.qn_head = int64_t(pk.s_pad) * pk.dp;
  pk.rp_head = int64_t(pk.s_pad) * pk.dp;
  pk.t_head = int64_t(pk.ncb) * kTile * pk.dp;
}

}  // namespace

void flashmask_fwd_bf16(const FlashMaskParams& p) {
  const ColumnMask cm(p);
  const Dropout drop(p);
  Packed pk;
  init_layout(p, pk);
  pack_natural(p, p.q, p.q_stride, p.Hq, pk.dp, pk.s_pad, pk.qn);
  pack_t(p, p.k, p.k_stride, pk.dp, pk.ncb, pk.kt);
  pack_rp(p, p.v, p.v_stride, p.Hkv, pk.dp, pk.s_pad, pk.vrp);
  const int nrb = pk.ncb, nbm = p.B * p.idx_heads;
  std::vector<int> tiles(int64_t(nbm) * nrb, 0);  // visible tiles of each (mask head, row block)
  for (int bm = 0; bm < nbm; ++bm)
    for (int rb = 0; rb < nrb; ++rb)
      for (int cb = 0; cb < pk.ncb; ++cb)
        tiles[int64_t(bm) * nrb + rb] +=
            cm.classify(bm, rb * kTile, std::min(p.S, rb * kTile + kTile), cb) != TileKind::kMasked;
  const int64_t tasks = int64_t(p.B) * p.Hq * nrb;
  std::vector<int> work(tasks);
  for (int64_t t = 0; t < tasks; ++t) {
    const int rb = int(t % nrb), h = int((t / nrb) % p.Hq), b = int(t / (int64_t(nrb) * p.Hq));
    work[t] = tiles[int64_t(mask_head(p, b, h / (p.Hq / p.Hkv))) * nrb + rb];
  }
  const std::vector<int64_t> order = order_by_work(work);
#pragma omp parallel num_threads(p.num_threads)
  {
    FwdScratch w(pk.dp);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < tasks; ++i) {
      const int64_t t = order[i];
      const int rb = int(t % nrb), h = int((t / nrb) % p.Hq), b = int(t / (int64_t(nrb) * p.Hq));
      fwd_task(p, cm, pk, drop, b, h, rb, w);
    }
  }
}

void flashmask_bwd_bf16(const FlashMaskParams& p) {
  const ColumnMask cm(p);
  const Dropout drop(p);
  Packed pk;
  init_layout(p, pk);
  pack_natural(p, p.q, p.q_stride, p.Hq, pk.dp, pk.s_pad, pk.qn);
  pack_natural(p, p.dout, p.do_stride, p.Hq, pk.dp, pk.s_pad, pk.don);
  pack_rp(p, p.q, p.q_stride, p.Hq, pk.dp, pk.s_pad, pk.qrp);
  pack_rp(p, p.dout, p.do_stride, p.Hq, pk.dp, pk.s_pad, pk.dorp);
  pack_t(p, p.k, p.k_stride, pk.dp, pk.ncb, pk.kt);
  pack_t(p, p.v, p.v_stride, pk.dp, pk.ncb, pk.vt);
  pack_rp(p, p.k, p.k_stride, p.Hkv, pk.dp, pk.s_pad, pk.krp);
  // delta = rowsum(dO * O) - dlse, fp32.
  std::vector<float> delta(int64_t(p.B) * p.Hq * p.S);
  const int64_t rows = int64_t(p.B) * p.Hq * p.S;
#pragma omp parallel for num_threads(p.num_threads) schedule(static)
  for (int64_t t = 0; t < rows; ++t) {
    const int i = int(t % p.S), h = int((t / p.S) % p.Hq), b = int(t / (int64_t(p.S) * p.Hq));
    const bf16* o = static_cast<const bf16*>(p.out) + b * p.o_stride[0] + i * p.o_stride[1] + h * p.o_stride[2];
    const bf16* g = static_cast<const bf16*>(p.dout) + b * p.do_stride[0] + i * p.do_stride[1] + h * p.do_stride[2];
    float acc = 0.f;
    for (int d = 0; d < p.D; ++d) acc += to_float(o[d]) * to_float(g[d]);
    delta[t] = acc - (p.dlse ? p.dlse[t] : 0.f);
  }
  const int ncb = pk.ncb, nrb = ncb, nbm = p.B * p.idx_heads, group = p.Hq / p.Hkv;
  std::vector<int> tiles(int64_t(nbm) * ncb, 0);  // visible tiles of each (mask head, key block)
  for (int bm = 0; bm < nbm; ++bm)
    for (int cb = 0; cb < ncb; ++cb)
      for (int rb = 0; rb < nrb; ++rb)
        tiles[int64_t(bm) * ncb + cb] +=
            cm.classify(bm, rb * kTile, std::min(p.S, rb * kTile + kTile), cb) != TileKind::kMasked;
  const int64_t tasks = int64_t(p.B) * p.Hkv * ncb;
  std::vector<int> work(tasks);
  for (int64_t t = 0; t < tasks; ++t) {
    const int cb = int(t % ncb), hk = int((t / ncb) % p.Hkv), b = int(t / (int64_t(ncb) * p.Hkv));
    work[t] = tiles[int64_t(mask_head(p, b, hk)) * ncb + cb] * group;
  }
  const std::vector<int64_t> order = order_by_work(work);
  const int nthreads = std::max(1, std::min<int>(p.num_threads, int(std::max<int64_t>(tasks, 1))));
  const int64_t dq_size = int64_t(p.B) * p.Hq * pk.s_pad * pk.dp;
  std::vector<std::vector<float>> dq_acc(nthreads);
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = omp_get_thread_num();
    dq_acc[tid].assign(dq_size, 0.f);  // first touch by its own thread
    BwdScratch w(pk.dp);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < tasks; ++i) {
      const int64_t t = order[i];
      const int cb = int(t % ncb), hk = int((t / ncb) % p.Hkv), b = int(t / (int64_t(ncb) * p.Hkv));
      bwd_task(p, cm, pk, delta, drop, b, hk, cb, dq_acc[tid].data(), w);
    }
    // dQ = scale * (sum of the threads' partial sums), one row at a time.
#pragma omp for schedule(static)
    for (int64_t t = 0; t < rows; ++t) {
      const int i = int(t % p.S), h = int((t / p.S) % p.Hq), b = int(t / (int64_t(p.S) * p.Hq));
      const int64_t off = ((int64_t(b) * p.Hq + h) * pk.s_pad + i) * pk.dp;
      float* acc = dq_acc[tid].data() + off;  // this thread's buffer: rows are split between threads
      for (int th = 0; th < nthreads; ++th) {
        if (th == tid || dq_acc[th].empty()) continue;  // a thread the runtime did not start
        const float* other = dq_acc[th].data() + off;
        for (int d = 0; d < p.D; ++d) acc[d] += other[d];
      }
      bf16* dq = static_cast<bf16*>(p.dq) + b * p.dq_stride[0] + i * p.dq_stride[1] + h * p.dq_stride[2];
      store_row(acc, dq, p.D, p.scale);
    }
  }
}

}  // namespace ernie_cpu
