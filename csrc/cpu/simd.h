// Portable SIMD helpers on GCC/Clang vector extensions.
//
// This header is compiled once per instruction set (see CMakeLists.txt): the same source
// becomes AVX-512, AVX2+FMA or baseline SSE2 code depending on the flags of the translation
// unit, and PROTDIFF_VBYTES (64, 32 or 16) sets the vector width to match.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#ifndef PROTDIFF_VBYTES
#define PROTDIFF_VBYTES 16
#endif

namespace protdiff {
namespace simd {

template <typename T>
struct VecTraits;
template <>
struct VecTraits<float> {
  typedef float V __attribute__((vector_size(PROTDIFF_VBYTES)));
  typedef std::int32_t IV __attribute__((vector_size(PROTDIFF_VBYTES)));
  static constexpr int kLanes = PROTDIFF_VBYTES / 4;
};
template <>
struct VecTraits<double> {
  typedef double V __attribute__((vector_size(PROTDIFF_VBYTES)));
  typedef std::int64_t IV __attribute__((vector_size(PROTDIFF_VBYTES)));
  static constexpr int kLanes = PROTDIFF_VBYTES / 8;
};

template <typename T>
using Vec = typename VecTraits<T>::V;

template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void store(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename T>
inline Vec<T> splat(T s) {
  return Vec<T>{} + s;
}
template <typename T>
inline T hsum(Vec<T> v) {
  T s = 0;
  for (int l = 0; l < VecTraits<T>::kLanes; ++l) s += v[l];
  return s;
}
template <typename T>
inline Vec<T> vmin(Vec<T> a, Vec<T> b) {
  return a < b ? a : b;
}
template <typename T>
inline Vec<T> vmax(Vec<T> a, Vec<T> b) {
  return a > b ? a : b;
}

// exp(x) by range reduction x = n ln2 + r, |r| <= ln2/2, a polynomial for exp(r) and 2^n built
// in the exponent bits. Relative error ~1e-7 (float) / ~1e-15 (double); inputs are clamped so
// the result is finite and never NaN (exp(-inf..-87) -> ~1e-38, exp(88..inf) -> ~1.6e38 for float).
inline Vec<float> vexp(Vec<float> x) {
  typedef VecTraits<float>::IV IV;
  x = vmin<float>(vmax<float>(x, splat(-87.0f)), splat(88.0f));
  const Vec<float> magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  Vec<float> n = (x * 1.44269504088896341f + magic) - magic;
  Vec<float> r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  Vec<float> p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  IV bits = (__builtin_convertvector(n, IV) + 127) << 23;
  return p * (Vec<float>)bits;
}

inline Vec<double> vexp(Vec<double> x) {
  typedef VecTraits<double>::IV IV;
  x = vmin<double>(vmax<double>(x, splat(-700.0)), splat(700.0));
  const Vec<double> magic = splat(6755399441055744.0);  // 1.5 * 2^52
  Vec<double> n = (x * 1.4426950408889634074 + magic) - magic;
  Vec<double> r = x - n * 6.93145751953125e-1;
  r = r - n * 1.42860682030941723212e-6;
  // Taylor to degree 13 on |r| <= 0.347: truncation error < 1e-17 relative
  Vec<double> p = splat(1.0 / 6227020800.0);
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  IV bits = (__builtin_convertvector(n, IV) + 1023) << 52;
  return p * (Vec<double>)bits;
}

template <typename T>
inline Vec<T> vsigmoid(Vec<T> x) {
  return T(1) / (T(1) + vexp(-x));
}

}  // namespace simd
}  // namespace protdiff
