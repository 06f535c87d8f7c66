// Host-side check of the FlashMask plan the CUDA kernels make (no GPU needed): the column spans
// (column_spans), the per-64-column min/max table (table_entry) and the tile classification
// (block_stats + classify) are the kernels' own __host__ __device__ functions, run here on the CPU.
//   host_mask_test FILE      FILE: "B Hm S n causal" then the B*Hm*S*n indices (n = 0: no mask tensor)
// Prints, per (batch, mask head), S lines of 0/1 (1 = row i may attend column j, from the spans) for
// tests/test_cuda_build.py to compare with the reference's dense mask, then checks every tile of the
// kernels' geometries (rows x columns: 128 x 128 Hopper forward, 64 x 128 Hopper backward, 64 x 64
// sm_80): a skipped tile has no visible element, an unmasked one no hidden element (padding columns
// included). Exit status 1 and a message on the first violation; the last line counts tile kinds.
#include <cstdio>
#include <vector>

#include "../flashmask_mask.cuh"

using namespace ernie_cuda;

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  FILE* f = std::fopen(argv[1], "r");
  if (!f) return 2;
  int B, Hm, S, n, causal;
  if (std::fscanf(f, "%d %d %d %d %d", &B, &Hm, &S, &n, &causal) != 5) return 2;
  std::vector<int32_t> idx(size_t(B) * Hm * S * (n > 0 ? n : 0));
  for (auto& x : idx)
    if (std::fscanf(f, "%d", &x) != 1) return 2;
  std::fclose(f);
  const int s_pad = (S + kSpanPad - 1) / kSpanPad * kSpanPad;
  long kinds[3] = {0, 0, 0};
  for (int bhm = 0; bhm < B * Hm; ++bhm) {
    std::vector<int32_t> spans(size_t(4) * s_pad), table(size_t(s_pad / kMaskBlock) * 8);
    for (int j = 0; j < s_pad; ++j) {
      const int32_t* col = (n > 0 && j < S) ? idx.data() + (size_t(bhm) * S + j) * n : nullptr;
      int sp[4];
      column_spans(col, n, causal != 0, j, S, sp);
      for (int a = 0; a < 4; ++a) spans[size_t(a) * s_pad + j] = sp[a];
    }
    for (int cb = 0; cb < s_pad / kMaskBlock; ++cb) table_entry(spans.data() + cb * kMaskBlock, s_pad, &table[cb * 8]);
    auto hidden = [&](int i, int j) {
      return masked(i, spans[j], spans[s_pad + j], spans[2 * s_pad + j], spans[3 * s_pad + j]);
    };
    std::vector<char> line(size_t(S) + 1, 0);
    for (int i = 0; i < S; ++i) {
      for (int j = 0; j < S; ++j) line[j] = hidden(i, j) ? '0' : '1';
      std::printf("%s\n", line.data());
    }
    const int geoms[3][2] = {{128, 128}, {64, 128}, {64, 64}};
    for (const auto& g : geoms) {
      const int bm = g[0], bn = g[1];
      for (int r0 = 0; r0 < S; r0 += bm)
        for (int c0 = 0; c0 + bn <= s_pad; c0 += bn) {
          const int r1 = imin(r0 + bm, S);
          const int kind = classify(block_stats(table.data(), c0, bn), r0, r1);
          ++kinds[kind];
          for (int i = r0; i < r1; ++i)
            for (int j = c0; j < c0 + bn; ++j) {
              const bool h = hidden(i, j);
              if ((kind == kTileSkipped && !h) || (kind == kTileUnmasked && h)) {
                std::printf("VIOLATION tile %dx%d rows %d.. cols %d..: kind %d but (%d, %d) is %s\n", bm, bn, r0, c0,
                            kind, i, j, h ? "hidden" : "visible");
                return 1;
              }
            }
        }
    }
  }
  std::printf("tiles skipped %ld unmasked %ld partial %ld\n", kinds[0], kinds[1], kinds[2]);
  return 0;
}
