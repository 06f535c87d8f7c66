// FlashMask attention on CPU (torch-free): blocked attention with online softmax whose mask is
// given per key column by start/end row indices (docs/behaviour.md#flashmask-row-indices).
//
// Layouts: q/out/dout/dq [B, S, Hq, D], k/v/dk/dv [B, S, Hkv, D] with any batch/seq/head strides
// (elements) and a contiguous last dim; lse [B, Hq, S] fp32 contiguous (natural log, -inf for rows
// that may attend nothing); idx int32 [B, Hm, S, n] contiguous, Hm = 1 or Hkv, n in {1, 2, 4}.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"
#include "common/dropout_hash.h"

namespace ernie_cpu {

struct FlashMaskParams {
  DType dtype = DType::kFloat32;  // of q, k, v, out, dout, dq, dk, dv
  int B = 0, S = 0, Hq = 0, Hkv = 0, D = 0;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // written by forward, read by backward
  int64_t q_stride[3] = {}, k_stride[3] = {}, v_stride[3] = {}, o_stride[3] = {};  // batch, seq, head
  const int32_t* idx = nullptr;
  int idx_heads = 1, n_idx = 1;
  bool causal = true;
  float scale = 1.0f;
  // Attention-probability dropout (0 = off): keep mask from (seed, offset), see dropout_keep16 below.
  double dropout_p = 0.0;
  uint64_t seed = 0, offset = 0;
  // Backward only.
  const void* dout = nullptr;
  const float* dlse = nullptr;  // optional upstream gradient of lse [B, Hq, S]
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t do_stride[3] = {}, dq_stride[3] = {}, dk_stride[3] = {}, dv_stride[3] = {};
  int num_threads = 1;
};

// Returns an empty string when the params are usable, else what is wrong.
const char* flashmask_check(const FlashMaskParams& p);
void flashmask_fwd(const FlashMaskParams& p);
void flashmask_bwd(const FlashMaskParams& p);

// The AVX-512 path (flashmask_avx512.cpp): bf16 tensors in bf16 arithmetic (needs AVX512-BF16),
// fp32 tensors in fp32 (needs AVX-512F); flashmask_fwd/bwd dispatch to it when the running CPU
// has the instructions and ERNIE_CORE_FLASHMASK_PORTABLE=1 is not set.
bool flashmask_avx512_usable(DType dtype);
void flashmask_fwd_avx512(const FlashMaskParams& p);
void flashmask_bwd_avx512(const FlashMaskParams& p);

// ---- shared by forward and backward -----------------------------------------------------------

constexpr int kBlockM = 64;  // query rows per tile
constexpr int kBlockN = 64;  // key columns per tile (= 4 vectors of 16)

enum class TileKind : uint8_t { kMasked, kUnmasked, kPartial };

// The mask of every column as two masked row spans, [ls, le) in the lower triangle (row >= col)
// and [us, ue) in the upper triangle, whatever the mode; plus min/max of each per column block.
// Columns are padded to a whole block with "always masked" columns. Memory O(B * Hm * S).
class ColumnMask {
 public:
  ColumnMask(const FlashMaskParams& p);
  int num_col_blocks() const { return ncb_; }
  // bm = b * Hm + mask head. Rows [r0, r1) (r1 > r0) against column block cb.
  TileKind classify(int bm, int r0, int r1, int cb) const;
  const int32_t* ls(int bm) const { return ls_.data() + int64_t(bm) * s_pad_; }
  const int32_t* le(int bm) const { return le_.data() + int64_t(bm) * s_pad_; }
  const int32_t* us(int bm) const { return us_.data() + int64_t(bm) * s_pad_; }
  const int32_t* ue(int bm) const { return ue_.data() + int64_t(bm) * s_pad_; }

