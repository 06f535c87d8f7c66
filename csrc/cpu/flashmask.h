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
// transposed: the tile is s[c][r] instead (rows of the tile are key columns).
void mask_tile(float* s, int nr, int r0, int c0, const ColumnMask& cm, int bm, bool transposed);

// C[M][16*nv] (+)= A[M][K] . B[K][16*nv], fp32, row-major with leading dims; nv in 1..16.
void gemm(int nv, bool accumulate, int M, int K, const float* A, int lda, const float* B, int ldb, float* C,
          int ldc);

inline int round_up16(int x) { return (x + 15) / 16 * 16; }

}  // namespace ernie_cpu
