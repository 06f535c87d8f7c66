// FlashMask attention backward for Hopper (sm_90a), D = 128, bf16, with wgmma.
//
// Design (aimed at S = 32K, D = 128, causal-document masks on an H200):
// - One CTA per (batch, kv head, block of kBN = 128 keys), two consumer warpgroups (256 threads, one
//   CTA per SM: ~165 KB of shared memory); warpgroup w owns keys [64w, 64w + 64) of the block. K and V
//   stay in shared memory; dK and dV (64 x 128 fp32 per warpgroup, 64 + 64 registers a thread)
//   accumulate in registers over every query head of the GQA group and every live query block.
// - Query blocks are kBM = 64 rows ("128 x 64" tiles): with D = 128 the five accumulators of a step
//   (dK, dV, S^T, dP^T, dQ) then fit in the 255-register budget without spilling. Q, dO and the
//   rows' lse / delta / dropout keys are double-buffered (2 stages, cp.async), so the next block
//   loads while this one computes.
// - Per step, all with wgmma (bf16 in, fp32 accumulate):
//     S^T  = K Q^T     (SS, 128 x 64 x 128)       dP^T = V dO^T (SS)
//     P^T  = exp2(S^T scale log2e - lse2), dS^T = P^T (dP^T - delta)   (registers; transposed scores,
//            so the rows of the accumulators are keys and the row statistics are read per column)
//     dV  += P^T dO     (SS: P^T stored to shared memory, dO^T an MN-major view of dO's tile)
//     dK  += dS^T Q     (SS: dS^T stored to shared memory, needed there anyway for dQ; Q^T likewise)
//     dQ_partial = dS K (SS, K^T an MN-major view of K), then
//            added in fp32 to a [B, Hq, S, D] accumulator with vector atomics (red.global.add.v2.f32);
//            a small kernel converts it to bf16 at the end. This keeps the backward at 5 GEMMs per
//            tile (the split dK/dV + dQ scheme of the sm_80 kernel recomputes S and dP: 7 GEMMs).
//   S^T and dP^T are separate commit groups, so the exponentials of P run while dP's wgmma is still
//   in flight; the dQ GEMM overlaps the dK/dV wgmmas' tail.
// - FlashMask: before the loop the CTA classifies every 64-row query block against its key block
//   from the per-64-column min/max table (skipped / unmasked / partial, the test of the FlashMask
//   paper), compacts the live ones, and applies the element mask (from the per-column spans) only on
//   partial tiles. Skipped tiles cost nothing: for a causal-document mask the work is proportional
//   to the unmasked area.
// - dlse enters through delta (= rowsum(dO O) - dlse, flashmask_delta); dropout regenerates the
//   forward's keep mask Z (common/dropout_hash.h): dV uses Z P (the 1 / (1 - p) applied once at the
//   end), dS = P (Z dP / (1 - p) - delta), as in the CPU kernel.
// Not here yet (FlashAttention-3's further steps): TMA loads with a producer warp, and a dQ store
// through shared memory with TMA reduce-add.
#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>

#include "common.cuh"
#include "flashmask_mask.cuh"

namespace ernie_cuda {
namespace sm90bwd {

using namespace cute;

constexpr int kBM = 64, kBN = 128, kD = 128, kThreads = 256;
using Elem = cutlass::bfloat16_t;

// K, V: (keys, D), D contiguous. K^T: (D, keys), the same bytes read MN-major (dQ's B operand).
using SmemLayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elem>{}, Shape<Int<kBN>, Int<kD>>{}));
using SmemLayoutKt = decltype(composition(SmemLayoutK{}, make_layout(Shape<Int<kD>, Int<kBN>>{}, GenRowMajor{})));
// Q, dO: (rows, D), D contiguous; Q^T, dO^T: (D, rows) views (B operands of dK / dV).
using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elem>{}, Shape<Int<kBM>, Int<kD>>{}));
using SmemLayoutQt = decltype(composition(SmemLayoutQ{}, make_layout(Shape<Int<kD>, Int<kBM>>{}, GenRowMajor{})));
// dS: (rows, keys), keys contiguous: the K-major A operand of dQ = dS K.
using SmemLayoutdS = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elem>{}, Shape<Int<kBM>, Int<kBN>>{}));
// dS^T: (keys, rows), keys contiguous: the MN-major A operand of dK = dS^T Q.
using SmemLayoutdSt = decltype(composition(SmemLayoutdS{}, make_layout(Shape<Int<kBN>, Int<kBM>>{}, GenRowMajor{})));