 private:
  int s_pad_ = 0, ncb_ = 0;
  std::vector<int32_t> ls_, le_, us_, ue_;
  std::vector<int32_t> blk_;  // [bm][cb][8]: min/max of ls, le, us, ue
};

// Sets masked entries of a score tile s[r][c] (row i = r0 + r, column j = c0 + c) to -inf.
void mask_tile(float* s, int nr, int r0, int c0, const ColumnMask& cm, int bm);

// C[M][16*nv] (+)= op(A) . B[K][16*nv], fp32, row-major with leading dims; nv in 1..16.
// op(A) = A[M][K], or with trans_a the transpose of A[K][M] (read as A[k * lda + i]).
void gemm(int nv, bool accumulate, bool trans_a, int M, int K, const float* A, int lda, const float* B, int ldb,
          float* C, int ldc);

// K and V of every (batch, kv head) transposed to fp32 [dp][s_pad] once per call, zero-padded, so a
// tile's K^T / V^T operand is a pointer (column offset c0, leading dim s_pad) instead of a strided
// copy per tile. Memory O(B * Hkv * S * D), linear in S.
struct TransposedKV {
  int dp = 0, s_pad = 0;
  std::vector<float> kt, vt;
  explicit TransposedKV(const FlashMaskParams& p);
  const float* k(int b, int hk, int Hkv) const { return kt.data() + (int64_t(b) * Hkv + hk) * dp * s_pad; }
  const float* v(int b, int hk, int Hkv) const { return vt.data() + (int64_t(b) * Hkv + hk) * dp * s_pad; }
};

// Loads n rows of a head slice (row stride ld) into dst[rows_pad][dp] as fp32 times scale; zero padding.
template <class T>
inline void load_tile(const T* src, int64_t ld, int n, int rows_pad, int D, int dp, float scale, float* dst) {
  for (int r = 0; r < n; ++r) load_row(src + r * ld, dst + r * dp, D, dp, scale);
  for (int64_t i = int64_t(n) * dp; i < int64_t(rows_pad) * dp; ++i) dst[i] = 0.f;
}

inline int round_up16(int x) { return (x + 15) / 16 * 16; }

// ---- attention dropout: a counter-based keep mask -----------------------------------------------
// out = dropout(softmax(s)) V with the normaliser (lse) of the undropped probabilities. The mask is
// a pure function of (seed, offset, b, h, i, j), so backward regenerates the forward's mask without
// storing it (the same scheme is written with int64 tensor ops in ernie_core/ops/reference.py,
// `dropout_keep_mask`; the two must stay bit-identical):
//   mix64 = the SplitMix64 output function (Steele et al. 2014; Stafford's "Mix13" constants),
//   head  = mix64(mix64(mix64(seed) ^ offset) ^ (b << 32 | h)),   row = mix64(head ^ i),
//   x     = mix64(row + (j / 2 + 1) * 0x9E3779B97F4A7C15)   (SplitMix64's stream seeded with row),
//   u     = the low 32 bits of x for even j, the high 32 bits for odd j (one mix per column pair),
//   keep  = u >= t with t = floor(p * 2^32); kept probabilities are scaled by 1 / (1 - p).
// p = 1 gives scale 0 (every probability dropped; the 32-bit threshold then saturates, harmlessly).
// mix64 and kGolden are the CUDA kernels' too: one definition in common/dropout_hash.h.
using ernie_common::kGolden;
using ernie_common::mix64;

struct Dropout {
  bool on = false;
  uint32_t threshold = 0;  // keep u >= threshold
  float rescale = 1.0f;    // 1 / (1 - p), 0 for p = 1
  uint64_t seed_key = 0;   // mix64(mix64(seed) ^ offset)
  explicit Dropout(const FlashMaskParams& p) {
    on = p.dropout_p > 0.0;
    if (!on) return;
    const double t = std::floor(p.dropout_p * 4294967296.0);
    threshold = t >= 4294967295.0 ? 0xFFFFFFFFu : uint32_t(t);
    rescale = p.dropout_p < 1.0 ? float(1.0 / (1.0 - p.dropout_p)) : 0.0f;
    seed_key = mix64(mix64(p.seed) ^ p.offset);
  }
  // Keys of rows [r0, r0 + n) of (batch b, query head h).
  void row_keys(int b, int h, int r0, int n, uint64_t* keys) const {
    const uint64_t head = mix64(seed_key ^ (uint64_t(uint32_t(b)) << 32 | uint32_t(h)));
    for (int r = 0; r < n; ++r) keys[r] = mix64(head ^ uint64_t(r0 + r));
  }
};

typedef uint64_t vu64 __attribute__((vector_size(64)));  // 8 lanes
typedef uint32_t vu32 __attribute__((vector_size(64)));  // 16 lanes

// Keep flags (-1 keep, 0 drop) of columns j0 .. j0 + 15 (j0 even) of the row with key row_key.
// Little-endian: 32-bit lane 2k is the low half of 64-bit lane k (column j0 + 2k), 2k + 1 the high.
inline vint dropout_keep16(uint64_t row_key, int j0, uint32_t threshold) {
  const vu64 pair = vu64{1, 2, 3, 4, 5, 6, 7, 8} + uint64_t(j0 / 2);
  vu64 z = pair * kGolden + row_key;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z = z ^ (z >> 31);
  vu32 u;
  std::memcpy(&u, &z, sizeof u);
  return (vint)(u >= threshold);
}

}  // namespace ernie_cpu
