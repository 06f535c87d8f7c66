// Shared helpers for the torch-free CPU kernels: dtypes, bf16 conversion, 16-float vectors, exp2.
//
// Vectors use the GCC/Clang vector extension (`vector_size(64)`): the compiler lowers a 16-float
// vector to one AVX-512 register, two AVX2 registers or four SSE registers, so the same source
// vectorises on any x86-64 (and aarch64) target without intrinsics.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace ernie_cpu {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1 };

// bfloat16 storage: the high 16 bits of an IEEE float.
struct bf16 {
  uint16_t bits;
};

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) {
  uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as torch does; NaNs stay (quiet) NaNs.
inline bf16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}

template <class T>
inline T from_float(float f);
template <>
inline float from_float<float>(float f) { return f; }
template <>
inline bf16 from_float<bf16>(float f) { return to_bf16(f); }

// Calls f(T{}) with T = float or bf16: the one switch from a runtime dtype to a kernel template.
template <class F>
inline void dispatch_dtype(DType dtype, F&& f) {
  if (dtype == DType::kFloat32) {
    f(float{});
  } else {
    f(bf16{});
  }
}

constexpr int kVecLen = 16;
typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));

inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }
inline vint vloadi(const int32_t* p) {
  vint v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vfloat vsplat(float x) { return vfloat{} + x; }
inline vint vspliti(int32_t x) { return vint{} + x; }
inline vint viota() { return vint{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }

inline float hmax(vfloat v) {
  float m = v[0];
  for (int i = 1; i < kVecLen; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
inline float hsum(vfloat v) {
  float s = 0.f;
  for (int i = 0; i < kVecLen; ++i) s += v[i];
  return s;
}
inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }

// 2^x for 16 lanes. x = n + f with n = round(x), |f| <= 1/2; 2^f = e^(f ln2) by its Taylor series
// to degree 6 (truncation < 1.3e-7 relative), 2^n by building the exponent bits. x < -126
// (including -inf, the masked scores) gives exactly 0 so masked entries contribute nothing.
inline vfloat vexp2(vfloat x) {
  const vint underflow = x < -126.0f;
  x = x < -126.0f ? vsplat(-126.0f) : x;
  x = x > 127.0f ? vsplat(127.0f) : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const vfloat n = (x + shifter) - shifter;
  const vfloat f = x - n;
  vfloat p = vsplat(1.5403530393381608e-4f);
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const vfloat r = p * scale;
  return underflow ? vfloat{} : r;
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Up to 16 elements of a row as fp32 (zero-filled tail) and back: the vector view of a row tail.
template <class T>
inline vfloat load16(const T* src, int n) {
  float tmp[kVecLen] = {};
  for (int i = 0; i < n; ++i) tmp[i] = to_float(src[i]);
  return vload(tmp);
}
template <class T>
inline void store16(T* dst, vfloat v, int n) {
  float tmp[kVecLen];
  vstore(tmp, v);
  for (int i = 0; i < n; ++i) dst[i] = from_float<T>(tmp[i]);
}

// Converts n elements to fp32 (times `scale`) into dst and zero-fills dst up to n_pad.
template <class T>
inline void load_row(const T* src, float* dst, int n, int n_pad, float scale = 1.0f) {
#pragma omp simd
  for (int i = 0; i < n; ++i) dst[i] = to_float(src[i]) * scale;
  for (int i = n; i < n_pad; ++i) dst[i] = 0.f;
}

template <class T>
inline void store_row(const float* src, T* dst, int n, float scale = 1.0f) {
#pragma omp simd
  for (int i = 0; i < n; ++i) dst[i] = from_float<T>(src[i] * scale);
}

}  // namespace ernie_cpu
