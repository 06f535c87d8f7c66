// FlashMask attention forward: one task per (batch, query head, block of kBlockM rows), a loop over
// key blocks with online softmax (FlashAttention-2, Dao 2023, Alg. 1) in base 2: scores are
// pre-multiplied by scale * log2(e) so every exponential is one exp2. Tiles the mask fully hides
// are skipped before any load; unmasked tiles skip the per-element mask test.
// Dropout (flashmask.h): the running sum l takes the undropped probabilities (so lse is the plain
// softmax normaliser); dropped entries are zeroed before P V, and 1 / (1 - p) joins the final 1 / l.
#include <algorithm>
#include <vector>

#include "flashmask.h"

namespace ernie_cpu {
namespace {

struct FwdWorkspace {
  std::vector<float> q, v, s, acc, m, l;
  explicit FwdWorkspace(int dp)
      : q(kBlockM * dp), v(kBlockN * dp), s(kBlockM * kBlockN), acc(kBlockM * dp), m(kBlockM), l(kBlockM) {}
};

// Online-softmax update of rows [0, nr) with the scores of one tile (in place -> probabilities).
// Returns nothing; rows whose tile scores are all -inf get p = 0 and keep their running state.
void softmax_update(float* s, int nr, int dp, float* m, float* l, float* acc) {
  constexpr int NV = kBlockN / kVecLen;
  for (int r = 0; r < nr; ++r) {
    float* row = s + r * kBlockN;
    vfloat x[NV];
    vfloat mx = vsplat(-kInf);
    for (int v = 0; v < NV; ++v) {
      x[v] = vload(row + v * kVecLen);
      mx = vmax(mx, x[v]);
    }
    const float tile_max = hmax(mx);
    if (tile_max == -kInf) {  // nothing visible in this tile for this row
      for (int v = 0; v < NV; ++v) vstore(row + v * kVecLen, vfloat{});
      continue;
    }
    const float m_new = std::max(m[r], tile_max);
    const float alpha = std::exp2(m[r] - m_new);  // m[r] = -inf -> 0
    vfloat sum = vfloat{};
    for (int v = 0; v < NV; ++v) {
      const vfloat p = vexp2(x[v] - m_new);
      sum += p;
      vstore(row + v * kVecLen, p);
    }
    l[r] = l[r] * alpha + hsum(sum);
    m[r] = m_new;
    if (alpha != 1.0f) {
      float* a = acc + r * dp;
      for (int d = 0; d < dp; ++d) a[d] *= alpha;
    }
  }
}

// Zeroes the dropped probabilities of a tile (rows [0, nr), columns c0 .. c0 + kBlockN).
void drop_tile(float* s, int nr, int c0, const uint64_t* row_keys, uint32_t threshold) {
  for (int r = 0; r < nr; ++r)
    for (int v = 0; v < kBlockN / kVecLen; ++v) {
      float* row = s + r * kBlockN + v * kVecLen;
      vstore(row, dropout_keep16(row_keys[r], c0 + v * kVecLen, threshold) ? vload(row) : vfloat{});
    }
}

template <class T>
void fwd_task(const FlashMaskParams& p, const ColumnMask& cm, const TransposedKV& kv, const Dropout& drop, int b,
              int h, int rb, FwdWorkspace& w) {
  const int dp = round_up16(p.D), nvd = dp / kVecLen;
  const int hk = h / (p.Hq / p.Hkv);
  const int bm = b * p.idx_heads + (p.idx_heads == 1 ? 0 : hk);
  const int r0 = rb * kBlockM, nr = std::min(kBlockM, p.S - r0);
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + r0 * p.q_stride[1] + h * p.q_stride[2];
  const float* kt = kv.k(b, hk, p.Hkv);
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[2];
  load_tile(q, p.q_stride[1], nr, kBlockM, p.D, dp, p.scale * kLog2e, w.q.data());
  std::fill(w.m.begin(), w.m.end(), -kInf);
  std::fill(w.l.begin(), w.l.end(), 0.f);
  std::fill(w.acc.begin(), w.acc.end(), 0.f);
  uint64_t row_keys[kBlockM];
  if (drop.on) drop.row_keys(b, h, r0, nr, row_keys);
  for (int cb = 0; cb < cm.num_col_blocks(); ++cb) {
    const TileKind kind = cm.classify(bm, r0, r0 + nr, cb);
    if (kind == TileKind::kMasked) continue;
    const int c0 = cb * kBlockN, nc = std::min(kBlockN, p.S - c0);
    load_tile(v + c0 * p.v_stride[1], p.v_stride[1], nc, kBlockN, p.D, dp, 1.0f, w.v.data());
    gemm(kBlockN / kVecLen, false, false, nr, dp, w.q.data(), dp, kt + c0, kv.s_pad, w.s.data(), kBlockN);
    if (kind == TileKind::kPartial) mask_tile(w.s.data(), nr, r0, c0, cm, bm);
    softmax_update(w.s.data(), nr, dp, w.m.data(), w.l.data(), w.acc.data());
    if (drop.on) drop_tile(w.s.data(), nr, c0, row_keys, drop.threshold);
    gemm(nvd, true, false, nr, kBlockN, w.s.data(), kBlockN, w.v.data(), dp, w.acc.data(), dp);
  }
  T* out = static_cast<T*>(p.out) + b * p.o_stride[0] + r0 * p.o_stride[1] + h * p.o_stride[2];
  float* lse = p.lse + (int64_t(b) * p.Hq + h) * p.S + r0;
  for (int r = 0; r < nr; ++r) {
    // Rows that see no column: output 0 and lse = -inf (the backward then gives them zero grads).
    const bool empty = w.l[r] == 0.f;
    const float norm = drop.on ? drop.rescale / w.l[r] : 1.0f / w.l[r];
    store_row(w.acc.data() + r * dp, out + r * p.o_stride[1], p.D, empty ? 0.f : norm);
    lse[r] = empty ? -kInf : (w.m[r] + std::log2(w.l[r])) * kLn2;
  }
}

}  // namespace

void flashmask_fwd(const FlashMaskParams& p) {
  if (flashmask_avx512_usable(p.dtype)) return flashmask_fwd_avx512(p);
  const ColumnMask cm(p);
  const TransposedKV kv(p);
  const Dropout drop(p);
  const int nrb = (p.S + kBlockM - 1) / kBlockM;
  const int64_t tasks = int64_t(p.B) * p.Hq * nrb;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
#pragma omp parallel num_threads(p.num_threads)
    {
      FwdWorkspace w(round_up16(p.D));
      // Reverse order: causal row blocks near the end see the most columns; start them first.
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = tasks - 1; t >= 0; --t) {
        const int rb = int(t % nrb), h = int((t / nrb) % p.Hq), b = int(t / (int64_t(nrb) * p.Hq));
        fwd_task<T>(p, cm, kv, drop, b, h, rb, w);
      }
    }
  });
}

}  // namespace ernie_cpu
