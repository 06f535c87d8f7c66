// FlashMask attention forward for Hopper (sm_90a), D = 128, bf16: warp-specialised, TMA + wgmma.
//
// Design (aimed at S = 32K, D = 128, causal-document masks on an H200):
// - One CTA per (batch, query head, block of kBM = 128 rows), three warpgroups (384 threads, one CTA
//   per SM): warpgroup 0 is the producer, warpgroups 1 and 2 are consumers owning rows [0, 64) and
//   [64, 128) of the block. setmaxnreg hands the producer's registers to the consumers (40 vs 232
//   a thread), which hold the 64 x 128 fp32 output accumulator, the 64 x 128 score tile and the bf16
//   probabilities in registers.
// - The producer (one elected thread) loads Q once and then K and V tiles of kBN = 128 keys with TMA
//   (cp.async.bulk.tensor, 128-byte swizzle, two 64-column boxes per 128-column tile) into a 2-stage
//   shared-memory ring: per stage "full" mbarriers for K and for V (TMA transaction bytes; S = Q K^T
//   starts before V has landed) and an "empty" mbarrier (one arrival per consumer warp once its
//   wgmmas have read the stage). Loads of tile t + 1 run
//   while the consumers compute tile t, and the address generation costs the consumers nothing.
//   Rows past S are zero-filled by TMA (out-of-bounds box elements) and masked by the column spans.
// - Consumers: S = Q K^T (wgmma SS, 64 x 128 x 128 per warpgroup), the FlashMask element mask on
//   partial tiles only, online softmax in base 2 (FlashAttention-2's running max / sum, one exp2 per
//   score), dropout's keep mask (common/dropout_hash.h, one hash per column pair) on P, then
//   O += P V (wgmma RS: P from registers as bf16, V^T an MN-major view of the same swizzled tile).
//   The two consumer warpgroups are not synchronised with each other, so one's softmax overlaps the
//   other's wgmmas.
// - FlashMask: before the roles split, the CTA classifies every 128-column key block from the
//   per-64-column min/max table (skipped / unmasked / partial, the FlashMask paper's test) and
//   compacts the live ones; the producer loads only live tiles and the consumers apply the element
//   mask (per-column spans, read through L1) only on partial ones. Skipped tiles cost nothing.
// - GQA: K / V come from kv head h / (Hq / Hkv); the tensor maps address [B, S, H, D] with any
//   (16-byte multiple) strides, so no copies.
// Not here yet: FlashAttention-3's intra-warpgroup overlap of softmax(t) with S(t + 1) and the
// ping-pong scheduling of the two consumer warpgroups.
#include <cuda.h>  // CUtensorMap and the driver's enums (types only: no link against libcuda)

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>

#include "common.cuh"
#include "flashmask_mask.cuh"

namespace ernie_cuda {
namespace sm90 {

using namespace cute;

constexpr int kBM = 128, kBN = 128, kD = 128, kStages = 2;
constexpr int kConsumerThreads = 256, kThreads = 384;  // warpgroup 0: producer
constexpr int kBoxCols = 64;                           // 64 bf16 = 128 bytes: the swizzle's row
using Elem = cutlass::bfloat16_t;

using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elem>{}, Shape<Int<kBM>, Int<kD>>{}));
using SmemLayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elem>{}, Shape<Int<kBN>, Int<kD>>{}));
// V^T as the B operand of O = P V: (D, keys), the bytes of the (keys, D) tile read MN-major.
using SmemLayoutVt = decltype(composition(SmemLayoutK{}, make_layout(Shape<Int<kD>, Int<kBN>>{}, GenRowMajor{})));
using MmaS = decltype(make_tiled_mma(GMMA::ss_op_selector<Elem, Elem, float, Shape<_64, Int<kBN>, Int<kD>>>(),
                                     Layout<Shape<_2, _1, _1>>{}));
using MmaO = decltype(make_tiled_mma(
    GMMA::rs_op_selector<Elem, Elem, float, Shape<_64, Int<kD>, Int<kBN>>, GMMA::Major::K, GMMA::Major::MN>(),
    Layout<Shape<_2, _1, _1>>{}));

// A (rows, D) tile with the K-major 128-byte-swizzle layout is two column halves of rows x 64, each
// rows x 128 bytes, exactly what a TMA box {64, rows} with CU_TENSOR_MAP_SWIZZLE_128B writes.
static_assert(SmemLayoutK{}(0, kBoxCols) == kBN * kBoxCols, "second column half starts after the first");
static_assert(SmemLayoutQ{}(0, kBoxCols) == kBM * kBoxCols, "second column half starts after the first");

