// FlashMask attention backward in two passes that need no atomics and no S x S buffer:
//   pass A, one task per (batch, kv head, key block): dK and dV, looping over the query heads of the
//           group and the query blocks the mask does not hide;
//   pass B, one task per (batch, query head, query block): dQ, looping over the key blocks.
// P is recomputed from the saved lse: P = exp2(S2 - lse * log2e) with S2 = (q . k) * scale * log2e.
// With delta_i = sum_d dO_id O_id - dlse_i: dS = P * (dP - delta) (softmax Jacobian; d lse / d s =
// P gives the dlse term), dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO (FlashAttention-2 Alg. 2).
// Dropout (keep mask Z in {0, 1}, r = 1 / (1 - p), regenerated from the seed, flashmask.h): the
// forward computed O = (r Z * P) V, so dV = (r Z * P)^T dO and dP = r Z * (dO V^T). The softmax
// Jacobian needs sum_j P_ij dP_ij = sum_j (r Z P)_ij (dO_i . v_j) = dO_i . O_i: delta is unchanged
// (O already holds the dropout), and dS = P * (r Z * (dO V^T) - delta).
#include <algorithm>
#include <vector>

#include "flashmask.h"

namespace ernie_cpu {
namespace {

struct RowStats {  // per query row of a block: lse in base 2 (+inf for empty/padding rows), delta
  float lse2[kBlockM], delta[kBlockM];
};

void load_row_stats(const FlashMaskParams& p, const std::vector<float>& delta, int b, int h, int r0, int nr,
                    RowStats& st) {
  const int64_t base = (int64_t(b) * p.Hq + h) * p.S + r0;
  for (int r = 0; r < kBlockM; ++r) {
    // +inf makes exp2(s - lse2) exactly 0: rows that saw nothing (lse = -inf) and padding rows.
    const float lse = r < nr ? p.lse[base + r] : -kInf;
    st.lse2[r] = lse == -kInf ? kInf : lse * kLog2e;
    st.delta[r] = r < nr ? delta[base + r] : 0.f;
  }
}

// delta[b, h, i] = sum_d dO * O - dlse (fp32), one pass over the outputs.
template <class T>
void compute_delta(const FlashMaskParams& p, std::vector<float>& delta) {
  const int64_t rows = int64_t(p.B) * p.Hq * p.S;
#pragma omp parallel for num_threads(p.num_threads) schedule(static)
  for (int64_t t = 0; t < rows; ++t) {
    const int i = int(t % p.S), h = int((t / p.S) % p.Hq), b = int(t / (int64_t(p.S) * p.Hq));
    const T* o = static_cast<const T*>(p.out) + b * p.o_stride[0] + i * p.o_stride[1] + h * p.o_stride[2];
    const T* g = static_cast<const T*>(p.dout) + b * p.do_stride[0] + i * p.do_stride[1] + h * p.do_stride[2];
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int d = 0; d < p.D; ++d) acc += to_float(o[d]) * to_float(g[d]);
    delta[t] = acc - (p.dlse ? p.dlse[t] : 0.f);
  }
}

// Per-thread scratch: four [64][dp] tiles plus the P and dP/dS score tiles.
static_assert(kBlockM == kBlockN, "the backward shares tile buffers between query and key blocks");
struct BwdWorkspace {
  std::vector<float> buf;
  int dp;
  explicit BwdWorkspace(int dp_) : buf(4 * kBlockM * dp_ + 2 * kBlockM * kBlockN), dp(dp_) {}
  float* tile(int i) { return buf.data() + int64_t(i) * kBlockM * dp; }
  float* scores(int i) { return buf.data() + int64_t(4) * kBlockM * dp + i * kBlockM * kBlockN; }
};

// The shared inner step of both passes for one (query block, key block) tile: P and dS = P (dP - delta)
// into ps / dss ([query][key]). qs is the query tile scaled by scale * log2e, dof the dO tile.
// With dropout ps holds Z * P (the r is applied once, to dV at the end) and row_keys are the rows' keys.
void probs_and_grads(const FlashMaskParams& p, const ColumnMask& cm, const TransposedKV& kv, int b, int hk, int bm,
                     int r0, int nr, int c0, TileKind kind, const float* qs, const float* dof, const RowStats& st,
                     const Dropout& drop, const uint64_t* row_keys, float* ps, float* dss) {
  constexpr int NV = kBlockN / kVecLen;
  const int dp = kv.dp;
  gemm(NV, false, false, nr, dp, qs, dp, kv.k(b, hk, p.Hkv) + c0, kv.s_pad, ps, kBlockN);   // S2
  if (kind == TileKind::kPartial) mask_tile(ps, nr, r0, c0, cm, bm);
  gemm(NV, false, false, nr, dp, dof, dp, kv.v(b, hk, p.Hkv) + c0, kv.s_pad, dss, kBlockN);  // dP = dO V^T
  if (drop.on) {
    const vfloat zero = vfloat{};
    for (int r = 0; r < nr; ++r) {
      const float lse2 = st.lse2[r], delta = st.delta[r];
      for (int v = 0; v < NV; ++v) {
        float* pr = ps + r * kBlockN + v * kVecLen;
        float* dr = dss + r * kBlockN + v * kVecLen;
        const vint keep = dropout_keep16(row_keys[r], c0 + v * kVecLen, drop.threshold);
        const vfloat pv = vexp2(vload(pr) - lse2);
        vstore(pr, keep ? pv : zero);
        vstore(dr, pv * ((keep ? vload(dr) * drop.rescale : zero) - delta));
      }
    }
    return;
  }
  for (int r = 0; r < nr; ++r) {
    const float lse2 = st.lse2[r], delta = st.delta[r];
    for (int v = 0; v < NV; ++v) {
      float* pr = ps + r * kBlockN + v * kVecLen;
      float* dr = dss + r * kBlockN + v * kVecLen;
      const vfloat pv = vexp2(vload(pr) - lse2);
      vstore(pr, pv);
      vstore(dr, pv * (vload(dr) - delta));
    }
  }
}

// Pass A: dK, dV for key block cb of kv head hk.
template <class T>
void dkdv_task(const FlashMaskParams& p, const ColumnMask& cm, const TransposedKV& kv, const std::vector<float>& delta,
               const Dropout& drop, int b, int hk, int cb, BwdWorkspace& w) {
  const int dp = kv.dp, nvd = dp / kVecLen, group = p.Hq / p.Hkv;
  const int bm = b * p.idx_heads + (p.idx_heads == 1 ? 0 : hk);
  const int c0 = cb * kBlockN, nc = std::min(kBlockN, p.S - c0), nrb = (p.S + kBlockM - 1) / kBlockM;
  float *qs = w.tile(0), *dof = w.tile(1), *dk = w.tile(2), *dv = w.tile(3);
  std::fill(dk, dk + kBlockN * dp, 0.f);
  std::fill(dv, dv + kBlockN * dp, 0.f);
  RowStats st;
  uint64_t row_keys[kBlockM];
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    for (int rb = 0; rb < nrb; ++rb) {
      const int r0 = rb * kBlockM, nr = std::min(kBlockM, p.S - r0);
      const TileKind kind = cm.classify(bm, r0, r0 + nr, cb);
      if (kind == TileKind::kMasked) continue;
      const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + r0 * p.q_stride[1] + h * p.q_stride[2];
      const T* g = static_cast<const T*>(p.dout) + b * p.do_stride[0] + r0 * p.do_stride[1] + h * p.do_stride[2];
      load_tile(q, p.q_stride[1], nr, nr, p.D, dp, p.scale * kLog2e, qs);
      load_tile(g, p.do_stride[1], nr, nr, p.D, dp, 1.0f, dof);
      load_row_stats(p, delta, b, h, r0, nr, st);
      if (drop.on) drop.row_keys(b, h, r0, nr, row_keys);
      float *ps = w.scores(0), *dss = w.scores(1);
      probs_and_grads(p, cm, kv, b, hk, bm, r0, nr, c0, kind, qs, dof, st, drop, row_keys, ps, dss);
      gemm(nvd, true, true, kBlockN, nr, ps, kBlockN, dof, dp, dv, dp);  // dV += P^T dO
      gemm(nvd, true, true, kBlockN, nr, dss, kBlockN, qs, dp, dk, dp);  // dK += dS^T (Q scale log2e)
    }
  }
  T* dkp = static_cast<T*>(p.dk) + b * p.dk_stride[0] + c0 * p.dk_stride[1] + hk * p.dk_stride[2];
  T* dvp = static_cast<T*>(p.dv) + b * p.dv_stride[0] + c0 * p.dv_stride[1] + hk * p.dv_stride[2];
  for (int c = 0; c < nc; ++c) {
    store_row(dk + c * dp, dkp + c * p.dk_stride[1], p.D, 1.0f / kLog2e);  // undo the log2e folded into qs
    store_row(dv + c * dp, dvp + c * p.dv_stride[1], p.D, drop.on ? drop.rescale : 1.0f);
  }
}

