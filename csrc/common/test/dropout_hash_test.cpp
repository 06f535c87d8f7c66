// ctest: the shared scalar keep mask (common/dropout_hash.h, which the CUDA kernels use) equals the
// CPU kernel's 16-wide vector version (cpu/flashmask.h dropout_keep16) on every column, so the two
// backends draw the same mask. (tests/test_cuda_build.py checks the scalar one against the reference.)
#include <cstdio>
#include <random>

#include "common/dropout_hash.h"
#include "cpu/flashmask.h"

int main() {
  std::mt19937_64 rng(7);
  int bad = 0;
  for (double p : {0.0, 0.1, 0.5, 0.9, 1.0}) {
    const uint32_t t = ernie_common::dropout_threshold(p);
    for (int trial = 0; trial < 200; ++trial) {
      const uint64_t row_key = rng();
      const int j0 = int(rng() % 4096) * 2;  // dropout_keep16 takes an even first column
      const ernie_cpu::vint v = ernie_cpu::dropout_keep16(row_key, j0, t);
      for (int e = 0; e < 16; ++e) bad += (v[e] != 0) != ernie_common::dropout_keep(row_key, j0 + e, t);
    }
  }
  std::printf("dropout hash: CPU vector vs shared scalar mismatches: %d %s\n", bad, bad ? "FAILED" : "ok");
  return bad ? 1 : 0;
}