struct SharedStorage {
  alignas(1024) Elem q[cosize_v<SmemLayoutQ>];
  alignas(1024) Elem k[kStages][cosize_v<SmemLayoutK>];
  alignas(1024) Elem v[kStages][cosize_v<SmemLayoutK>];
  alignas(8) uint64_t full_k[kStages], full_v[kStages], empty[kStages], q_full;
  int n_live;
};

// TMA descriptors of q, k, v as 4-D tensors {D, S, H, B}; passed by value as __grid_constant__.
struct TmaMaps {
  CUtensorMap q, k, v;
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
// Blocks until the phase with this parity has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}
// One {64, rows, 1, 1} box of a {D, S, H, B} tensor into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load(void* smem, const CUtensorMap* map, uint64_t* bar, int d, int row, int head,
                                         int batch) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::
          "r"(smem_u32(smem)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(d), "r"(row), "r"(head), "r"(batch)
      : "memory");
}
__device__ __forceinline__ void prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

__global__ void __launch_bounds__(kThreads, 1) fwd_kernel(const FlashMaskParams p, const __grid_constant__ TmaMaps maps) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  extern __shared__ __align__(1024) char smem_raw[];
  SharedStorage& sm = *reinterpret_cast<SharedStorage*>(smem_raw);
  const int ncb = p.s_pad / kBN;
  int8_t* kinds = reinterpret_cast<int8_t*>(smem_raw + sizeof(SharedStorage));
  int* live = reinterpret_cast<int*>(smem_raw + sizeof(SharedStorage) + ((ncb + 15) / 16) * 16);

  const int nrb = cdiv(p.S, kBM);
  const int rb = nrb - 1 - int(blockIdx.x);  // heaviest row blocks first
  const int b = int(blockIdx.y) / p.Hq, h = int(blockIdx.y) % p.Hq;
  const int hkv = h / (p.Hq / p.Hkv);
  const int hm = (p.idx != nullptr && p.idx_heads > 1) ? hkv : 0;
  const int bhm = b * ((p.idx != nullptr) ? p.idx_heads : 1) + hm;
  const int r0 = rb * kBM, r1 = min(r0 + kBM, p.S);
  const int32_t* table = p.table + int64_t(bhm) * (p.s_pad / kMaskBlock) * 8;
  const int32_t* spans = p.spans + int64_t(bhm) * 4 * p.s_pad;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s)
      mbar_init(&sm.full_k[s], 1), mbar_init(&sm.full_v[s], 1), mbar_init(&sm.empty[s], kConsumerThreads / 32);
    mbar_init(&sm.q_full, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // visible to the async proxy
  }
  for (int cb = threadIdx.x; cb < ncb; cb += kThreads) kinds[cb] = int8_t(classify(block_stats(table, cb * kBN, kBN), r0, r1));
  __syncthreads();
  const int n_live = compact_live(kinds, ncb, live, &sm.n_live);  // ends with __syncthreads

  if (threadIdx.x < 128) {  // ---- producer warpgroup ----
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (threadIdx.x == 0) {
      prefetch_map(&maps.q), prefetch_map(&maps.k), prefetch_map(&maps.v);
      constexpr uint32_t kQBytes = kBM * kD * sizeof(Elem), kTileBytes = kBN * kD * sizeof(Elem);
      mbar_expect_tx(&sm.q_full, kQBytes);
      for (int half = 0; half < kD / kBoxCols; ++half)
        tma_load(sm.q + half * kBM * kBoxCols, &maps.q, &sm.q_full, half * kBoxCols, r0, h, b);
      for (int t = 0; t < n_live; ++t) {
        const int s = t % kStages, c0 = live[t] * kBN;
        if (t >= kStages) mbar_wait(&sm.empty[s], uint32_t((t / kStages - 1) & 1));  // consumers released it
        mbar_expect_tx(&sm.full_k[s], kTileBytes);
        for (int half = 0; half < kD / kBoxCols; ++half)
          tma_load(sm.k[s] + half * kBN * kBoxCols, &maps.k, &sm.full_k[s], half * kBoxCols, c0, hkv, b);
        mbar_expect_tx(&sm.full_v[s], kTileBytes);
        for (int half = 0; half < kD / kBoxCols; ++half)
          tma_load(sm.v[s] + half * kBN * kBoxCols, &maps.v, &sm.full_v[s], half * kBoxCols, c0, hkv, b);
      }
    }
    return;
  }

  // ---- consumer warpgroups ----
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int tid = int(threadIdx.x) - 128;  // 0..255: rows [0, 64) for warpgroup 1, [64, 128) for 2
  MmaS mma_s;
  MmaO mma_o;
  auto thr_s = mma_s.get_slice(tid);
  auto thr_o = mma_o.get_slice(tid);
  Tensor sQ = make_tensor(make_smem_ptr(sm.q), SmemLayoutQ{});
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);
  Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kBM>, Int<kBN>>{});
  Tensor tOrO = partition_fragment_C(mma_o, Shape<Int<kBM>, Int<kD>>{});
  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
  Tensor tOcO = thr_o.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kD>>{}));
  static_assert(size<0>(tSrS) == 2 * 2 * (kBN / 8) && size<1>(tSrS) == 1 && size<2>(tSrS) == 1, "64xN C layout");
  clear(tOrO);
  // Each thread holds 2 rows (the middle mode of the C layout); a row is spread over a lane quad.
  float m_row[2] = {-INFINITY, -INFINITY}, l_row[2] = {0.f, 0.f};
  const float scale_log2 = p.scale * 1.4426950408889634f;
  uint64_t row_key[2] = {0, 0};  // dropout keep-mask keys of this thread's two rows
  if (p.drop_on) {
    const uint64_t head_key = ernie_common::dropout_head_key(p.drop_seed_key, b, h);
    for (int r = 0; r < 2; ++r) row_key[r] = ernie_common::dropout_row_key(head_key, r0 + get<0>(tScS(2 * r)));
  }
  mbar_wait(&sm.q_full, 0);

  for (int t = 0; t < n_live; ++t) {
    const int s = t % kStages, c0 = live[t] * kBN;
    mbar_wait(&sm.full_k[s], uint32_t((t / kStages) & 1));  // S needs K only; V may still be landing
    Tensor tSrK = thr_s.partition_fragment_B(make_tensor(make_smem_ptr(sm.k[s]), SmemLayoutK{}));
    warpgroup_fence_operand(tSrS);
    warpgroup_arrive();
    mma_s.accumulate_ = GMMA::ScaleOut::Zero;
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tSrQ); ++kb) {
      cute::gemm(mma_s, tSrQ(_, _, kb), tSrK(_, _, kb), tSrS);
      mma_s.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(tSrS);

    const bool partial = kinds[live[t]] == kTilePartial;
    float m_new[2] = {m_row[0], m_row[1]};
    CUTE_UNROLL
    for (int i = 0; i < size(tSrS); ++i) {
      float sc = tSrS(i) * scale_log2;
      if (partial) {
        const int row = r0 + get<0>(tScS(i)), col = c0 + get<1>(tScS(i));
        if (masked(row, __ldg(spans + col), __ldg(spans + p.s_pad + col), __ldg(spans + 2 * p.s_pad + col),
                   __ldg(spans + 3 * p.s_pad + col)))
          sc = -INFINITY;
      }
      tSrS(i) = sc;
      const int slot = (i / 2) % 2;
      m_new[slot] = fmaxf(m_new[slot], sc);
    }
    float alpha[2], m_safe[2];
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
      m_new[r] = warp_max_quad(m_new[r]);
      // A row with nothing allowed yet keeps m = -inf; subtracting 0 keeps exp2 at 0, not NaN.
      m_safe[r] = m_new[r] == -INFINITY ? 0.f : m_new[r];
      alpha[r] = exp2f(m_row[r] - m_safe[r]);
      m_row[r] = m_new[r];
      l_row[r] *= alpha[r];
    }
    Tensor rP = make_tensor<Elem>(tSrS.layout());
    CUTE_UNROLL
    for (int i = 0; i < size(tSrS); i += 2) {  // (i, i + 1): columns (2m, 2m + 1) of one row
      const int slot = (i / 2) % 2;
      const float p0 = exp2f(tSrS(i) - m_safe[slot]), p1 = exp2f(tSrS(i + 1) - m_safe[slot]);
      l_row[slot] += p0 + p1;  // this thread's share; the quad sum happens once at the end
      bool keep0 = true, keep1 = true;
      if (p.drop_on) {  // one hash per column pair; lse keeps the undropped probabilities
        const uint64_t x = ernie_common::dropout_pair_bits(row_key[slot], c0 + get<1>(tScS(i)));
        keep0 = uint32_t(x) >= p.drop_threshold, keep1 = uint32_t(x >> 32) >= p.drop_threshold;
      }
      rP(i) = Elem(keep0 ? p0 : 0.f);
      rP(i + 1) = Elem(keep1 ? p1 : 0.f);
    }
    CUTE_UNROLL
    for (int i = 0; i < size(tOrO); ++i) tOrO(i) *= alpha[(i / 2) % 2];
    // The accumulator of a 64xN wgmma, regrouped as the A operand (64x16 k-slices) of the next one.
    Tensor tOrP = make_tensor(rP.data(), Layout<Shape<Shape<_2, _2, _2>, _1, Int<kBN / 16>>,
                                                Stride<Stride<_1, _2, _4>, _0, _8>>{});
    Tensor tOrV = thr_o.partition_fragment_B(make_tensor(make_smem_ptr(sm.v[s]), SmemLayoutVt{}));
    mbar_wait(&sm.full_v[s], uint32_t((t / kStages) & 1));
    warpgroup_fence_operand(tOrO);
    warpgroup_arrive();
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tOrV); ++kb) cute::gemm(mma_o, tOrP(_, _, kb), tOrV(_, _, kb), tOrO);
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
    if (tid % 32 == 0) mbar_arrive(&sm.empty[s]);  // this warp is done reading stage s
  }

  float inv_l[2];
  CUTE_UNROLL
  for (int r = 0; r < 2; ++r) {
    l_row[r] = warp_sum_quad(l_row[r]);
    inv_l[r] = l_row[r] > 0.f ? p.drop_rescale / l_row[r] : 0.f;  // fully masked rows: out 0, lse -inf
  }
  Elem* out = static_cast<Elem*>(p.out) + b * p.o_stride[0] + h * p.o_stride[2];
  CUTE_UNROLL
  for (int i = 0; i < size(tOrO); i += 2) {  // (i, i + 1): columns (d, d + 1), one 4-byte store
    const int row = r0 + get<0>(tOcO(i)), col = get<1>(tOcO(i));
    if (row < p.S) {
      const __nv_bfloat162 pair = __floats2bfloat162_rn(tOrO(i) * inv_l[(i / 2) % 2], tOrO(i + 1) * inv_l[(i / 2) % 2]);
      *reinterpret_cast<__nv_bfloat162*>(out + row * p.o_stride[1] + col) = pair;
    }
  }
  if (tid % 4 == 0) {
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int row = r0 + get<0>(tScS(2 * r));
      if (row < p.S)
        p.lse[(int64_t(b) * p.Hq + h) * p.S + row] =
            l_row[r] > 0.f ? (m_row[r] + log2f(l_row[r])) * 0.6931471805599453f : -INFINITY;
    }
  }