// (keys 128) x (rows 64) x D, warpgroups split the keys.
using MmaSdP = decltype(make_tiled_mma(GMMA::ss_op_selector<Elem, Elem, float, Shape<_64, Int<kBM>, Int<kD>>>(),
                                       Layout<Shape<_2, _1, _1>>{}));
// (keys 128) x D x (rows 64): A = P^T or dS^T from shared memory (MN-major), B = (D, rows)
// MN-major. With P^T and dS^T as register (RS) operands ptxas spilled (28-72 bytes
// at 255 registers); through shared memory it fits in 255 registers without spilling.
using MmadKV = decltype(make_tiled_mma(
    GMMA::ss_op_selector<Elem, Elem, float, Shape<_64, Int<kD>, Int<kBM>>, GMMA::Major::MN, GMMA::Major::MN>(),
    Layout<Shape<_2, _1, _1>>{}));
// (rows 64) x D x (keys 128), warpgroups split D: A = dS (K-major), B = K^T (MN-major).
using MmadQ = decltype(make_tiled_mma(
    GMMA::ss_op_selector<Elem, Elem, float, Shape<_64, Int<kD / 2>, Int<kBN>>, GMMA::Major::K, GMMA::Major::MN>(),
    Layout<Shape<_1, _2, _1>>{}));

struct SharedStorage {
  alignas(1024) Elem k[cosize_v<SmemLayoutK>];
  alignas(1024) Elem v[cosize_v<SmemLayoutK>];
  alignas(1024) Elem q[2][cosize_v<SmemLayoutQ>];
  alignas(1024) Elem dout[2][cosize_v<SmemLayoutQ>];
  alignas(1024) Elem ds[cosize_v<SmemLayoutdS>];
  alignas(1024) Elem pt[cosize_v<SmemLayoutdS>];  // Z * P (dropout-masked probabilities), (rows, keys)
  float lse2[2][kBM], delta[2][kBM];
  uint64_t rkey[2][kBM];
  int32_t spans[4][kBN];
  int n_live;
};

// Where element (r, c) of a (kRows, 128) tile with the K-major 128-byte-swizzle layout lives (the Q,
// dO, K, V tiles): two (kRows, 64) halves, 16-byte chunk j of row r stored at chunk j ^ (r % 8), the
// base 1024-byte aligned. CuTe applies the layout's swizzle to the *byte address* of the unswizzled
// offset (swizzle_ptr), so the layout's integer value Layout{}(r, c) (which swizzles element
// offsets) is not the address; going through a CuTe tensor is, but costs registers (the kernel
// spilled). host_layout_test.cu checks this formula against the tensor's addresses, i.e. where
// wgmma reads, and against TMA's CU_TENSOR_MAP_SWIZZLE_128B pattern.
template <int kRows>
__host__ __device__ __forceinline__ Elem* tile_ptr(Elem* smem, int r, int c) {
  return smem + (c / 64) * kRows * 64 + r * 64 + ((((c % 64) / 8) ^ (r % 8)) * 8) + c % 8;
}

// rows x kD tile from global (row stride in elements) into a swizzled (rows, D) shared layout,
// 16 bytes a thread; rows past the end are zero-filled.
template <int kRows>
__device__ __forceinline__ void load_tile(Elem* smem, const Elem* gmem, int64_t row_stride, int rows_left) {
  constexpr int kChunksPerRow = kD / 8;
#pragma unroll
  for (int c = threadIdx.x; c < kRows * kChunksPerRow; c += kThreads) {
    const int r = c / kChunksPerRow, d = (c % kChunksPerRow) * 8;
    const bool ok = r < rows_left;
    cp_async16(tile_ptr<kRows>(smem, r, d), gmem + (ok ? r * row_stride + d : 0), ok);
  }
}

