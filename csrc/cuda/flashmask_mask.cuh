// Helpers shared by the FlashMask kernels: column spans, tile classification and the element mask.
// All but compact_live are __host__ __device__, so tests/test_cuda_build.py checks the plan they
// make on the host (csrc/cuda/test/host_plan_test.cu) against the reference's dense mask.
#pragma once

#include "flashmask.h"

namespace ernie_cuda {

constexpr int kTileSkipped = 0, kTileUnmasked = 1, kTilePartial = 2;
constexpr int kBig = 1 << 30;

__host__ __device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

// Column j's masked rows as two spans, lower [ls, le) and upper [us, ue), from its n_idx indices
// (col, null for no mask tensor). Same rewrite as ernie_core/ops/triton/_mask.py: causal masks
// hide the whole upper triangle; the lower span starts at the diagonal at the earliest and the
// upper one ends there at the latest; empty spans become (kBig, -kBig), which never moves a block's
// min start / max end. Columns j >= S (padding) are masked for every row.
__host__ __device__ __forceinline__ void column_spans(const int32_t* col, int n_idx, bool causal, int j, int S,
                                                     int out[4]) {
  int ls = -kBig, le = kBig, us = kBig, ue = -kBig;  // padding column: masked for every row
  if (j < S) {
    int a[4] = {kBig, kBig, kBig, kBig};
    if (col != nullptr)
      for (int i = 0; i < n_idx; ++i) a[i] = col[i];
    if (causal) {
      ls = col ? a[0] : kBig, le = (col && n_idx == 2) ? a[1] : kBig;
      us = 0, ue = kBig;  // the whole upper triangle
    } else if (col == nullptr) {
      ls = kBig, le = kBig, us = 0, ue = 0;
    } else if (n_idx == 2) {
      ls = a[0], le = kBig, us = 0, ue = a[1];
    } else {
      ls = a[0], le = a[1], us = a[2], ue = a[3];
    }
    ls = imax(ls, j), ue = imin(ue, j);
    if (ls >= le) ls = kBig, le = -kBig;
    if (us >= ue) us = kBig, ue = -kBig;
  }
  out[0] = ls, out[1] = le, out[2] = us, out[3] = ue;
}

// The min/max table entry of one 64-column block: sp points at its first column's ls (spans are
// [4][s_pad]); v = ls_min, ls_max, le_min, le_max, us_min, us_max, ue_min, ue_max.
__host__ __device__ __forceinline__ void table_entry(const int32_t* sp, int s_pad, int v[8]) {
  for (int i = 0; i < 8; ++i) v[i] = (i % 2 == 0) ? kBig : -kBig;
  for (int c = 0; c < kMaskBlock; ++c)
    for (int a = 0; a < 4; ++a) {
      const int x = sp[a * s_pad + c];
      v[2 * a] = imin(v[2 * a], x), v[2 * a + 1] = imax(v[2 * a + 1], x);
    }
}

// min/max over columns [c0, c0 + ncols) (ncols a multiple of 64) of ls, le, us, ue, from the table.
struct BlockStats {
  int v[8];  // ls_min, ls_max, le_min, le_max, us_min, us_max, ue_min, ue_max
};

__host__ __device__ __forceinline__ BlockStats block_stats(const int32_t* table_bhm, int c0, int ncols) {
  BlockStats s;
#pragma unroll
  for (int i = 0; i < 8; ++i) s.v[i] = (i % 2 == 0) ? kBig : -kBig;
  for (int cb = c0 / kMaskBlock; cb < (c0 + ncols) / kMaskBlock; ++cb) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int x = table_bhm[cb * 8 + i];
      s.v[i] = (i % 2 == 0) ? imin(s.v[i], x) : imax(s.v[i], x);
    }
  }
  return s;
}

// Rows [r0, r1) against a column block with these stats.
__host__ __device__ __forceinline__ int classify(const BlockStats& s, int r0, int r1) {
  const bool skipped = (s.v[1] <= r0 && s.v[2] >= r1) || (s.v[5] <= r0 && s.v[6] >= r1);
  if (skipped) return kTileSkipped;
  const bool unmasked = (s.v[3] <= r0 || s.v[0] >= r1) && (s.v[7] <= r0 || s.v[4] >= r1);
  return unmasked ? kTileUnmasked : kTilePartial;
}

__host__ __device__ __forceinline__ bool masked(int row, int ls, int le, int us, int ue) {
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