#endif
}

// cuTensorMapEncodeTiled's type (CUDA 12.0 ABI), spelled out: CUTLASS includes <cudaTypedefs.h>
// inside its own namespace, so its PFN_ typedefs are not reliably visible here.
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver's cuTensorMapEncodeTiled through the runtime (no link against libcuda).
static cudaError_t get_encode(EncodeTiledFn* fn) {
  static EncodeTiledFn cached = nullptr;
  if (cached == nullptr) {
    cudaDriverEntryPointQueryResult status;
    void* ptr = nullptr;
#if CUDART_VERSION >= 12050
    ERNIE_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status));
#else
    ERNIE_CUDA_CHECK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &ptr, cudaEnableDefault, &status));
#endif
    if (status != cudaDriverEntryPointSuccess || ptr == nullptr) return cudaErrorNotSupported;
    cached = reinterpret_cast<EncodeTiledFn>(ptr);
  }
  *fn = cached;
  return cudaSuccess;
}

// {D, S, H, B} view of a bf16 [B, S, H, D] tensor (strides in elements), boxes of {64, rows}.
static cudaError_t make_map(CUtensorMap* map, const void* base, const FlashMaskParams& p, int heads,
                            const int64_t* stride, int rows) {
  EncodeTiledFn encode = nullptr;
  ERNIE_CUDA_CHECK(get_encode(&encode));
  const cuuint64_t dims[4] = {cuuint64_t(p.D), cuuint64_t(p.S), cuuint64_t(heads), cuuint64_t(p.B)};
  const cuuint64_t strides[3] = {cuuint64_t(stride[1]) * 2, cuuint64_t(stride[2]) * 2, cuuint64_t(stride[0]) * 2};
  const cuuint32_t box[4] = {cuuint32_t(kBoxCols), cuuint32_t(rows), 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, const_cast<void*>(base), dims, strides, box,
                            elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace sm90

cudaError_t flashmask_fwd_sm90(const FlashMaskParams& p, cudaStream_t stream) {
  sm90::TmaMaps maps;
  ERNIE_CUDA_CHECK(sm90::make_map(&maps.q, p.q, p, p.Hq, p.q_stride, sm90::kBM));
  ERNIE_CUDA_CHECK(sm90::make_map(&maps.k, p.k, p, p.Hkv, p.k_stride, sm90::kBN));
  ERNIE_CUDA_CHECK(sm90::make_map(&maps.v, p.v, p, p.Hkv, p.v_stride, sm90::kBN));
  const int ncb = p.s_pad / sm90::kBN;
  const size_t smem = sizeof(sm90::SharedStorage) + ((ncb + 15) / 16) * 16 + ncb * sizeof(int);
  ERNIE_CUDA_CHECK(cudaFuncSetAttribute(sm90::fwd_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  dim3 grid(cdiv(p.S, sm90::kBM), p.B * p.Hq);
  sm90::fwd_kernel<<<grid, sm90::kThreads, smem, stream>>>(p, maps);
  return cudaGetLastError();
}

}  // namespace ernie_cuda