__device__ __forceinline__ void fence_async_proxy() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// acc (=|+=) A . B over the k-blocks of the fragments; zero_init starts from 0.
template <class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void gemm_k(Mma& mma, const TA& a, const TB& b, TC& c, bool zero_init) {
  mma.accumulate_ = zero_init ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    cute::gemm(mma, a(_, _, kb), b(_, _, kb), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
}

__global__ void __launch_bounds__(kThreads, 1) dkdv_dq_kernel(const FlashMaskParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  extern __shared__ __align__(1024) char smem_raw[];
  SharedStorage& sm = *reinterpret_cast<SharedStorage*>(smem_raw);
  const int nrb = cdiv(p.S, kBM);
  int8_t* kinds = reinterpret_cast<int8_t*>(smem_raw + sizeof(SharedStorage));
  int* live = reinterpret_cast<int*>(smem_raw + sizeof(SharedStorage) + ((nrb + 15) / 16) * 16);

  const int c0 = int(blockIdx.x) * kBN;  // block 0 (the most live rows under a causal mask) first
  const int b = int(blockIdx.y) / p.Hkv, hkv = int(blockIdx.y) % p.Hkv, group = p.Hq / p.Hkv;
  const int hm_count = p.idx != nullptr ? p.idx_heads : 1;
  const int bhm = b * hm_count + (hm_count > 1 ? hkv : 0);
  const int32_t* table = p.table + int64_t(bhm) * (p.s_pad / kMaskBlock) * 8;
  const int32_t* spans = p.spans + int64_t(bhm) * 4 * p.s_pad;

  // Classify the query blocks against this key block (rows past S are never live: r0 < S).
  const BlockStats st = block_stats(table, c0, kBN);
  for (int rb = threadIdx.x; rb < nrb; rb += kThreads) kinds[rb] = int8_t(classify(st, rb * kBM, min(rb * kBM + kBM, p.S)));
  for (int i = threadIdx.x; i < 4 * kBN; i += kThreads) sm.spans[i / kBN][i % kBN] = spans[(i / kBN) * p.s_pad + c0 + i % kBN];
  __syncthreads();
  const int n_live = compact_live(kinds, nrb, live, &sm.n_live);
  const int n_steps = n_live * group;  // step t: query head hkv * group + t / n_live, block live[t % n_live]

  const Elem* k = static_cast<const Elem*>(p.k) + b * p.k_stride[0] + hkv * p.k_stride[2];
  const Elem* v = static_cast<const Elem*>(p.v) + b * p.v_stride[0] + hkv * p.v_stride[2];
  load_tile<kBN>(sm.k, k + c0 * p.k_stride[1], p.k_stride[1], p.S - c0);
  load_tile<kBN>(sm.v, v + c0 * p.v_stride[1], p.v_stride[1], p.S - c0);

  // Q, dO of step t into a stage, plus its rows' base-2 lse (+inf for rows that saw nothing: P = 0),
  // delta and dropout keys (plain shared stores, read after the step's __syncthreads).
  auto load_step = [&](int t, int stage) {
    const int h = hkv * group + t / n_live, r0 = live[t % n_live] * kBM;
    const Elem* q = static_cast<const Elem*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
    const Elem* dout = static_cast<const Elem*>(p.dout) + b * p.do_stride[0] + h * p.do_stride[2];
    load_tile<kBM>(sm.q[stage], q + r0 * p.q_stride[1], p.q_stride[1], p.S - r0);
    load_tile<kBM>(sm.dout[stage], dout + r0 * p.do_stride[1], p.do_stride[1], p.S - r0);
    if (threadIdx.x < kBM) {
      const int r = r0 + int(threadIdx.x);
      const int64_t at = (int64_t(b) * p.Hq + h) * p.S + r;
      const float l = r < p.S ? p.lse[at] : -INFINITY;
      sm.lse2[stage][threadIdx.x] = l == -INFINITY ? INFINITY : l * 1.4426950408889634f;
      sm.delta[stage][threadIdx.x] = r < p.S ? p.delta[at] : 0.f;
      if (p.drop_on)
        sm.rkey[stage][threadIdx.x] =
            ernie_common::dropout_row_key(ernie_common::dropout_head_key(p.drop_seed_key, b, h), r);
    }
  };
  if (n_steps > 0) load_step(0, 0);
  cp_async_commit();

  MmaSdP mma_sdp;
  MmadKV mma_dkv;
  MmadQ mma_dq;
  auto thr_sdp = mma_sdp.get_slice(threadIdx.x);
  auto thr_dkv = mma_dkv.get_slice(threadIdx.x);
  auto thr_dq = mma_dq.get_slice(threadIdx.x);
  Tensor sK = make_tensor(make_smem_ptr(sm.k), SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(sm.v), SmemLayoutK{});
  Tensor sKt = make_tensor(make_smem_ptr(sm.k), SmemLayoutKt{});
  Tensor sdS = make_tensor(make_smem_ptr(sm.ds), SmemLayoutdS{});
  Tensor sdSt = make_tensor(make_smem_ptr(sm.ds), SmemLayoutdSt{});
  Tensor sP = make_tensor(make_smem_ptr(sm.pt), SmemLayoutdS{});
  Tensor sPt = make_tensor(make_smem_ptr(sm.pt), SmemLayoutdSt{});
  Tensor tdKrdSt = thr_dkv.partition_fragment_A(sdSt);
  Tensor tdVrPt = thr_dkv.partition_fragment_A(sPt);
  Tensor tSrK = thr_sdp.partition_fragment_A(sK);
  Tensor tSrV = thr_sdp.partition_fragment_A(sV);
  Tensor tdQrdS = thr_dq.partition_fragment_A(sdS);
  Tensor tdQrKt = thr_dq.partition_fragment_B(sKt);
  Tensor tdVrdV = partition_fragment_C(mma_dkv, Shape<Int<kBN>, Int<kD>>{});
  Tensor tdKrdK = partition_fragment_C(mma_dkv, Shape<Int<kBN>, Int<kD>>{});
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kBN>, Int<kBM>>{}));      // (key, row)
  Tensor tdQcdQ = thr_dq.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kD>>{}));      // (row, d)
  Tensor tdKcdK = thr_dkv.partition_C(make_identity_tensor(Shape<Int<kBN>, Int<kD>>{}));     // (key, d)
  static_assert(size<0>(partition_fragment_C(mma_sdp, Shape<Int<kBN>, Int<kBM>>{})) == 2 * 2 * (kBM / 8), "64xN C layout");
  clear(tdVrdV);
  clear(tdKrdK);
  const float scale_log2 = p.scale * 1.4426950408889634f;

  for (int t = 0; t < n_steps; ++t) {
    const int stage = t & 1;
    const int h = hkv * group + t / n_live, rb = live[t % n_live], r0 = rb * kBM;
    if (t + 1 < n_steps) load_step(t + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    fence_async_proxy();  // cp.async wrote through the generic proxy; wgmma reads through the async one
    __syncthreads();

    Tensor sQ = make_tensor(make_smem_ptr(sm.q[stage]), SmemLayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(sm.dout[stage]), SmemLayoutQ{});
    Tensor sQt = make_tensor(make_smem_ptr(sm.q[stage]), SmemLayoutQt{});
    Tensor sdOt = make_tensor(make_smem_ptr(sm.dout[stage]), SmemLayoutQt{});
    Tensor tSrQ = thr_sdp.partition_fragment_B(sQ);
    Tensor tSrdO = thr_sdp.partition_fragment_B(sdO);
    Tensor tSrS = partition_fragment_C(mma_sdp, Shape<Int<kBN>, Int<kBM>>{});
    Tensor tSrdP = partition_fragment_C(mma_sdp, Shape<Int<kBN>, Int<kBM>>{});
    warpgroup_fence_operand(tSrS);
    warpgroup_fence_operand(tSrdP);
    warpgroup_arrive();
    gemm_k(mma_sdp, tSrK, tSrQ, tSrS, true);
    warpgroup_commit_batch();
    gemm_k(mma_sdp, tSrV, tSrdO, tSrdP, true);
    warpgroup_commit_batch();
    warpgroup_wait<1>();  // S^T is ready; dP^T may still run
    warpgroup_fence_operand(tSrS);

    const bool partial = kinds[rb] == kTilePartial;
    CUTE_UNROLL
    for (int i = 0; i < size(tSrS); ++i) {
      const int key = get<0>(tScS(i)), row = get<1>(tScS(i));
      float pv = exp2f(tSrS(i) * scale_log2 - sm.lse2[stage][row]);
      if (partial && masked(r0 + row, sm.spans[0][key], sm.spans[1][key], sm.spans[2][key], sm.spans[3][key])) pv = 0.f;
      tSrS(i) = pv;
    }
    warpgroup_wait<0>();
    warpgroup_fence_operand(tSrdP);
    CUTE_UNROLL
    for (int i = 0; i < size(tSrS); ++i) {
      const int key = get<0>(tScS(i)), row = get<1>(tScS(i));
      const float pv = tSrS(i);
      float dpv = tSrdP(i);
      bool keep = true;
      if (p.drop_on) {
        keep = ernie_common::dropout_keep(sm.rkey[stage][row], c0 + key, p.drop_threshold);
        dpv = keep ? dpv * p.drop_rescale : 0.f;
      }
      const float ds = pv * (dpv - sm.delta[stage][row]);
      sP(row, key) = Elem(keep ? pv : 0.f);
      sdS(row, key) = Elem(ds);
    }
    fence_async_proxy();  // P, dS were written with generic stores; the wgmmas read them asynchronously
    __syncthreads();      // both warpgroups' halves of P^T and dS^T are in place (dQ needs all of dS)
    Tensor tdVrdOt = thr_dkv.partition_fragment_B(sdOt);
    Tensor tdKrQt = thr_dkv.partition_fragment_B(sQt);
    Tensor tdQrdQ = partition_fragment_C(mma_dq, Shape<Int<kBM>, Int<kD>>{});
    warpgroup_fence_operand(tdVrdV);
    warpgroup_fence_operand(tdKrdK);
    warpgroup_fence_operand(tdQrdQ);
    warpgroup_arrive();
    gemm_k(mma_dkv, tdVrPt, tdVrdOt, tdVrdV, false);
    gemm_k(mma_dkv, tdKrdSt, tdKrQt, tdKrdK, false);
    gemm_k(mma_dq, tdQrdS, tdQrKt, tdQrdQ, true);
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(tdVrdV);
    warpgroup_fence_operand(tdKrdK);
    warpgroup_fence_operand(tdQrdQ);

    // dQ rows of this block += the partial product (scale applied by the conversion kernel).
    float* dq = p.dq_accum + ((int64_t(b) * p.Hq + h) * p.S + r0) * kD;
    CUTE_UNROLL
    for (int i = 0; i < size(tdQrdQ); i += 2) {  // (i, i + 1): columns (d, d + 1) of one row
      const int row = get<0>(tdQcdQ(i)), d = get<1>(tdQcdQ(i));
      if (r0 + row < p.S) atomicAdd(reinterpret_cast<float2*>(dq + row * kD + d), make_float2(tdQrdQ(i), tdQrdQ(i + 1)));
    }
    __syncthreads();  // the next step overwrites dS and the other stage's buffers
  }

  Elem* dk = static_cast<Elem*>(p.dk) + b * p.dk_stride[0] + hkv * p.dk_stride[2];
  Elem* dv = static_cast<Elem*>(p.dv) + b * p.dv_stride[0] + hkv * p.dv_stride[2];
  CUTE_UNROLL
  for (int i = 0; i < size(tdKrdK); ++i) {
    const int key = c0 + get<0>(tdKcdK(i)), d = get<1>(tdKcdK(i));
    if (key < p.S) dk[key * p.dk_stride[1] + d] = Elem(tdKrdK(i) * p.scale);
  }
  CUTE_UNROLL
  for (int i = 0; i < size(tdVrdV); ++i) {
    const int key = c0 + get<0>(tdKcdK(i)), d = get<1>(tdKcdK(i));  // dV's layout is dK's
    if (key < p.S) dv[key * p.dv_stride[1] + d] = Elem(tdVrdV(i) * p.drop_rescale);
  }
#endif
}