// Pass B: dQ for query block rb of head h.
template <class T>
void dq_task(const FlashMaskParams& p, const ColumnMask& cm, const TransposedKV& kv, const std::vector<float>& delta,
             const Dropout& drop, int b, int h, int rb, BwdWorkspace& w) {
  const int dp = kv.dp, nvd = dp / kVecLen;
  const int hk = h / (p.Hq / p.Hkv);
  const int bm = b * p.idx_heads + (p.idx_heads == 1 ? 0 : hk);
  const int r0 = rb * kBlockM, nr = std::min(kBlockM, p.S - r0);
  float *qs = w.tile(0), *dof = w.tile(1), *kf = w.tile(2), *dq = w.tile(3);
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + r0 * p.q_stride[1] + h * p.q_stride[2];
  const T* g = static_cast<const T*>(p.dout) + b * p.do_stride[0] + r0 * p.do_stride[1] + h * p.do_stride[2];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[2];
  load_tile(q, p.q_stride[1], nr, nr, p.D, dp, p.scale * kLog2e, qs);
  load_tile(g, p.do_stride[1], nr, nr, p.D, dp, 1.0f, dof);
  std::fill(dq, dq + kBlockM * dp, 0.f);
  RowStats st;
  load_row_stats(p, delta, b, h, r0, nr, st);
  uint64_t row_keys[kBlockM];
  if (drop.on) drop.row_keys(b, h, r0, nr, row_keys);
  for (int cb = 0; cb < cm.num_col_blocks(); ++cb) {
    const TileKind kind = cm.classify(bm, r0, r0 + nr, cb);
    if (kind == TileKind::kMasked) continue;
    const int c0 = cb * kBlockN, nc = std::min(kBlockN, p.S - c0);
    load_tile(k + c0 * p.k_stride[1], p.k_stride[1], nc, kBlockN, p.D, dp, 1.0f, kf);
    float *ps = w.scores(0), *dss = w.scores(1);
    probs_and_grads(p, cm, kv, b, hk, bm, r0, nr, c0, kind, qs, dof, st, drop, row_keys, ps, dss);
    gemm(nvd, true, false, nr, kBlockN, dss, kBlockN, kf, dp, dq, dp);  // dQ += dS K
  }
  T* dqp = static_cast<T*>(p.dq) + b * p.dq_stride[0] + r0 * p.dq_stride[1] + h * p.dq_stride[2];
  for (int r = 0; r < nr; ++r) store_row(dq + r * dp, dqp + r * p.dq_stride[1], p.D, p.scale);
}

}  // namespace

