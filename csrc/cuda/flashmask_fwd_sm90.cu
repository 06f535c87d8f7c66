// FlashMask attention forward for Hopper (sm_90a), D = 128, bf16.
//
// One CTA = two consumer warpgroups = 128 query rows (64 each). Q stays in shared memory; K and V
// tiles of 128 keys are double-buffered with cp.async. S = Q K^T is a wgmma with both operands in
// shared memory (SS); P goes to registers as bf16 and O += P V is a wgmma with A from registers
// (RS), V read MN-major from the same shared tile. Before the loop the CTA classifies every column
// block from the min/max table (skipped / unmasked / partial) and compacts the live ones, so
// skipped tiles cost nothing and the element mask runs only on partial tiles.
// Not yet here (FlashAttention-3's next steps): TMA loads, a producer warpgroup with setmaxnreg,
// and overlapping softmax of one warpgroup with the other's GEMMs.
#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>

#include "common.cuh"
#include "flashmask_mask.cuh"

namespace ernie_cuda {
namespace sm90 {

using namespace cute;

constexpr int kBM = 128, kBN = 128, kD = 128, kThreads = 256;
using Elem = cutlass::bfloat16_t;

using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elem>{}, Shape<Int<kBM>, Int<kD>>{}));
using SmemLayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elem>{}, Shape<Int<kBN>, Int<kD>>{}));
// V^T as the B operand of O = P V: shape (D, keys), D contiguous ("MN-major").
using SmemLayoutVt = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Elem>{}, Shape<Int<kD>, Int<kBN>>{}));
using MmaS = decltype(make_tiled_mma(GMMA::ss_op_selector<Elem, Elem, float, Shape<_64, Int<kBN>, Int<kD>>>(),
                                     Layout<Shape<_2, _1, _1>>{}));
using MmaO = decltype(make_tiled_mma(
    GMMA::rs_op_selector<Elem, Elem, float, Shape<_64, Int<kD>, Int<kBN>>, GMMA::Major::K, GMMA::Major::MN>(),
    Layout<Shape<_2, _1, _1>>{}));

struct SharedStorage {
  alignas(1024) Elem q[cosize_v<SmemLayoutQ>];
  alignas(1024) Elem k[2][cosize_v<SmemLayoutK>];
  alignas(1024) Elem v[2][cosize_v<SmemLayoutVt>];
  int32_t spans[2][4][kBN];
  int n_live;
};

// rows x kD tile from global (row stride in elements) into a swizzled shared layout, 16 B a thread.
template <int kRows, class Layout, bool kTransposed>
__device__ __forceinline__ void load_tile(Elem* smem, const Elem* gmem, int64_t row_stride, int rows_left) {
  constexpr int kChunksPerRow = kD / 8;
#pragma unroll
  for (int c = threadIdx.x; c < kRows * kChunksPerRow; c += kThreads) {
    const int r = c / kChunksPerRow, d = (c % kChunksPerRow) * 8;
    const int off = kTransposed ? Layout{}(d, r) : Layout{}(r, d);
    const bool ok = r < rows_left;
    cp_async16(smem + off, gmem + (ok ? r * row_stride + d : 0), ok);
  }
}

