// Host-side checks of the index math the Hopper attention kernels rely on (no GPU needed): their
// own CuTe layouts and tiled-MMA partitions, evaluated on the CPU.
//  1. The transposed views (K^T, V^T, Q^T, dO^T, dS^T) address the same bytes as the tiles they view.
//  2. The K-major 128-byte-swizzle tiles the forward fills with TMA are laid out exactly as TMA's
//     CU_TENSOR_MAP_SWIZZLE_128B writes two {64, rows} boxes (16-byte chunk c of row r at chunk
//     c ^ (r % 8), second 64-column half after the first), and the backward's cp.async
//     destinations (tile_ptr) follow the same pattern. (The integer value Layout{}(r, c) does not:
//     CuTe swizzles byte addresses; the earlier cp.async forward computed its destinations that way.)
//  3. Every accumulator partition covers its tile exactly once over the 256 consumer threads; the
//     value pairs (i, i + 1) are adjacent columns (2m, 2m + 1) of one row (dropout's one hash per
//     column pair, bf16x2 / float2 stores); value i sits on the thread's row (i / 2) % 2 (the softmax
//     row slots); a lane quad shares its rows (the quad max / sum shuffles).
//  4. The forward's regrouping of the S accumulator as the A operand of O = P V (RS wgmma) maps
//     every A register to the (row, key) that the S accumulator holds in the same register.
// Exit status 0 when all hold; prints each check.
#include <cstdio>

#include "../flashmask_bwd_sm90.cu"
#include "../flashmask_fwd_sm90.cu"

using namespace cute;

static int failures = 0;
static void report(const char* what, long bad) {
  std::printf("%-72s %s (%ld bad)\n", what, bad ? "FAILED" : "ok", bad);
  failures += bad != 0;
}

template <class L, class Lt>
static long transposed_view(int rows, int cols) {
  long bad = 0;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) bad += int(Lt{}(c, r)) != int(L{}(r, c));
  return bad;
}

// Physical placement: byte offset of element (r, c) through a CuTe tensor on a 1024-byte aligned
// base (as the kernels' shared buffers are; this is where wgmma reads), against TMA's SWIZZLE_128B
// pattern for two {64, rows} boxes and against the backward's cp.async destinations (tile_ptr).
template <class L, int kRows>
static long tma_swizzle_128b(int cols, bool check_tile_ptr) {
  using Elem = cutlass::bfloat16_t;
  Elem* base = reinterpret_cast<Elem*>(uintptr_t(1) << 20);  // never dereferenced
  long bad = 0;
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < cols; ++c) {
      const int half = c / 64, cc = c % 64;
      const long byte = half * kRows * 128 + r * 128 + ((((cc * 2) / 16) ^ (r % 8)) * 16) + (cc * 2) % 16;
      const Elem* at = &make_tensor(make_smem_ptr(base), L{})(r, c);
      const long off = long(reinterpret_cast<uintptr_t>(at) - reinterpret_cast<uintptr_t>(base));
      bad += off != byte;
      if (check_tile_ptr) bad += ernie_cuda::sm90bwd::tile_ptr<kRows>(base, r, c) != at;
    }
  return bad;
}

// Checks 3 on the C partition of a tiled MMA over an M x N tile; rows_slot: the row-slot rule holds.
template <class Mma, int M, int N>
static void check_c(const char* name, bool rows_slot) {
  Mma mma;
  static int count[256][256];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) count[i][j] = 0;
  long pair_bad = 0, slot_bad = 0, quad_bad = 0;
  for (int tid = 0; tid < 256; ++tid) {
    auto c = mma.get_slice(tid).partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    auto c0 = mma.get_slice(tid & ~3).partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    for (int i = 0; i < size(c); ++i) {
      const int r = get<0>(c(i)), col = get<1>(c(i));
      ++count[r][col];
      if (i % 2 == 0) pair_bad += !(col % 2 == 0 && get<0>(c(i + 1)) == r && get<1>(c(i + 1)) == col + 1);
      if (rows_slot) slot_bad += r != get<0>(c(2 * ((i / 2) % 2)));
      quad_bad += r != get<0>(c0(i));
    }
  }
  long cover_bad = 0;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) cover_bad += count[i][j] != 1;
  char buf[160];
  std::snprintf(buf, sizeof buf, "%s: C covers the %dx%d tile once", name, M, N);
  report(buf, cover_bad);
  std::snprintf(buf, sizeof buf, "%s: values (i, i+1) = columns (2m, 2m+1) of one row", name);
  report(buf, pair_bad);
  if (rows_slot) {
    std::snprintf(buf, sizeof buf, "%s: value i on the thread's row slot (i / 2) %% 2", name);
    report(buf, slot_bad);
  }
  std::snprintf(buf, sizeof buf, "%s: a lane quad holds the same rows", name);
  report(buf, quad_bad);
}

int main() {
  {
    using namespace ernie_cuda::sm90;
    report("fwd: V^T view == V tile transposed", transposed_view<SmemLayoutK, SmemLayoutVt>(kBN, kD));
    report("fwd: Q tile (wgmma's view) == TMA SWIZZLE_128B boxes {64, 128}", tma_swizzle_128b<SmemLayoutQ, kBM>(kD, false));
    report("fwd: K/V tile (wgmma's view) == TMA SWIZZLE_128B boxes {64, 128}", tma_swizzle_128b<SmemLayoutK, kBN>(kD, false));
    check_c<MmaS, kBM, kBN>("fwd S = Q K^T", true);
    check_c<MmaO, kBM, kD>("fwd O = P V", true);
    // 4: A operand of MmaO vs the S accumulator regrouped with the kernel's layout.
    MmaS mma_s;
    MmaO mma_o;
    using ALayout = Layout<Shape<Shape<_2, _2, _2>, _1, Int<kBN / 16>>, Stride<Stride<_1, _2, _4>, _0, _8>>;
    long bad = 0;
    for (int tid = 0; tid < 256; ++tid) {
      auto s = mma_s.get_slice(tid).partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
      auto a = mma_o.get_slice(tid).partition_A(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
      if (size(a) != size(ALayout{})) {
        ++bad;
        continue;
      }
      for (int j = 0; j < size(a); ++j) bad += !(a(j) == s(ALayout{}(j)));
    }
    report("fwd: P regrouped as O = P V's A operand holds the same (row, key)", bad);
  }
  {
    using namespace ernie_cuda::sm90bwd;
    report("bwd: K^T view == K tile transposed", transposed_view<SmemLayoutK, SmemLayoutKt>(kBN, kD));
    report("bwd: Q^T / dO^T view == tile transposed", transposed_view<SmemLayoutQ, SmemLayoutQt>(kBM, kD));
    report("bwd: dS^T / P^T view == tile transposed", transposed_view<SmemLayoutdS, SmemLayoutdSt>(kBM, kBN));
    report("bwd: cp.async K/V destinations (tile_ptr) == wgmma's view == 128-byte swizzle",
           tma_swizzle_128b<SmemLayoutK, kBN>(kD, true));
    report("bwd: cp.async Q/dO destinations (tile_ptr) == wgmma's view == 128-byte swizzle",
           tma_swizzle_128b<SmemLayoutQ, kBM>(kD, true));
    check_c<MmaSdP, kBN, kBM>("bwd S^T = K Q^T", false);
    check_c<MmadKV, kBN, kD>("bwd dK, dV", false);
    check_c<MmadQ, kBM, kD>("bwd dQ = dS K", false);
  }
  std::printf("%s\n", failures ? "FAILED" : "all ok");
  return failures ? 1 : 0;
}
