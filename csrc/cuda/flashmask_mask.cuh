// Device helpers shared by the FlashMask kernels: tile classification and the element mask.
#pragma once

#include "flashmask.h"

namespace ernie_cuda {

constexpr int kTileSkipped = 0, kTileUnmasked = 1, kTilePartial = 2;
constexpr int kBig = 1 << 30;

// min/max over columns [c0, c0 + ncols) (ncols a multiple of 64) of ls, le, us, ue, from the table.
struct BlockStats {
  int v[8];  // ls_min, ls_max, le_min, le_max, us_min, us_max, ue_min, ue_max
};

__device__ __forceinline__ BlockStats block_stats(const int32_t* table_bhm, int c0, int ncols) {
  BlockStats s;
#pragma unroll
  for (int i = 0; i < 8; ++i) s.v[i] = (i % 2 == 0) ? kBig : -kBig;
  for (int cb = c0 / kMaskBlock; cb < (c0 + ncols) / kMaskBlock; ++cb) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int x = table_bhm[cb * 8 + i];
      s.v[i] = (i % 2 == 0) ? min(s.v[i], x) : max(s.v[i], x);
    }
  }
  return s;
}

// Rows [r0, r1) against a column block with these stats.
__device__ __forceinline__ int classify(const BlockStats& s, int r0, int r1) {
  const bool skipped = (s.v[1] <= r0 && s.v[2] >= r1) || (s.v[5] <= r0 && s.v[6] >= r1);
  if (skipped) return kTileSkipped;
  const bool unmasked = (s.v[3] <= r0 || s.v[0] >= r1) && (s.v[7] <= r0 || s.v[4] >= r1);
  return unmasked ? kTileUnmasked : kTilePartial;
}

__device__ __forceinline__ bool masked(int row, int ls, int le, int us, int ue) {
  return (row >= ls && row < le) || (row >= us && row < ue);
}

// Warp 0 compacts kinds[0..n) into the list of live (non-skipped) indices; returns the count to all.
__device__ __forceinline__ int compact_live(const int8_t* kinds, int n, int* live, int* count_smem) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int count = 0;
    for (int base = 0; base < n; base += 32) {
      const bool is_live = base + lane < n && kinds[base + lane] != kTileSkipped;
      const unsigned ballot = __ballot_sync(0xffffffffu, is_live);
      if (is_live) live[count + __popc(ballot & ((1u << lane) - 1))] = base + lane;
      count += __popc(ballot);
    }
    if (lane == 0) *count_smem = count;
  }
  __syncthreads();
  return *count_smem;
}

}  // namespace ernie_cuda
