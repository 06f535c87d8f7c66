// RMSNorm, SwiGLU and RoPE kernels (see pointwise.h for the math). One OpenMP task per row or token.
#include <cmath>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "pointwise.h"

namespace ernie_cpu {
namespace {

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// The one switch from (x dtype, w dtype) to a kernel template <TX, TW, TY>; TY follows torch's
// promotion: x's dtype when both agree, else fp32 (the only other dtype we take).
template <class F>
void dispatch_xw(DType x, DType w, F&& f) {
  if (x == DType::kFloat32 && w == DType::kFloat32) return f(float{}, float{}, float{});
  if (x == DType::kBFloat16 && w == DType::kBFloat16) return f(bf16{}, bf16{}, bf16{});
  if (x == DType::kBFloat16) return f(bf16{}, float{}, float{});
  return f(float{}, bf16{}, float{});
}

template <class TX, class TW, class TY>
void rms_norm_fwd_impl(const RmsNormParams& p) {
  const int64_t n = p.cols;
#pragma omp parallel for num_threads(p.num_threads) schedule(static)
  for (int64_t r = 0; r < p.rows; ++r) {
    const TX* x = static_cast<const TX*>(p.x) + r * p.x_row_stride;
    const TW* w = static_cast<const TW*>(p.w);
    TY* y = static_cast<TY*>(p.y) + r * p.y_row_stride;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < n; ++j) ss += to_float(x[j]) * to_float(x[j]);
    const float rstd = 1.0f / std::sqrt(ss / float(n) + p.eps);
    p.rstd[r] = rstd;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      y[j] = from_float<TY>(to_float(w[j]) * to_float(from_float<TX>(to_float(x[j]) * rstd)));
  }
}

// dx = rstd * (dn - n * mean(dn * n)) with n = x * rstd, dn = dy * w; dw = sum_rows dy * cast_x(n),
// reduced over per-thread fp32 partial sums.
template <class TX, class TW, class TY>
void rms_norm_bwd_impl(const RmsNormParams& p) {
  const int64_t n = p.cols;
  std::vector<float> dw_part(int64_t(p.num_threads) * n, 0.f);
#pragma omp parallel num_threads(p.num_threads)
  {
    float* dwp = dw_part.data() + int64_t(thread_id()) * n;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < p.rows; ++r) {
      const TX* x = static_cast<const TX*>(p.x) + r * p.x_row_stride;
      const TW* w = static_cast<const TW*>(p.w);
      const TY* dy = static_cast<const TY*>(p.dy) + r * p.dy_row_stride;
      TX* dx = static_cast<TX*>(p.dx) + r * n;
      const float rstd = p.rstd[r];
      float c = 0.f;
#pragma omp simd reduction(+ : c)
      for (int64_t j = 0; j < n; ++j) c += to_float(dy[j]) * to_float(w[j]) * to_float(x[j]) * rstd;
      c /= float(n);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float nj = to_float(x[j]) * rstd, g = to_float(dy[j]);
        dx[j] = from_float<TX>(rstd * (g * to_float(w[j]) - nj * c));
        dwp[j] += g * to_float(from_float<TX>(nj));
      }
    }
  }
  TW* dw = static_cast<TW*>(p.dw);
  for (int64_t j = 0; j < n; ++j) {
    float s = 0.f;
    for (int t = 0; t < p.num_threads; ++t) s += dw_part[int64_t(t) * n + j];
    dw[j] = from_float<TW>(s);
  }
}

template <class T>
inline vfloat load_vec(const T* src) {
  if constexpr (sizeof(T) == 4) {
    return vload(reinterpret_cast<const float*>(src));
  } else {
    float tmp[kVecLen];
    for (int i = 0; i < kVecLen; ++i) tmp[i] = to_float(src[i]);
    return vload(tmp);
  }
}

template <class T>
inline void store_vec(T* dst, vfloat v) {
  if constexpr (sizeof(T) == 4) {
    vstore(reinterpret_cast<float*>(dst), v);
  } else {
    for (int i = 0; i < kVecLen; ++i) dst[i] = to_bf16(v[i]);
  }
}

inline vfloat sigmoid(vfloat g) { return 1.0f / (1.0f + vexp2(g * -kLog2e)); }

// Applies f(j, n) to row chunks of 16 columns (n < 16 only for the tail).
template <class F>
inline void for_chunks(int64_t cols, F&& f) {
  int64_t j = 0;
  for (; j + kVecLen <= cols; j += kVecLen) f(j, kVecLen);
  if (j < cols) f(j, int(cols - j));
}