__device__ __forceinline__ void fence_async_proxy() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__global__ void __launch_bounds__(kThreads, 1) fwd_kernel(const FlashMaskParams p) {
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

  for (int cb = threadIdx.x; cb < ncb; cb += kThreads) kinds[cb] = int8_t(classify(block_stats(table, cb * kBN, kBN), r0, r1));
  __syncthreads();
  const int n_live = compact_live(kinds, ncb, live, &sm.n_live);

  const Elem* q = static_cast<const Elem*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
  const Elem* k = static_cast<const Elem*>(p.k) + b * p.k_stride[0] + hkv * p.k_stride[2];
  const Elem* v = static_cast<const Elem*>(p.v) + b * p.v_stride[0] + hkv * p.v_stride[2];
  load_tile<kBM, SmemLayoutQ, false>(sm.q, q + r0 * p.q_stride[1], p.q_stride[1], p.S - r0);
  auto load_kv = [&](int t, int stage) {
    const int c0 = live[t] * kBN;
    load_tile<kBN, SmemLayoutK, false>(sm.k[stage], k + c0 * p.k_stride[1], p.k_stride[1], p.S - c0);
    load_tile<kBN, SmemLayoutVt, true>(sm.v[stage], v + c0 * p.v_stride[1], p.v_stride[1], p.S - c0);
    for (int i = threadIdx.x; i < 4 * kBN; i += kThreads) sm.spans[stage][i / kBN][i % kBN] = spans[(i / kBN) * p.s_pad + c0 + i % kBN];
  };
  if (n_live > 0) load_kv(0, 0);
  cp_async_commit();

  MmaS mma_s;
  MmaO mma_o;
  auto thr_s = mma_s.get_slice(threadIdx.x);
  auto thr_o = mma_o.get_slice(threadIdx.x);
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

  for (int t = 0; t < n_live; ++t) {
    const int stage = t & 1;
    if (t + 1 < n_live) load_kv(t + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    fence_async_proxy();  // cp.async wrote through the generic proxy; wgmma reads through the async one
    __syncthreads();
    Tensor tSrK = thr_s.partition_fragment_B(make_tensor(make_smem_ptr(sm.k[stage]), SmemLayoutK{}));
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
      float s = tSrS(i) * scale_log2;
      if (partial) {
        const int row = r0 + get<0>(tScS(i)), col = get<1>(tScS(i));
        if (masked(row, sm.spans[stage][0][col], sm.spans[stage][1][col], sm.spans[stage][2][col], sm.spans[stage][3][col]))
          s = -INFINITY;
      }
      tSrS(i) = s;
      const int slot = (i / 2) % 2;
      m_new[slot] = fmaxf(m_new[slot], s);
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
    const int c0 = live[t] * kBN;
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
    Tensor tOrV = thr_o.partition_fragment_B(make_tensor(make_smem_ptr(sm.v[stage]), SmemLayoutVt{}));
    warpgroup_fence_operand(tOrO);
    warpgroup_arrive();
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tOrV); ++kb) cute::gemm(mma_o, tOrP(_, _, kb), tOrV(_, _, kb), tOrO);
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
    __syncthreads();  // the next iteration's prefetch overwrites this stage's buffers
  }

  float inv_l[2];
  CUTE_UNROLL
  for (int r = 0; r < 2; ++r) {
    l_row[r] = warp_sum_quad(l_row[r]);
    inv_l[r] = l_row[r] > 0.f ? p.drop_rescale / l_row[r] : 0.f;  // fully masked rows: out 0, lse -inf
  }
  Elem* out = static_cast<Elem*>(p.out) + b * p.o_stride[0] + h * p.o_stride[2];
  CUTE_UNROLL
  for (int i = 0; i < size(tOrO); ++i) {
    const int row = r0 + get<0>(tOcO(i)), col = get<1>(tOcO(i));
    if (row < p.S) out[row * p.o_stride[1] + col] = Elem(tOrO(i) * inv_l[(i / 2) % 2]);
  }
  if (threadIdx.x % 4 == 0) {
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

}  // namespace sm90

cudaError_t flashmask_fwd_sm90(const FlashMaskParams& p, cudaStream_t stream) {
  const int ncb = p.s_pad / sm90::kBN;
  const size_t smem = sizeof(sm90::SharedStorage) + ((ncb + 15) / 16) * 16 + ncb * sizeof(int);
  ERNIE_CUDA_CHECK(cudaFuncSetAttribute(sm90::fwd_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  dim3 grid(cdiv(p.S, sm90::kBM), p.B * p.Hq);
  sm90::fwd_kernel<<<grid, sm90::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace ernie_cuda
