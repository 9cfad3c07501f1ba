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

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

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
// s - 0 is s exactly (also for -0.0), so the compiler folds the subtraction and emits a single
// broadcast; `Vec{} + s` would keep a real add (0 + -0.0 is +0.0) in the GEMM's innermost loop.
template <typename T>
inline Vec<T> splat(T s) {
  return s - Vec<T>{};
}

template <typename T>
inline T hsum(Vec<T> v) {
  T s = 0;
  for (int l = 0; l < VecTraits<T>::kLanes; ++l) s += v[l];
  return s;
}
#if defined(__AVX512F__) && PROTDIFF_VBYTES == 64
// a tree reduction instead of 16 dependent scalar adds
template <>
inline float hsum<float>(Vec<float> v) {
  return _mm512_reduce_add_ps((__m512)v);
}
template <>
inline double hsum<double>(Vec<double> v) {
  return _mm512_reduce_add_pd((__m512d)v);
}
#endif
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
#if defined(__AVX512F__) && PROTDIFF_VBYTES == 64
  // the same method with AVX-512's rounding and 2^n scaling instructions (fewer micro-ops)
  __m512 xc = _mm512_min_ps(_mm512_max_ps((__m512)x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return (Vec<float>)_mm512_scalef_ps(p, n);
#else
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
#endif
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

// 1 / d for d >= 1 (the sigmoid's denominator). Vector division is slow (a 16-lane divide issues
// about once per 10 cycles); the hardware reciprocal estimate refined by Newton steps
// r <- r (2 - d r) is exact to about 1 ulp and several times faster.
inline Vec<float> vrecip(Vec<float> d) {
#if defined(__AVX512F__) && PROTDIFF_VBYTES == 64
  Vec<float> r = (Vec<float>)_mm512_rcp14_ps((__m512)d);  // 14 bits
  return r * (2.0f - d * r);
#elif defined(__AVX2__) && PROTDIFF_VBYTES == 32
  Vec<float> r = (Vec<float>)_mm256_rcp_ps((__m256)d);  // 12 bits
  r = r * (2.0f - d * r);
  return r * (2.0f - d * r);
#else
  return 1.0f / d;
#endif
}

inline Vec<double> vrecip(Vec<double> d) {
#if defined(__AVX512F__) && PROTDIFF_VBYTES == 64
  Vec<double> r = (Vec<double>)_mm512_rcp14_pd((__m512d)d);
  r = r * (2.0 - d * r);
  r = r * (2.0 - d * r);
  return r * (2.0 - d * r);
#else
  return 1.0 / d;
#endif
}

template <typename T>
inline Vec<T> vsigmoid(Vec<T> x) {
  return vrecip(T(1) + vexp(-x));
}

}  // namespace simd
}  // namespace protdiff
