// Attention-dropout keep mask shared by the CPU and CUDA FlashMask kernels (torch-free, header-only,
// compiles as host C++ and as CUDA __host__ __device__ code).
//
// The mask is a pure function of (seed, offset, b, h, i, j), so the backward regenerates the
// forward's mask without storing it, and every backend draws the same mask (the int64 tensor-op
// version is `dropout_keep_mask` in ernie_core/ops/reference.py; all of them must stay bit-identical):
//   mix64 = the SplitMix64 output function (Steele et al. 2014; Stafford's "Mix13" constants),
//   head  = mix64(mix64(mix64(seed) ^ offset) ^ (b << 32 | h)),   row = mix64(head ^ i),
//   x     = mix64(row + (j / 2 + 1) * 0x9E3779B97F4A7C15)   (SplitMix64's stream seeded with row),
//   u     = the low 32 bits of x for even j, the high 32 bits for odd j (one mix per column pair),
//   keep  = u >= t with t = floor(p * 2^32) (saturating at 2^32 - 1); kept probabilities are scaled
//           by 1 / (1 - p), and p = 1 gives scale 0 (every probability dropped).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define ERNIE_HD __host__ __device__ __forceinline__
#else
#define ERNIE_HD inline
#endif

namespace ernie_common {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

ERNIE_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// mix64(mix64(seed) ^ offset): one per call.
ERNIE_HD uint64_t dropout_seed_key(uint64_t seed, uint64_t offset) { return mix64(mix64(seed) ^ offset); }

// Key of (batch b, query head h).
ERNIE_HD uint64_t dropout_head_key(uint64_t seed_key, int b, int h) {
  return mix64(seed_key ^ (uint64_t(uint32_t(b)) << 32 | uint32_t(h)));
}

// Key of query row i (i >= 0) of a head.
ERNIE_HD uint64_t dropout_row_key(uint64_t head_key, int i) { return mix64(head_key ^ uint64_t(uint32_t(i))); }

// The 64 random bits of the column pair (2m, 2m + 1) holding column j: low half for even j.
ERNIE_HD uint64_t dropout_pair_bits(uint64_t row_key, int j) {
  return mix64(row_key + (uint64_t(uint32_t(j) >> 1) + 1) * kGolden);
}

ERNIE_HD uint32_t dropout_u32(uint64_t row_key, int j) {
  const uint64_t x = dropout_pair_bits(row_key, j);
  return (j & 1) ? uint32_t(x >> 32) : uint32_t(x);
}

ERNIE_HD bool dropout_keep(uint64_t row_key, int j, uint32_t threshold) { return dropout_u32(row_key, j) >= threshold; }

// floor(p * 2^32) for p in [0, 1], saturated to 2^32 - 1 (exact: p * 2^32 is a power-of-two scaling).
ERNIE_HD uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : (t <= 0.0 ? 0u : uint32_t(t));  // uint32_t() truncates = floor
}

// 1 / (1 - p), 0 for p = 1.
ERNIE_HD float dropout_rescale(double p) { return p < 1.0 ? float(1.0 / (1.0 - p)) : 0.0f; }

}  // namespace ernie_common
