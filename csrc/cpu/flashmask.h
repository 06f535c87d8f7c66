// FlashMask attention on CPU (torch-free): blocked attention with online softmax whose mask is
// given per key column by start/end row indices (ernie_reference.md §5.3).
//
// Layouts: q/out/dout/dq [B, S, Hq, D], k/v/dk/dv [B, S, Hkv, D] with any batch/seq/head strides
// (elements) and a contiguous last dim; lse [B, Hq, S] fp32 contiguous (natural log, -inf for rows
// that may attend nothing); idx int32 [B, Hm, S, n] contiguous, Hm = 1 or Hkv, n in {1, 2, 4}.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

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

}  // namespace ernie_cpu
