// FlashMask attention backward with WMMA (included by flashmask_sm80.cu; see its header comment).
// P is recomputed from the saved lse; delta_i = sum_d dO_id O_id - dlse_i is the softmax backward's
// row term (flashmask_delta). Dropout (keep mask Z, r = 1 / (1 - p)): the forward computed
// O = (r Z * P) V, so dV = r (Z * P)^T dO and dS = P * (r Z * dP - delta) with dP = dO V^T; delta
// needs no mask because O already holds the dropout (the CPU kernel's derivation, flashmask_bwd.cpp).
#pragma once

namespace ernie_cuda {
namespace sm80 {

// Row statistics of a query block in log2 units; rows past S or attending nothing get lse = +inf,
// which makes their probabilities exactly 0.
// With dropout, rkey gets the rows' keys of the keep mask.
__device__ __forceinline__ void load_row_stats(float* lse2, float* delta, uint64_t* rkey, const FlashMaskParams& p,
                                               int b, int h, int r0) {
  const int bh = b * p.Hq + h;
  const uint64_t head_key = ernie_common::dropout_head_key(p.drop_seed_key, b, h);
  for (int i = threadIdx.x; i < kB; i += kThreads) {
    const int r = r0 + i;
    if (p.drop_on) rkey[i] = ernie_common::dropout_row_key(head_key, r);
    const float l = r < p.S ? p.lse[int64_t(bh) * p.S + r] : -INFINITY;
    lse2[i] = l == -INFINITY ? INFINITY : l * 1.4426950408889634f;
    delta[i] = r < p.S ? p.delta[int64_t(bh) * p.S + r] : 0.f;
  }
}

template <int D>
struct DkdvSmem {
  bf16 k[kB][D + kPadH], v[kB][D + kPadH], q[kB][D + kPadH], dout[kB][D + kPadH];
  float st[kB][kB + kPadF], dpt[kB][kB + kPadF];
  bf16 pt[kB][kB + kPadH], dst[kB][kB + kPadH];
  float lse2[kB], delta[kB];
  uint64_t rkey[kB];
  int32_t spans[4][kB];
  float stage[kThreads / 32][256];
  int n_live;
};

template <int D>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(const FlashMaskParams p) {
  extern __shared__ __align__(16) char smem_raw[];
  DkdvSmem<D>& sm = *reinterpret_cast<DkdvSmem<D>*>(smem_raw);
  const int nrb = cdiv(p.S, kB);
  int8_t* kinds = reinterpret_cast<int8_t*>(smem_raw + sizeof(DkdvSmem<D>));
  int* live = reinterpret_cast<int*>(smem_raw + sizeof(DkdvSmem<D>) + ((nrb + 15) / 16) * 16);
  const int cb = int(blockIdx.x), c0 = cb * kB;
  const int b = int(blockIdx.y) / p.Hkv, hkv = int(blockIdx.y) % p.Hkv, group = p.Hq / p.Hkv;
  const Ctx cx = make_ctx(p, b, hkv * group, hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const BlockStats st = block_stats(cx.table, c0, kB);
  for (int rb = threadIdx.x; rb < nrb; rb += kThreads) kinds[rb] = int8_t(classify(st, rb * kB, min(rb * kB + kB, p.S)));
  load_spans(sm.spans, cx.spans, p.s_pad, c0);
  __syncthreads();
  const int n_live = compact_live(kinds, nrb, live, &sm.n_live);
  const bf16* k = static_cast<const bf16*>(p.k) + b * p.k_stride[0] + hkv * p.k_stride[2];
  const bf16* v = static_cast<const bf16*>(p.v) + b * p.v_stride[0] + hkv * p.v_stride[2];
  load_rows<D>(&sm.k[0][0], k + c0 * p.k_stride[1], p.k_stride[1], p.S - c0);
  load_rows<D>(&sm.v[0][0], v + c0 * p.v_stride[1], p.v_stride[1], p.S - c0);
  FragC dk[D / 16], dv[D / 16];
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(dk[n], 0.f), wmma::fill_fragment(dv[n], 0.f);
  const float sl2 = p.scale * 1.4426950408889634f;
  const int col = 16 * warp + lane / 2, half = lane % 2;  // elementwise: two lanes per key column
  for (int g = 0; g < group; ++g) {
    const int h = hkv * group + g;
    const bf16* q = static_cast<const bf16*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
    const bf16* dout = static_cast<const bf16*>(p.dout) + b * p.do_stride[0] + h * p.do_stride[2];
    for (int t = 0; t < n_live; ++t) {
      const int r0 = live[t] * kB;
      load_rows<D>(&sm.q[0][0], q + r0 * p.q_stride[1], p.q_stride[1], p.S - r0);
      load_rows<D>(&sm.dout[0][0], dout + r0 * p.do_stride[1], p.do_stride[1], p.S - r0);
      load_row_stats(sm.lse2, sm.delta, sm.rkey, p, b, h, r0);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      warp_abt<D>(&sm.k[16 * warp][0], &sm.q[0][0], &sm.st[16 * warp][0], kB + kPadF);       // S^T
      warp_abt<D>(&sm.v[16 * warp][0], &sm.dout[0][0], &sm.dpt[16 * warp][0], kB + kPadF);  // dP^T
      __syncwarp();
      const bool partial = kinds[live[t]] == kTilePartial;
      for (int r = half * 32; r < half * 32 + 32; ++r) {
        float pv = exp2f(sm.st[col][r] * sl2 - sm.lse2[r]);
        if (partial && masked_at(sm.spans, r0 + r, col)) pv = 0.f;
        float dpv = sm.dpt[col][r];
        bool keep = true;
        if (p.drop_on) {
          keep = ernie_common::dropout_keep(sm.rkey[r], c0 + col, p.drop_threshold);
          dpv = keep ? dpv * p.drop_rescale : 0.f;
        }
        sm.pt[col][r] = __float2bfloat16(keep ? pv : 0.f);
        sm.dst[col][r] = __float2bfloat16(pv * (dpv - sm.delta[r]));
      }
      __syncwarp();
      warp_ab_acc<D>(dv, &sm.pt[16 * warp][0], &sm.dout[0][0]);
      warp_ab_acc<D>(dk, &sm.dst[16 * warp][0], &sm.q[0][0]);
      __syncthreads();  // before the next query block overwrites q / dout
    }
  }
  bf16* dkp = static_cast<bf16*>(p.dk) + b * p.dk_stride[0] + hkv * p.dk_stride[2] + (c0 + 16 * warp) * p.dk_stride[1];
  bf16* dvp = static_cast<bf16*>(p.dv) + b * p.dv_stride[0] + hkv * p.dv_stride[2] + (c0 + 16 * warp) * p.dv_stride[1];
  store_frags<D>(dk, sm.stage[warp], dkp, p.dk_stride[1], p.S - c0 - 16 * warp, p.scale);
  store_frags<D>(dv, sm.stage[warp], dvp, p.dv_stride[1], p.S - c0 - 16 * warp, p.drop_rescale);
}

template <int D>
struct DqSmem {
  bf16 q[kB][D + kPadH], dout[kB][D + kPadH], k[kB][D + kPadH], v[kB][D + kPadH];
  float s[kB][kB + kPadF], dp[kB][kB + kPadF];
  bf16 ds[kB][kB + kPadH];
  float lse2[kB], delta[kB];
  uint64_t rkey[kB];
  int32_t spans[4][kB];
  float stage[kThreads / 32][256];
  int n_live;
};

template <int D>
__global__ void __launch_bounds__(kThreads) dq_kernel(const FlashMaskParams p) {
  extern __shared__ __align__(16) char smem_raw[];
  DqSmem<D>& sm = *reinterpret_cast<DqSmem<D>*>(smem_raw);
  const int ncb = p.s_pad / kB;
  int8_t* kinds = reinterpret_cast<int8_t*>(smem_raw + sizeof(DqSmem<D>));
  int* live = reinterpret_cast<int*>(smem_raw + sizeof(DqSmem<D>) + ((ncb + 15) / 16) * 16);
  const int nrb = cdiv(p.S, kB), rb = nrb - 1 - int(blockIdx.x);
  const int b = int(blockIdx.y) / p.Hq, h = int(blockIdx.y) % p.Hq;
  const Ctx cx = make_ctx(p, b, h, h / (p.Hq / p.Hkv));
  const int r0 = rb * kB, r1 = min(r0 + kB, p.S), warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int cb = threadIdx.x; cb < ncb; cb += kThreads) kinds[cb] = int8_t(classify(block_stats(cx.table, cb * kB, kB), r0, r1));
  load_row_stats(sm.lse2, sm.delta, sm.rkey, p, b, h, r0);
  __syncthreads();
  const int n_live = compact_live(kinds, ncb, live, &sm.n_live);
  const bf16* q = static_cast<const bf16*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
  const bf16* dout = static_cast<const bf16*>(p.dout) + b * p.do_stride[0] + h * p.do_stride[2];
  const bf16* k = static_cast<const bf16*>(p.k) + b * p.k_stride[0] + cx.hkv * p.k_stride[2];
  const bf16* v = static_cast<const bf16*>(p.v) + b * p.v_stride[0] + cx.hkv * p.v_stride[2];
  load_rows<D>(&sm.q[0][0], q + r0 * p.q_stride[1], p.q_stride[1], p.S - r0);
  load_rows<D>(&sm.dout[0][0], dout + r0 * p.do_stride[1], p.do_stride[1], p.S - r0);
  FragC dq[D / 16];
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(dq[n], 0.f);
  const float sl2 = p.scale * 1.4426950408889634f;
  const int row = 16 * warp + lane / 2, half = lane % 2;
  for (int t = 0; t < n_live; ++t) {
    const int c0 = live[t] * kB;
    load_rows<D>(&sm.k[0][0], k + c0 * p.k_stride[1], p.k_stride[1], p.S - c0);
    load_rows<D>(&sm.v[0][0], v + c0 * p.v_stride[1], p.v_stride[1], p.S - c0);
    load_spans(sm.spans, cx.spans, p.s_pad, c0);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    warp_abt<D>(&sm.q[16 * warp][0], &sm.k[0][0], &sm.s[16 * warp][0], kB + kPadF);
    warp_abt<D>(&sm.dout[16 * warp][0], &sm.v[0][0], &sm.dp[16 * warp][0], kB + kPadF);
    __syncwarp();
    const bool partial = kinds[live[t]] == kTilePartial;
    for (int c = half * 32; c < half * 32 + 32; c += 2) {  // c0 + c even: one hash per column pair
      const uint64_t bits = p.drop_on ? ernie_common::dropout_pair_bits(sm.rkey[row], c0 + c) : ~0ull;
      for (int e = 0; e < 2; ++e) {
        float pv = exp2f(sm.s[row][c + e] * sl2 - sm.lse2[row]);
        if (partial && masked_at(sm.spans, r0 + row, c + e)) pv = 0.f;
        float dpv = sm.dp[row][c + e];
        if (p.drop_on) dpv = uint32_t(bits >> (32 * e)) >= p.drop_threshold ? dpv * p.drop_rescale : 0.f;
        sm.ds[row][c + e] = __float2bfloat16(pv * (dpv - sm.delta[row]));
      }
    }
    __syncwarp();
    warp_ab_acc<D>(dq, &sm.ds[16 * warp][0], &sm.k[0][0]);
    __syncthreads();
  }
  bf16* dqp = static_cast<bf16*>(p.dq) + b * p.dq_stride[0] + h * p.dq_stride[2] + (r0 + 16 * warp) * p.dq_stride[1];
  store_frags<D>(dq, sm.stage[warp], dqp, p.dq_stride[1], p.S - r0 - 16 * warp, p.scale);
}

}  // namespace sm80
}  // namespace ernie_cuda
