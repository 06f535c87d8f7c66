// Torch-free unit tests of the CPU kernels against naive loops (run by ctest).
// The thorough tests (every mode, dtype, gradient) are in tests/test_ops_*.py against the
// PyTorch references; these only check that the kernels build and compute on their own.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/flashmask.h"
#include "cpu/pointwise.h"

using namespace ernie_cpu;

static int failures = 0;

static void expect_close(const char* what, const std::vector<float>& got, const std::vector<float>& want,
                         float tol) {
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = std::fabs(double(got[i]) - want[i]);
    if (!(d <= worst)) worst = d, at = i;  // NaN counts as worst
  }
  const bool ok = worst <= tol;
  std::printf("%-40s max|diff| %.3g at %zu %s\n", what, worst, at, ok ? "ok" : "FAILED");
  failures += !ok;
}

// Causal document mask (mode a): documents [0, 37), [37, 100), then 3 padding columns.
static void test_flashmask_forward() {
  const int B = 1, S = 103, H = 2, D = 24;
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  std::vector<float> q(B * S * H * D), k(q.size()), v(q.size()), out(q.size()), lse(B * H * S);
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = normal(rng);
  std::vector<int32_t> idx(S);
  for (int j = 0; j < S; ++j) idx[j] = j < 37 ? 37 : (j < 100 ? 100 : j);
  FlashMaskParams p;
  p.B = B, p.S = S, p.Hq = H, p.Hkv = H, p.D = D;
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.out = out.data(), p.lse = lse.data();
  for (auto* s : {p.q_stride, p.k_stride, p.v_stride, p.o_stride}) s[0] = S * H * D, s[1] = H * D, s[2] = D;
  p.idx = idx.data(), p.n_idx = 1, p.causal = true, p.scale = 1.0f / std::sqrt(float(D));
  flashmask_fwd(p);

  std::vector<float> want(out.size(), 0.f);
  for (int h = 0; h < H; ++h)
    for (int i = 0; i < S; ++i) {
      std::vector<double> w(S, 0.0);
      double mx = -INFINITY, sum = 0;
      for (int j = 0; j <= i; ++j) {
        if (i >= idx[j]) continue;
        double s = 0;
        for (int d = 0; d < D; ++d) s += q[(i * H + h) * D + d] * k[(j * H + h) * D + d];
        w[j] = s * p.scale;
        mx = std::fmax(mx, w[j]);
      }
      if (mx == -INFINITY) continue;  // padding row: output stays 0
      for (int j = 0; j <= i; ++j) w[j] = i < idx[j] ? std::exp(w[j] - mx) : 0.0, sum += w[j];
      for (int d = 0; d < D; ++d) {
        double o = 0;
        for (int j = 0; j <= i; ++j) o += w[j] * v[(j * H + h) * D + d];
        want[(i * H + h) * D + d] = float(o / sum);
      }
    }
  expect_close("flashmask forward, causal documents", out, want, 2e-5f);
}

static void test_rms_norm() {
  const int rows = 5, cols = 37;
  std::vector<float> x(rows * cols), w(cols), y(x.size()), rstd(rows);
  for (int i = 0; i < rows * cols; ++i) x[i] = std::sin(0.37f * i);
  for (int j = 0; j < cols; ++j) w[j] = 1.0f + 0.01f * j;
  RmsNormParams p;
  p.rows = rows, p.cols = cols, p.x = x.data(), p.w = w.data(), p.y = y.data(), p.rstd = rstd.data();
  p.x_row_stride = p.y_row_stride = cols, p.eps = 1e-6f;
  rms_norm_fwd(p);
  std::vector<float> want(x.size());
  for (int r = 0; r < rows; ++r) {
    double ms = 0;
    for (int j = 0; j < cols; ++j) ms += double(x[r * cols + j]) * x[r * cols + j];
    const double inv = 1.0 / std::sqrt(ms / cols + 1e-6);
    for (int j = 0; j < cols; ++j) want[r * cols + j] = float(x[r * cols + j] * inv * w[j]);
  }
  expect_close("rms_norm forward", y, want, 1e-5f);
}

static void test_swiglu() {
  const int n = 45;
  std::vector<float> g(n), u(n), y(n), want(n);
  for (int i = 0; i < n; ++i) g[i] = 0.5f * (i - 22), u[i] = std::cos(0.1f * i);
  SwigluParams p;
  p.rows = 1, p.cols = n, p.g = g.data(), p.u = u.data(), p.y = y.data();
  p.g_row_stride = p.u_row_stride = p.y_row_stride = n;
  swiglu_fwd(p);
  for (int i = 0; i < n; ++i) want[i] = float(g[i] / (1.0 + std::exp(-double(g[i]))) * u[i]);
  expect_close("swiglu forward", y, want, 1e-5f);
}

// Dropout's keep mask: mix64 is SplitMix64's output function (its published first outputs from seed 0),
// and the 16-lane keep flags are the scalar formula of flashmask.h (low/high 32 bits per column pair).
static void test_dropout_hash() {
  bool ok = mix64(kGolden) == 0xE220A8397B1DCDAFull && mix64(2 * kGolden) == 0x6E789E6AA1B965F4ull;
  const uint64_t row_key = 0x0123456789ABCDEFull;
  const uint32_t threshold = 0x40000000u;  // p = 0.25
  for (int j0 = 0; j0 < 256; j0 += kVecLen) {
    const vint keep = dropout_keep16(row_key, j0, threshold);
    for (int c = 0; c < kVecLen; ++c) {
      const int j = j0 + c;
      const uint64_t x = mix64(row_key + uint64_t(j / 2 + 1) * kGolden);
      const uint32_t u = uint32_t(j % 2 ? x >> 32 : x);
      ok = ok && (keep[c] != 0) == (u >= threshold);
    }
  }
  std::printf("%-40s %s\n", "dropout keep mask vs scalar SplitMix64", ok ? "ok" : "FAILED");
  failures += !ok;
}

int main() {
  test_flashmask_forward();
  test_rms_norm();
  test_swiglu();
  test_dropout_hash();
  std::printf("%d passed, %d failed\n", 4 - failures, failures);
  return failures ? 1 : 0;
}
