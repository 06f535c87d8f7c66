// FlashMask attention backward in two passes that need no atomics and no S x S buffer:
//   pass A, one task per (batch, kv head, key block): dK and dV, looping over the query heads of the
//           group and the query blocks the mask does not hide;
//   pass B, one task per (batch, query head, query block): dQ, looping over the key blocks.
// P is recomputed from the saved lse: P = exp2(S * scale * log2e - lse * log2e). With
// delta_i = sum_d dO_id O_id - dlse_i, dS = P * (dP - delta) (the softmax Jacobian; the dlse term
// is d lse / d s = P), dQ = scale * dS K, dK = scale * dS^T Q, dV = P^T dO.
#include <algorithm>
#include <vector>

#include "flashmask.h"

namespace ernie_cpu {
namespace {

template <class T>
void load_tile(const T* src, int64_t ld, int n, int rows_pad, int D, int dp, float scale, float* dst) {
  for (int r = 0; r < n; ++r) load_row(src + r * ld, dst + r * dp, D, dp, scale);
  std::fill(dst + int64_t(n) * dp, dst + int64_t(rows_pad) * dp, 0.f);
}

template <class T>
void load_tile_t(const T* src, int64_t ld, int n, int cols_pad, int D, int dp, float scale, float* dst) {
  std::fill(dst, dst + int64_t(dp) * cols_pad, 0.f);
  for (int r = 0; r < n; ++r) {
    const T* row = src + r * ld;
    for (int d = 0; d < D; ++d) dst[d * cols_pad + r] = to_float(row[d]) * scale;
  }
}

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

// Per-thread tiles: eight [64][dp] operand/accumulator tiles plus the P and dP score tiles.
static_assert(kBlockM == kBlockN, "the backward shares tile buffers between query and key blocks");
struct BwdWorkspace {
  std::vector<float> buf;
  int dp;
  explicit BwdWorkspace(int dp_) : buf(8 * kBlockM * dp_ + 2 * kBlockM * kBlockN), dp(dp_) {}
  float* tile(int i) { return buf.data() + int64_t(i) * kBlockM * dp; }
  float* scores(int i) { return buf.data() + int64_t(8) * kBlockM * dp + i * kBlockM * kBlockN; }
};

// dS = P * (dP - delta) in place of dP, for [query][key] tiles ...
void softmax_grad(const float* p, float* dp, const RowStats& st) {
  for (int r = 0; r < kBlockM; ++r) {
    const float d = st.delta[r];
#pragma omp simd
    for (int c = 0; c < kBlockN; ++c) dp[r * kBlockN + c] = p[r * kBlockN + c] * (dp[r * kBlockN + c] - d);
  }
}

// ... and for [key][query] tiles (pass A).
void softmax_grad_t(const float* p, float* dp, const RowStats& st) {
  for (int c = 0; c < kBlockN; ++c) {
#pragma omp simd
    for (int r = 0; r < kBlockM; ++r) dp[c * kBlockM + r] = p[c * kBlockM + r] * (dp[c * kBlockM + r] - st.delta[r]);
  }
}

// Pass A: dK, dV for key block cb of kv head hk.
template <class T>
void dkdv_task(const FlashMaskParams& p, const ColumnMask& cm, const std::vector<float>& delta, int b, int hk,
               int cb, BwdWorkspace& w) {
  const int dp = round_up16(p.D), nvd = dp / kVecLen, group = p.Hq / p.Hkv;
  const int bm = b * p.idx_heads + (p.idx_heads == 1 ? 0 : hk);
  const int c0 = cb * kBlockN, nc = std::min(kBlockN, p.S - c0), nrb = (p.S + kBlockM - 1) / kBlockM;
  float *kf = w.tile(0), *vf = w.tile(1), *qt = w.tile(2), *dot = w.tile(3), *qf = w.tile(4), *dof = w.tile(5);
  float *dk = w.tile(6), *dv = w.tile(7);
  std::fill(dk, dk + kBlockN * dp, 0.f);
  std::fill(dv, dv + kBlockN * dp, 0.f);
  load_tile(static_cast<const T*>(p.k) + b * p.k_stride[0] + c0 * p.k_stride[1] + hk * p.k_stride[2],
            p.k_stride[1], nc, kBlockN, p.D, dp, 1.0f, kf);
  load_tile(static_cast<const T*>(p.v) + b * p.v_stride[0] + c0 * p.v_stride[1] + hk * p.v_stride[2],
            p.v_stride[1], nc, kBlockN, p.D, dp, 1.0f, vf);
  RowStats st;
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    for (int rb = 0; rb < nrb; ++rb) {
      const int r0 = rb * kBlockM, nr = std::min(kBlockM, p.S - r0);
      const TileKind kind = cm.classify(bm, r0, r0 + nr, cb);
      if (kind == TileKind::kMasked) continue;
      const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + r0 * p.q_stride[1] + h * p.q_stride[2];
      const T* g = static_cast<const T*>(p.dout) + b * p.do_stride[0] + r0 * p.do_stride[1] + h * p.do_stride[2];
      load_tile_t(q, p.q_stride[1], nr, kBlockM, p.D, dp, p.scale * kLog2e, qt);
      load_tile(q, p.q_stride[1], nr, kBlockM, p.D, dp, 1.0f, qf);
      load_tile_t(g, p.do_stride[1], nr, kBlockM, p.D, dp, 1.0f, dot);
      load_tile(g, p.do_stride[1], nr, kBlockM, p.D, dp, 1.0f, dof);
      load_row_stats(p, delta, b, h, r0, nr, st);
      float *pt = w.scores(0), *dpt = w.scores(1);
      gemm(kBlockM / kVecLen, false, kBlockN, dp, kf, dp, qt, kBlockM, pt, kBlockM);  // S^T [key][query]
      if (kind == TileKind::kPartial) mask_tile(pt, nr, r0, c0, cm, bm, true);
      constexpr int NV = kBlockM / kVecLen;
      for (int c = 0; c < kBlockN; ++c)
        for (int v = 0; v < NV; ++v) {
          float* x = pt + c * kBlockM + v * kVecLen;
          vstore(x, vexp2(vload(x) - vload(st.lse2 + v * kVecLen)));
        }
      gemm(nvd, true, kBlockN, kBlockM, pt, kBlockM, dof, dp, dv, dp);    // dV += P^T dO
      gemm(kBlockM / kVecLen, false, kBlockN, dp, vf, dp, dot, kBlockM, dpt, kBlockM);  // dP^T = V dO^T
      softmax_grad_t(pt, dpt, st);
      gemm(nvd, true, kBlockN, kBlockM, dpt, kBlockM, qf, dp, dk, dp);  // dK += dS^T Q
    }
  }
  T* dkp = static_cast<T*>(p.dk) + b * p.dk_stride[0] + c0 * p.dk_stride[1] + hk * p.dk_stride[2];
  T* dvp = static_cast<T*>(p.dv) + b * p.dv_stride[0] + c0 * p.dv_stride[1] + hk * p.dv_stride[2];
  for (int c = 0; c < nc; ++c) {
    store_row(dk + c * dp, dkp + c * p.dk_stride[1], p.D, p.scale);
    store_row(dv + c * dp, dvp + c * p.dv_stride[1], p.D, 1.0f);
  }
}

// Pass B: dQ for query block rb of head h.
template <class T>
void dq_task(const FlashMaskParams& p, const ColumnMask& cm, const std::vector<float>& delta, int b, int h, int rb,
             BwdWorkspace& w) {
  const int dp = round_up16(p.D), nvd = dp / kVecLen;
  const int hk = h / (p.Hq / p.Hkv);
  const int bm = b * p.idx_heads + (p.idx_heads == 1 ? 0 : hk);
  const int r0 = rb * kBlockM, nr = std::min(kBlockM, p.S - r0);
  float *qf = w.tile(0), *dof = w.tile(1), *kt = w.tile(2), *vt = w.tile(3), *kf = w.tile(4), *dq = w.tile(5);
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + r0 * p.q_stride[1] + h * p.q_stride[2];
  const T* g = static_cast<const T*>(p.dout) + b * p.do_stride[0] + r0 * p.do_stride[1] + h * p.do_stride[2];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[2];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[2];
  load_tile(q, p.q_stride[1], nr, kBlockM, p.D, dp, p.scale * kLog2e, qf);
  load_tile(g, p.do_stride[1], nr, kBlockM, p.D, dp, 1.0f, dof);
  std::fill(dq, dq + kBlockM * dp, 0.f);
  RowStats st;
  load_row_stats(p, delta, b, h, r0, nr, st);
  constexpr int NV = kBlockN / kVecLen;
  for (int cb = 0; cb < cm.num_col_blocks(); ++cb) {
    const TileKind kind = cm.classify(bm, r0, r0 + nr, cb);
    if (kind == TileKind::kMasked) continue;
    const int c0 = cb * kBlockN, nc = std::min(kBlockN, p.S - c0);
    load_tile_t(k + c0 * p.k_stride[1], p.k_stride[1], nc, kBlockN, p.D, dp, 1.0f, kt);
    load_tile(k + c0 * p.k_stride[1], p.k_stride[1], nc, kBlockN, p.D, dp, 1.0f, kf);
    load_tile_t(v + c0 * p.v_stride[1], p.v_stride[1], nc, kBlockN, p.D, dp, 1.0f, vt);
    float *ps = w.scores(0), *dps = w.scores(1);
    gemm(NV, false, nr, dp, qf, dp, kt, kBlockN, ps, kBlockN);  // S [query][key]
    if (kind == TileKind::kPartial) mask_tile(ps, nr, r0, c0, cm, bm, false);
    for (int r = 0; r < nr; ++r)
      for (int v2 = 0; v2 < NV; ++v2) {
        float* x = ps + r * kBlockN + v2 * kVecLen;
        vstore(x, vexp2(vload(x) - st.lse2[r]));
      }
    gemm(NV, false, nr, dp, dof, dp, vt, kBlockN, dps, kBlockN);  // dP = dO V^T
    softmax_grad(ps, dps, st);
    gemm(nvd, true, nr, kBlockN, dps, kBlockN, kf, dp, dq, dp);  // dQ += dS K
  }
  T* dqp = static_cast<T*>(p.dq) + b * p.dq_stride[0] + r0 * p.dq_stride[1] + h * p.dq_stride[2];
  for (int r = 0; r < nr; ++r) store_row(dq + r * dp, dqp + r * p.dq_stride[1], p.D, p.scale);
}

}  // namespace

void flashmask_bwd(const FlashMaskParams& p) {
  const ColumnMask cm(p);
  const int nrb = (p.S + kBlockM - 1) / kBlockM, ncb = cm.num_col_blocks();
  std::vector<float> delta(int64_t(p.B) * p.Hq * p.S);
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    compute_delta<T>(p, delta);
    const int64_t tasks_a = int64_t(p.B) * p.Hkv * ncb, tasks_b = int64_t(p.B) * p.Hq * nrb;
#pragma omp parallel num_threads(p.num_threads)
    {
      BwdWorkspace w(round_up16(p.D));
      // Causal: early key blocks are seen by the most query blocks; start them first.
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t t = 0; t < tasks_a; ++t) {
        const int cb = int(t % ncb), hk = int((t / ncb) % p.Hkv), b = int(t / (int64_t(ncb) * p.Hkv));
        dkdv_task<T>(p, cm, delta, b, hk, cb, w);
      }
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = tasks_b - 1; t >= 0; --t) {
        const int rb = int(t % nrb), h = int((t / nrb) % p.Hq), b = int(t / (int64_t(nrb) * p.Hq));
        dq_task<T>(p, cm, delta, b, h, rb, w);
      }
    }
  });
}

}  // namespace ernie_cpu