void flashmask_bwd(const FlashMaskParams& p) {
  if (flashmask_avx512_usable(p.dtype)) return flashmask_bwd_avx512(p);
  const ColumnMask cm(p);
  const TransposedKV kv(p);
  const int nrb = (p.S + kBlockM - 1) / kBlockM, ncb = cm.num_col_blocks();
  const Dropout drop(p);
  std::vector<float> delta(int64_t(p.B) * p.Hq * p.S);
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    compute_delta<T>(p, delta);
    const int64_t tasks_a = int64_t(p.B) * p.Hkv * ncb, tasks_b = int64_t(p.B) * p.Hq * nrb;
#pragma omp parallel num_threads(p.num_threads)
    {
      BwdWorkspace w(kv.dp);
      // Causal: early key blocks are seen by the most query blocks; start them first.
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t t = 0; t < tasks_a; ++t) {
        const int cb = int(t % ncb), hk = int((t / ncb) % p.Hkv), b = int(t / (int64_t(ncb) * p.Hkv));
        dkdv_task<T>(p, cm, kv, delta, drop, b, hk, cb, w);
      }
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = tasks_b - 1; t >= 0; --t) {
        const int rb = int(t % nrb), h = int((t / nrb) % p.Hq), b = int(t / (int64_t(nrb) * p.Hq));
        dq_task<T>(p, cm, kv, delta, drop, b, h, rb, w);
      }
    }
  });
}

}  // namespace ernie_cpu