// dq[b, s, h, :] = bf16(scale * accum[b, h, s, :]), 8 elements a thread.
__global__ void dq_convert_kernel(const FlashMaskParams p) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n = int64_t(p.B) * p.Hq * p.S * (kD / 8);
  if (t >= n) return;
  const int d = int(t % (kD / 8)) * 8;
  const int64_t row = t / (kD / 8);
  const int s = int(row % p.S), h = int(row / p.S % p.Hq), b = int(row / p.S / p.Hq);
  const float4* src = reinterpret_cast<const float4*>(p.dq_accum + row * kD + d);
  const float4 x = src[0], y = src[1];
  const float v[8] = {x.x, x.y, x.z, x.w, y.x, y.y, y.z, y.w};
  Elem* dst = static_cast<Elem*>(p.dq) + b * p.dq_stride[0] + s * p.dq_stride[1] + h * p.dq_stride[2] + d;
#pragma unroll
  for (int e = 0; e < 8; ++e) dst[e] = Elem(v[e] * p.scale);
}

}  // namespace sm90bwd

// delta (p.delta) is computed by flashmask_delta before this; p.dq_accum holds B * Hq * S * D floats.
cudaError_t flashmask_bwd_sm90(const FlashMaskParams& p, cudaStream_t stream) {
  const int64_t n_accum = int64_t(p.B) * p.Hq * p.S * sm90bwd::kD;
  ERNIE_CUDA_CHECK(cudaMemsetAsync(p.dq_accum, 0, size_t(n_accum) * sizeof(float), stream));
  const int nrb = cdiv(p.S, sm90bwd::kBM);
  const size_t smem = sizeof(sm90bwd::SharedStorage) + ((nrb + 15) / 16) * 16 + nrb * sizeof(int);
  ERNIE_CUDA_CHECK(
      cudaFuncSetAttribute(sm90bwd::dkdv_dq_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const dim3 grid(cdiv(p.S, sm90bwd::kBN), p.B * p.Hkv);
  sm90bwd::dkdv_dq_kernel<<<grid, sm90bwd::kThreads, smem, stream>>>(p);
  ERNIE_CUDA_CHECK(cudaGetLastError());
  const int64_t n_threads = n_accum / 8;
  sm90bwd::dq_convert_kernel<<<unsigned((n_threads + 255) / 256), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace ernie_cuda