template <class T>
void swiglu_fwd_impl(const SwigluParams& p) {
#pragma omp parallel for num_threads(p.num_threads) schedule(static)
  for (int64_t r = 0; r < p.rows; ++r) {
    const T* g = static_cast<const T*>(p.g) + r * p.g_row_stride;
    const T* u = static_cast<const T*>(p.u) + r * p.u_row_stride;
    T* y = static_cast<T*>(p.y) + r * p.y_row_stride;
    for_chunks(p.cols, [&](int64_t j, int n) {
      const vfloat gv = n == kVecLen ? load_vec(g + j) : load16(g + j, n);
      const vfloat uv = n == kVecLen ? load_vec(u + j) : load16(u + j, n);
      const vfloat yv = gv * sigmoid(gv) * uv;
      n == kVecLen ? store_vec(y + j, yv) : store16(y + j, yv, n);
    });
  }
}

template <class T>
void swiglu_bwd_impl(const SwigluParams& p) {
#pragma omp parallel for num_threads(p.num_threads) schedule(static)
  for (int64_t r = 0; r < p.rows; ++r) {
    const T* g = static_cast<const T*>(p.g) + r * p.g_row_stride;
    const T* u = static_cast<const T*>(p.u) + r * p.u_row_stride;
    const T* dy = static_cast<const T*>(p.dy) + r * p.dy_row_stride;
    T* dg = static_cast<T*>(p.dg) + r * p.cols;
    T* du = static_cast<T*>(p.du) + r * p.cols;
    for_chunks(p.cols, [&](int64_t j, int n) {
      const bool full = n == kVecLen;
      const vfloat gv = full ? load_vec(g + j) : load16(g + j, n);
      const vfloat uv = full ? load_vec(u + j) : load16(u + j, n);
      const vfloat dyv = full ? load_vec(dy + j) : load16(dy + j, n);
      const vfloat sg = sigmoid(gv);
      const vfloat dgv = dyv * uv * sg * (1.0f + gv * (1.0f - sg));
      const vfloat duv = dyv * gv * sg;
      full ? store_vec(dg + j, dgv) : store16(dg + j, dgv, n);
      full ? store_vec(du + j, duv) : store16(du + j, duv, n);
    });
  }
}

template <class T>
void rope_impl(const RopeParams& p) {
  const int half = p.D / 2;
#pragma omp parallel num_threads(p.num_threads)
  {
    std::vector<float> cs(half), sn(half);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < int64_t(p.B) * p.S; ++t) {
      const int b = int(t / p.S), s = int(t % p.S);
      const float pos = float(p.pos[b * p.pos_stride[0] + s * p.pos_stride[1]]);
      for (int i = 0; i < half; ++i) {
        const float a = pos * p.inv_freq[i];  // one fp32 multiply, as the reference does
        cs[i] = std::cos(a);
        sn[i] = p.inverse ? -std::sin(a) : std::sin(a);
      }
      for (int ti = 0; ti < p.n_tensors; ++ti) {
        const RopeTensor& rt = p.t[ti];
        for (int h = 0; h < rt.H; ++h) {
          const T* x = static_cast<const T*>(rt.x) + b * rt.x_stride[0] + s * rt.x_stride[1] + h * rt.x_stride[2];
          T* y = static_cast<T*>(rt.y) + b * rt.y_stride[0] + s * rt.y_stride[1] + h * rt.y_stride[2];
#pragma omp simd
          for (int i = 0; i < half; ++i) {
            const float x0 = to_float(x[2 * i]), x1 = to_float(x[2 * i + 1]);
            y[2 * i] = from_float<T>(x0 * cs[i] - x1 * sn[i]);
            y[2 * i + 1] = from_float<T>(x0 * sn[i] + x1 * cs[i]);
          }
        }
      }
    }
  }
}

}  // namespace

void rms_norm_fwd(const RmsNormParams& p) {
  dispatch_xw(p.x_dtype, p.w_dtype, [&](auto x, auto w, auto y) {
    rms_norm_fwd_impl<decltype(x), decltype(w), decltype(y)>(p);
  });
}

void rms_norm_bwd(const RmsNormParams& p) {
  dispatch_xw(p.x_dtype, p.w_dtype, [&](auto x, auto w, auto y) {
    rms_norm_bwd_impl<decltype(x), decltype(w), decltype(y)>(p);
  });
}

void swiglu_fwd(const SwigluParams& p) {
  dispatch_dtype(p.dtype, [&](auto t) { swiglu_fwd_impl<decltype(t)>(p); });
}

void swiglu_bwd(const SwigluParams& p) {
  dispatch_dtype(p.dtype, [&](auto t) { swiglu_bwd_impl<decltype(t)>(p); });
}

void rope(const RopeParams& p) {
  dispatch_dtype(p.dtype, [&](auto t) { rope_impl<decltype(t)>(p); });
}

}  // namespace ernie_cpu
