// FlashMask attention for sm_80+ with WMMA (bf16 16x16x16 tensor-core tiles, fp32 accumulation):
// the forward for non-Hopper GPUs (and D = 64), and the backward on every GPU.
//
// Tiles are 64 rows x 64 keys, 4 warps; warp w owns rows [16w, 16w + 16) of every score tile, so the
// softmax needs only warp-level sync. Scores go through shared memory (WMMA fragments have no
// documented element order); the running output / gradient accumulators of the forward and dQ sit
// in shared memory (forward) or registers (dK/dV/dQ fragments). The backward is split like the
// Triton one: dK/dV per key block (looping over the query heads of its GQA group) and dQ per query
// block, so there are no atomics.
// Attention dropout (p.drop_on) uses the CPU kernel's counter-based keep mask (common/dropout_hash.h):
// the forward sums the undropped probabilities into l and zeroes dropped ones before P V, scaling
// the output by 1 / (1 - p); the backward regenerates the same mask (see flashmask_bwd_sm80.cuh).
#include <cuda_bf16.h>
#include <mma.h>

#include "common.cuh"
#include "flashmask_mask.cuh"

namespace ernie_cuda {
namespace sm80 {

using namespace nvcuda;
using bf16 = __nv_bfloat16;
constexpr int kB = 64, kThreads = 128, kPadH = 8, kPadF = 4;
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major>;
using FragBc = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major>;
using FragBr = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

struct Ctx {  // per (batch, head) pointers and mask tables
  int b, h, hkv, bhm;
  const int32_t* table;
  const int32_t* spans;
};

__device__ __forceinline__ Ctx make_ctx(const FlashMaskParams& p, int b, int h, int hkv) {
  const int hm_count = p.idx ? p.idx_heads : 1;
  const int hm = hm_count > 1 ? hkv : 0;
  Ctx c{b, h, hkv, b * hm_count + hm, nullptr, nullptr};
  c.table = p.table + int64_t(c.bhm) * (p.s_pad / kMaskBlock) * 8;
  c.spans = p.spans + int64_t(c.bhm) * 4 * p.s_pad;
  return c;
}

// kB rows x D of a [*, S, *, D] tensor into shared [kB][D + kPadH]; rows past S are zero.
template <int D>
__device__ __forceinline__ void load_rows(bf16* smem, const bf16* gmem, int64_t row_stride, int rows_left) {
  for (int c = threadIdx.x; c < kB * D / 8; c += kThreads) {
    const int r = c / (D / 8), d = (c % (D / 8)) * 8;
    cp_async16(smem + r * (D + kPadH) + d, gmem + (r < rows_left ? r * row_stride + d : 0), r < rows_left);
  }
}

__device__ __forceinline__ void load_spans(int32_t (*dst)[kB], const int32_t* spans, int s_pad, int c0) {
  for (int i = threadIdx.x; i < 4 * kB; i += kThreads) dst[i / kB][i % kB] = spans[(i / kB) * s_pad + c0 + i % kB];
}

__device__ __forceinline__ bool masked_at(const int32_t (*sp)[kB], int row, int c) {
  return masked(row, sp[0][c], sp[1][c], sp[2][c], sp[3][c]);
}

// C[16 x 64] (warp's rows) = A[16 x D] . B^T with B [64][D] (both row-major in shared memory).
template <int D>
__device__ __forceinline__ void warp_abt(const bf16* a, const bf16* bm, float* c, int ldc) {
  FragC acc[4];
  for (int n = 0; n < 4; ++n) wmma::fill_fragment(acc[n], 0.f);
  for (int k = 0; k < D; k += 16) {
    FragA fa;
    wmma::load_matrix_sync(fa, a + k, D + kPadH);
    for (int n = 0; n < 4; ++n) {
      FragBc fb;
      wmma::load_matrix_sync(fb, bm + n * 16 * (D + kPadH) + k, D + kPadH);
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
  for (int n = 0; n < 4; ++n) wmma::store_matrix_sync(c + n * 16, acc[n], ldc, wmma::mem_row_major);
}

// acc[D/16] (16 x D) += A[16 x 64] . B[64 x D], A row-major (ld kB + kPadH), B row-major (ld D + kPadH).
template <int D>
__device__ __forceinline__ void warp_ab_acc(FragC* acc, const bf16* a, const bf16* bm) {
  for (int k = 0; k < kB; k += 16) {
    FragA fa;
    wmma::load_matrix_sync(fa, a + k, kB + kPadH);
    for (int n = 0; n < D / 16; ++n) {
      FragBr fb;
      wmma::load_matrix_sync(fb, bm + k * (D + kPadH) + n * 16, D + kPadH);
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
}

// Writes a warp's 16 x D fp32 fragments times `scale` to global bf16 rows through shared staging.
template <int D>
__device__ __forceinline__ void store_frags(FragC* acc, float* stage, bf16* gmem, int64_t row_stride, int rows_left,
                                            float scale) {
  const int lane = threadIdx.x % 32;
  for (int n = 0; n < D / 16; ++n) {
    wmma::store_matrix_sync(stage, acc[n], 16, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int r = e / 16, c = e % 16;
      if (r < rows_left) gmem[r * row_stride + n * 16 + c] = __float2bfloat16(stage[e] * scale);
    }
    __syncwarp();
  }
}

template <int D>
struct FwdSmem {
  bf16 q[kB][D + kPadH], k[kB][D + kPadH], v[kB][D + kPadH];
  float s[kB][kB + kPadF];
  bf16 pm[kB][kB + kPadH];
  float o[kB][D + kPadF];
  int32_t spans[4][kB];
  float m[kB], l[kB];
  int n_live;
};

template <int D>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const FlashMaskParams p) {
  extern __shared__ __align__(16) char smem_raw[];
  FwdSmem<D>& sm = *reinterpret_cast<FwdSmem<D>*>(smem_raw);
  const int ncb = p.s_pad / kB;
  int8_t* kinds = reinterpret_cast<int8_t*>(smem_raw + sizeof(FwdSmem<D>));
  int* live = reinterpret_cast<int*>(smem_raw + sizeof(FwdSmem<D>) + ((ncb + 15) / 16) * 16);
  const int nrb = cdiv(p.S, kB), rb = nrb - 1 - int(blockIdx.x);
  const int b = int(blockIdx.y) / p.Hq, h = int(blockIdx.y) % p.Hq;
  const Ctx cx = make_ctx(p, b, h, h / (p.Hq / p.Hkv));
  const int r0 = rb * kB, r1 = min(r0 + kB, p.S), warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int cb = threadIdx.x; cb < ncb; cb += kThreads) kinds[cb] = int8_t(classify(block_stats(cx.table, cb * kB, kB), r0, r1));
  for (int i = threadIdx.x; i < kB * (D + kPadF); i += kThreads) (&sm.o[0][0])[i] = 0.f;
  if (threadIdx.x < kB) sm.m[threadIdx.x] = -INFINITY, sm.l[threadIdx.x] = 0.f;
  __syncthreads();
  const int n_live = compact_live(kinds, ncb, live, &sm.n_live);
  const bf16* q = static_cast<const bf16*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
  const bf16* k = static_cast<const bf16*>(p.k) + b * p.k_stride[0] + cx.hkv * p.k_stride[2];
  const bf16* v = static_cast<const bf16*>(p.v) + b * p.v_stride[0] + cx.hkv * p.v_stride[2];
  load_rows<D>(&sm.q[0][0], q + r0 * p.q_stride[1], p.q_stride[1], p.S - r0);
  const float sl2 = p.scale * 1.4426950408889634f;
  const int row = 16 * warp + lane / 2, half = lane % 2;  // softmax: two lanes per row, 32 columns each
  const uint64_t row_key =
      p.drop_on ? ernie_common::dropout_row_key(ernie_common::dropout_head_key(p.drop_seed_key, b, h), r0 + row) : 0;
  for (int t = 0; t < n_live; ++t) {
    const int c0 = live[t] * kB;
    load_rows<D>(&sm.k[0][0], k + c0 * p.k_stride[1], p.k_stride[1], p.S - c0);
    load_rows<D>(&sm.v[0][0], v + c0 * p.v_stride[1], p.v_stride[1], p.S - c0);
    load_spans(sm.spans, cx.spans, p.s_pad, c0);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    warp_abt<D>(&sm.q[16 * warp][0], &sm.k[0][0], &sm.s[16 * warp][0], kB + kPadF);
    __syncwarp();
    const bool partial = kinds[live[t]] == kTilePartial;
    float mx = sm.m[row];
    for (int c = half * 32; c < half * 32 + 32; ++c) {
      float s = sm.s[row][c] * sl2;
      if (partial && masked_at(sm.spans, r0 + row, c)) s = -INFINITY;
      sm.s[row][c] = s;
      mx = fmaxf(mx, s);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_safe = mx == -INFINITY ? 0.f : mx;  // nothing allowed yet: keep p = 0, not NaN
    const float alpha = exp2f(sm.m[row] - m_safe);
    float sum = 0.f;
    for (int c = half * 32; c < half * 32 + 32; c += 2) {  // c0 + c is even: one hash per column pair
      const float p0 = exp2f(sm.s[row][c] - m_safe), p1 = exp2f(sm.s[row][c + 1] - m_safe);
      sum += p0 + p1;
      bool keep0 = true, keep1 = true;
      if (p.drop_on) {
        const uint64_t x = ernie_common::dropout_pair_bits(row_key, c0 + c);
        keep0 = uint32_t(x) >= p.drop_threshold, keep1 = uint32_t(x >> 32) >= p.drop_threshold;
      }
      sm.pm[row][c] = __float2bfloat16(keep0 ? p0 : 0.f);
      sm.pm[row][c + 1] = __float2bfloat16(keep1 ? p1 : 0.f);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    for (int d = half * (D / 2); d < (half + 1) * (D / 2); ++d) sm.o[row][d] *= alpha;
    __syncwarp();
    if (half == 0) sm.m[row] = mx, sm.l[row] = sm.l[row] * alpha + sum;
    FragC acc[D / 16];
    for (int n = 0; n < D / 16; ++n) wmma::load_matrix_sync(acc[n], &sm.o[16 * warp][n * 16], D + kPadF, wmma::mem_row_major);
    warp_ab_acc<D>(acc, &sm.pm[16 * warp][0], &sm.v[0][0]);
    for (int n = 0; n < D / 16; ++n) wmma::store_matrix_sync(&sm.o[16 * warp][n * 16], acc[n], D + kPadF, wmma::mem_row_major);
    __syncthreads();  // before the next tile's loads overwrite k / v
  }
  __syncthreads();
  bf16* out = static_cast<bf16*>(p.out) + b * p.o_stride[0] + h * p.o_stride[2];
  for (int i = threadIdx.x; i < kB * D; i += kThreads) {
    const int r = i / D, d = i % D;
    if (r0 + r < p.S) {
      const float l = sm.l[r];
      out[(r0 + r) * p.o_stride[1] + d] = __float2bfloat16(l > 0.f ? sm.o[r][d] * (p.drop_rescale / l) : 0.f);
    }
  }
  if (threadIdx.x < kB && r0 + threadIdx.x < p.S) {
    const float l = sm.l[threadIdx.x];
    p.lse[(int64_t(b) * p.Hq + h) * p.S + r0 + threadIdx.x] =
        l > 0.f ? (sm.m[threadIdx.x] + log2f(l)) * 0.6931471805599453f : -INFINITY;
  }
}

}  // namespace sm80
}  // namespace ernie_cuda

#include "flashmask_bwd_sm80.cuh"

namespace ernie_cuda {

template <class Smem, class Kernel>
static cudaError_t launch(Kernel kernel, dim3 grid, size_t extra, const FlashMaskParams& p, cudaStream_t stream) {
  const size_t smem = sizeof(Smem) + extra;
  ERNIE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  kernel<<<grid, sm80::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

static size_t list_bytes(int n) { return ((n + 15) / 16) * 16 + n * sizeof(int); }

cudaError_t flashmask_fwd_sm80(const FlashMaskParams& p, cudaStream_t stream) {
  const dim3 grid(cdiv(p.S, sm80::kB), p.B * p.Hq);
  const size_t extra = list_bytes(p.s_pad / sm80::kB);
  if (p.D == 64) return launch<sm80::FwdSmem<64>>(sm80::fwd_kernel<64>, grid, extra, p, stream);
  return launch<sm80::FwdSmem<128>>(sm80::fwd_kernel<128>, grid, extra, p, stream);
}

// delta (p.delta) is computed by flashmask_delta before this.
cudaError_t flashmask_bwd_sm80(const FlashMaskParams& p, cudaStream_t stream) {
  const int nb = cdiv(p.S, sm80::kB);
  const size_t extra = list_bytes(p.s_pad / sm80::kB);
  if (p.D == 64) {
    ERNIE_CUDA_CHECK(launch<sm80::DkdvSmem<64>>(sm80::dkdv_kernel<64>, dim3(nb, p.B * p.Hkv), extra, p, stream));
    return launch<sm80::DqSmem<64>>(sm80::dq_kernel<64>, dim3(nb, p.B * p.Hq), extra, p, stream);
  }
  ERNIE_CUDA_CHECK(launch<sm80::DkdvSmem<128>>(sm80::dkdv_kernel<128>, dim3(nb, p.B * p.Hkv), extra, p, stream));
  return launch<sm80::DqSmem<128>>(sm80::dq_kernel<128>, dim3(nb, p.B * p.Hq), extra, p, stream);
}

}  // namespace ernie_cuda
