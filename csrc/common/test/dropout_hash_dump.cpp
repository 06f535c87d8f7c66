// Prints the attention-dropout keep mask of common/dropout_hash.h, one line of 0/1 per (b, h, i),
// for tests/test_cuda_build.py to compare with ernie_core/ops/reference.py `dropout_keep_mask`.
// Built twice there: as host C++ (g++) and as CUDA source (nvcc -x cu), where the functions are
// __host__ __device__, so the code the GPU kernels include is the code tested here.
//   dropout_hash_dump SEED OFFSET B H S P
#include <cstdio>
#include <cstdlib>
#include <string>

#include "common/dropout_hash.h"

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: %s SEED OFFSET B H S P\n", argv[0]);
    return 2;
  }
  // Seed and offset arrive as int64 (torch's int) and are read as uint64 words, as the bindings do.
  const uint64_t seed = uint64_t(std::stoll(argv[1])), offset = uint64_t(std::stoll(argv[2]));
  const int B = std::atoi(argv[3]), H = std::atoi(argv[4]), S = std::atoi(argv[5]);
  const double p = std::atof(argv[6]);
  const uint32_t t = ernie_common::dropout_threshold(p);
  const uint64_t seed_key = ernie_common::dropout_seed_key(seed, offset);
  std::string line(size_t(S), '0');
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const uint64_t head = ernie_common::dropout_head_key(seed_key, b, h);
      for (int i = 0; i < S; ++i) {
        const uint64_t row = ernie_common::dropout_row_key(head, i);
        for (int j = 0; j < S; ++j) line[size_t(j)] = ernie_common::dropout_keep(row, j, t) ? '1' : '0';
        std::printf("%s\n", line.c_str());
      }
    }
  std::printf("threshold %u rescale %.9g\n", t, double(ernie_common::dropout_rescale(p)));
  return 0;
}
