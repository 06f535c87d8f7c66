// Softmax cross-entropy of one chunk of logits, in place (see pointwise.h). Three streaming passes
// per row (max, sum of exp, gradient) so a 100k-vocab row stays in L2 and nothing else is stored.
#include <cmath>

#include "pointwise.h"

namespace ernie_cpu {
namespace {

template <class T>
inline vfloat load_chunk(const T* x, int64_t j, int64_t vocab) {
  const int64_t n = vocab - j < kVecLen ? vocab - j : kVecLen;
  if (n == kVecLen && sizeof(T) == 4) return vload(reinterpret_cast<const float*>(x + j));
  return load16(x + j, int(n));
}

template <class T>
float row_max(const T* x, int64_t vocab) {
  vfloat m = vsplat(-kInf);
  int64_t j = 0;
  for (; j + kVecLen <= vocab; j += kVecLen) m = vmax(m, load_chunk(x, j, vocab));
  float mx = hmax(m);
  for (; j < vocab; ++j) mx = std::fmax(mx, to_float(x[j]));
  return mx;
}

template <class T>
int64_t ce_impl(const CrossEntropyParams& p) {
  int64_t bad = -1;
#pragma omp parallel for num_threads(p.num_threads) schedule(static)
  for (int64_t r = 0; r < p.rows; ++r) {
    T* x = static_cast<T*>(p.logits) + r * p.ld;
    const int64_t label = p.labels[r];
    if (label == p.ignore_index || label < 0 || label >= p.vocab) {
      if (label != p.ignore_index) {
#pragma omp critical(ernie_ce_bad_label)
        bad = bad < 0 || r < bad ? r : bad;
      }
      p.loss[r] = 0.f;
      if (p.write_grad)
        for (int64_t j = 0; j < p.vocab; ++j) x[j] = from_float<T>(0.f);
      continue;
    }
    // In base 2: sum_j 2^((x_j - max) * log2 e) = sum_j e^(x_j - max).
    const float m2 = row_max(x, p.vocab) * kLog2e;
    vfloat acc = vfloat{};
    for (int64_t j = 0; j < p.vocab; j += kVecLen) {
      const vfloat e = vexp2(load_chunk(x, j, p.vocab) * kLog2e - m2);
      // The tail's zero padding would add exp2(-m2); mask it off.
      acc += p.vocab - j >= kVecLen ? e : ((viota() < int32_t(p.vocab - j)) ? e : vfloat{});
    }
    const float sum = hsum(acc);
    const float target = to_float(x[label]);
    p.loss[r] = std::log(sum) + m2 * kLn2 - target;
    if (!p.write_grad) continue;
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < p.vocab; j += kVecLen) {
      const int n = int(p.vocab - j < kVecLen ? p.vocab - j : kVecLen);
      const vfloat g = vexp2(load_chunk(x, j, p.vocab) * kLog2e - m2) * inv;
      store16(x + j, g, n);
    }
    x[label] = from_float<T>(to_float(x[label]) - 1.0f);
  }
  return bad;
}

}  // namespace

int64_t cross_entropy_chunk(const CrossEntropyParams& p) {
  int64_t bad = -1;
  dispatch_dtype(p.dtype, [&](auto t) { bad = ce_impl<decltype(t)>(p); });
  return bad;
}

}  // namespace ernie_cpu
