// The fused DDPM ancestral step (Algorithm 2 of Ho et al. 2020) over zero-CoM C-alpha coordinates,
// the same contract as protdiff_fast/reference/ddpm.py:ddpm_step_reference. Per sample b:
//
//   mean  = P( c1_b (x_t - c2_b eps_hat) )               c1 = 1/sqrt(alpha_t), c2 = beta_t/sqrt(1 - alpha_bar_t)
//   prev  = P( mean + sigma_b P z )                       sigma_b = 0 at t = 1
//   x0    = x0_a_b x_t - x0_b_b eps_hat                   x0_a = 1/sqrt(alpha_bar_t), x0_b = sqrt(1/alpha_bar_t - 1)
//
// P removes the centroid over the sample's real nodes and zeroes padding rows. z is the explicit
// `noise` when given, else standard normals from Philox4x32-10 keyed by the sample's 64-bit seed,
// with counter (element block, t_b): a design's noise depends on its own seed and step only,
// not on its batch, the thread count or the machine.
#include "cpu/ddpm_cpu.h"

#include <cmath>
#include <cstring>
#include <vector>

namespace protdiff {

namespace {

struct Philox4x32 {
  // Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3" (10 rounds).
  static void block(std::uint32_t ctr[4], std::uint32_t key[2]) {
    const std::uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
    std::uint32_t k0 = key[0], k1 = key[1];
    for (int round = 0; round < 10; ++round) {
      const std::uint64_t p0 = static_cast<std::uint64_t>(M0) * ctr[0];
      const std::uint64_t p1 = static_cast<std::uint64_t>(M1) * ctr[2];
      const std::uint32_t hi0 = static_cast<std::uint32_t>(p0 >> 32), lo0 = static_cast<std::uint32_t>(p0);
      const std::uint32_t hi1 = static_cast<std::uint32_t>(p1 >> 32), lo1 = static_cast<std::uint32_t>(p1);
      const std::uint32_t c0 = hi1 ^ ctr[1] ^ k0, c2 = hi0 ^ ctr[3] ^ k1;
      ctr[0] = c0, ctr[1] = lo1, ctr[2] = c2, ctr[3] = lo0;
      k0 += W0, k1 += W1;
    }
  }
};

// A uniform in (0, 1): the top 24 bits, centred in their interval (never 0, never 1).
inline float uniform_open(std::uint32_t r) { return (static_cast<float>(r >> 8) + 0.5f) * 5.9604644775390625e-8f; }

// log(u) for u in (0, 1): u = m 2^e with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s),
// s = (m - 1) / (m + 1), |s| <= 0.172, so five terms leave a truncation error under 1e-9.
// Plain float arithmetic and selects (no libm call, no branch) so the compiler vectorizes the
// Box-Muller loop; compiled once for every x86 machine, it gives the same bits everywhere.
inline float log_open(float u) {
  std::uint32_t bits;
  std::memcpy(&bits, &u, 4);
  // mantissa above sqrt(2)'s: take m / 2 and e + 1 (integer selects: no branch for the vectorizer)
  const std::uint32_t high = static_cast<std::uint32_t>((bits & 0x007fffffu) > 0x003504f3u);
  const float e = static_cast<float>(static_cast<std::int32_t>(bits >> 23) - 127 + static_cast<std::int32_t>(high));
  bits = (bits & 0x007fffffu) | (0x3f800000u - (high << 23));  // m in [sqrt(1/2), sqrt(2))
  float m;
  std::memcpy(&m, &bits, 4);
  const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  const float p = s * (2.0f + s2 * (0.666666667f + s2 * (0.4f + s2 * (0.285714286f + s2 * 0.222222222f))));
  return p + e * 0.693147180559945f;
}

inline float select_bits(std::uint32_t take_a, float a, float b) {  // take_a ? a : b, by bit masks
  std::uint32_t ia, ib;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  const std::uint32_t mask = 0u - take_a, r = (ia & mask) | (ib & ~mask);
  float out;
  std::memcpy(&out, &r, 4);
  return out;
}

// sin and cos of 2 pi u for u in (0, 1): quadrant q = round(4u), r = 2 pi (u - q / 4) in
// [-pi/4, pi/4], Taylor series to r^9 / r^8 (errors under 3e-8), then the quadrant's swap and signs.
inline void sincos_two_pi(float u, float& sin_out, float& cos_out) {
  const std::int32_t q = static_cast<std::int32_t>(u * 4.0f + 0.5f);
  const float r = (u - static_cast<float>(q) * 0.25f) * 6.28318530717958648f, r2 = r * r;
  const float sr = r * (1.0f + r2 * (-1.66666667e-1f + r2 * (8.33333333e-3f + r2 * (-1.98412698e-4f +
                                                                                   r2 * 2.75573192e-6f))));
  const float cr = 1.0f + r2 * (-0.5f + r2 * (4.16666667e-2f + r2 * (-1.38888889e-3f + r2 * 2.48015873e-5f)));
  const std::uint32_t swap = static_cast<std::uint32_t>(q & 1);
  const float sign_s = static_cast<float>(1 - 2 * ((q >> 1) & 1)), sign_c = static_cast<float>(1 - 2 * (((q + 1) >> 1) & 1));
  sin_out = sign_s * select_bits(swap, cr, sr);
  cos_out = sign_c * select_bits(swap, sr, cr);
}

// Standard normals for (seed, t): block k of Philox4x32-10 (counter (k, t), key seed) gives
// normals 4k .. 4k + 3 by Box-Muller on its two (u1, u2) pairs. Single precision on purpose: the
// noise only needs to be Gaussian to ~1e-6. Philox in one loop, the transform in another that
// the compiler vectorizes.
template <typename T>
void fill_normals(std::uint64_t seed, std::int64_t t, T* z, std::int64_t count) {
  constexpr int kBlocks = 64;  // Philox blocks per chunk: 256 normals
  float u1[2 * kBlocks], u2[2 * kBlocks], out[4 * kBlocks];
  const std::uint32_t key0 = static_cast<std::uint32_t>(seed), key1 = static_cast<std::uint32_t>(seed >> 32);
  const std::uint32_t t0 = static_cast<std::uint32_t>(t), t1 = static_cast<std::uint32_t>(static_cast<std::uint64_t>(t) >> 32);
  const float two = 2.0f;
  for (std::int64_t e0 = 0; e0 < count; e0 += 4 * kBlocks) {
    const std::uint64_t first = static_cast<std::uint64_t>(e0 / 4);
    for (int b = 0; b < kBlocks; ++b) {
      const std::uint64_t block = first + static_cast<std::uint64_t>(b);
      std::uint32_t key[2] = {key0, key1};
      std::uint32_t ctr[4] = {static_cast<std::uint32_t>(block), static_cast<std::uint32_t>(block >> 32), t0, t1};
      Philox4x32::block(ctr, key);
      u1[2 * b] = uniform_open(ctr[0]), u2[2 * b] = uniform_open(ctr[1]);
      u1[2 * b + 1] = uniform_open(ctr[2]), u2[2 * b + 1] = uniform_open(ctr[3]);
    }
    for (int k = 0; k < 2 * kBlocks; ++k) {
      const float radius = std::sqrt(-two * log_open(u1[k]));
      float sn, cs;
      sincos_two_pi(u2[k], sn, cs);
      out[2 * k] = radius * cs;
      out[2 * k + 1] = radius * sn;
    }
    const std::int64_t n = count - e0 < 4 * kBlocks ? count - e0 : 4 * kBlocks;
    for (std::int64_t k = 0; k < n; ++k) z[e0 + k] = static_cast<T>(out[k]);
  }
}

// In place on one sample's (N, 3) rows: subtract the centroid of the real rows, zero the others.
template <typename T>
void project(T* v, const std::uint8_t* m, std::int64_t N) {
  double c[3] = {0, 0, 0};
  std::int64_t n = 0;
  for (std::int64_t i = 0; i < N; ++i)
    if (m[i]) {
      ++n;
      for (int d = 0; d < 3; ++d) c[d] += static_cast<double>(v[i * 3 + d]);
    }
  for (int d = 0; d < 3; ++d) c[d] /= static_cast<double>(n);
  for (std::int64_t i = 0; i < N; ++i)
    for (int d = 0; d < 3; ++d) v[i * 3 + d] = m[i] ? static_cast<T>(static_cast<double>(v[i * 3 + d]) - c[d]) : T(0);
}

}  // namespace

template <typename T>
void ddpm_step_np(CArray<T> x_t, CArray<T> eps_hat, CArray<double> c1, CArray<double> c2, CArray<double> sigma,
                  CArray<double> x0_a, CArray<double> x0_b, CArray<std::uint8_t> mask, std::optional<CArray<T>> noise,
                  CArray<std::uint64_t> seeds, CArray<std::int64_t> t, CArray<T> prev_out,
                  std::optional<CArray<T>> mean_out, std::optional<CArray<T>> x0_out) {
  check_shape(x_t, "x_t", {-1, -1, 3});
  const std::int64_t B = x_t.shape(0), N = x_t.shape(1);
  check_shape(eps_hat, "eps_hat", {B, N, 3});
  for (auto* a : {&c1, &c2, &sigma, &x0_a, &x0_b}) check_shape(*a, "step coefficients", {B});
  check_shape(mask, "mask", {B, N});
  check_shape(seeds, "seeds", {B});
  check_shape(t, "t", {B});
  check_shape(prev_out, "prev_out", {B, N, 3});
  if (noise) check_shape(*noise, "noise", {B, N, 3});
  if (mean_out) check_shape(*mean_out, "mean_out", {B, N, 3});
  if (x0_out) check_shape(*x0_out, "x0_out", {B, N, 3});
  const T *xp = x_t.data(), *ep = eps_hat.data(), *np_ = noise ? noise->data() : nullptr;
  const double *c1p = c1.data(), *c2p = c2.data(), *sp = sigma.data(), *ap = x0_a.data(), *bp = x0_b.data();
  const std::uint8_t* mp = mask.data();
  const std::uint64_t* seedp = seeds.data();
  const std::int64_t* tp = t.data();
  T* prev = writable_data(prev_out, "prev_out");
  T* mean = mean_out ? writable_data(*mean_out, "mean_out") : nullptr;
  T* x0 = x0_out ? writable_data(*x0_out, "x0_out") : nullptr;
  std::vector<char> empty(static_cast<size_t>(B), 0), nonfinite(static_cast<size_t>(B), 0);
  {
    py::gil_scoped_release no_gil;
#pragma omp parallel
    {
      std::vector<T> z(static_cast<size_t>(N * 3)), mu(static_cast<size_t>(N * 3));
#pragma omp for schedule(static)
      for (std::int64_t b = 0; b < B; ++b) {
        const std::uint8_t* m = mp + b * N;
        bool any = false;
        for (std::int64_t i = 0; i < N; ++i) any = any || m[i];
        if (!any) {
          empty[b] = 1;
          continue;
        }
        const T* x = xp + b * N * 3;
        const T* e = ep + b * N * 3;
        // finiteness checked here, in the pass that reads them, instead of a separate sweep; a
        // no-branch form (x - x is NaN exactly for Inf and NaN) so the loop vectorizes
        unsigned bad = 0;
        const double c1b = c1p[b], c2b = c2p[b];
        for (std::int64_t k = 0; k < N * 3; ++k) {
          bad |= static_cast<unsigned>((x[k] - x[k]) + (e[k] - e[k]) != T(0));
          mu[k] = static_cast<T>(c1b * (x[k] - c2b * e[k]));
        }
        const bool finite = bad == 0;
        if (!finite) {
          nonfinite[b] = 1;
          continue;
        }
        project(mu.data(), m, N);
        if (np_) {
          for (std::int64_t k = 0; k < N * 3; ++k) z[k] = np_[b * N * 3 + k];
        } else {
          fill_normals(seedp[b], tp[b], z.data(), N * 3);
        }
        project(z.data(), m, N);
        T* out = prev + b * N * 3;
        for (std::int64_t k = 0; k < N * 3; ++k) out[k] = static_cast<T>(mu[k] + sp[b] * z[k]);
        project(out, m, N);
        if (mean)
          for (std::int64_t k = 0; k < N * 3; ++k) mean[b * N * 3 + k] = mu[k];
        if (x0)
          for (std::int64_t i = 0; i < N; ++i)
            for (int d = 0; d < 3; ++d) {
              const std::int64_t k = i * 3 + d;
              x0[b * N * 3 + k] = m[i] ? static_cast<T>(ap[b] * x[k] - bp[b] * e[k]) : T(0);
            }
      }
    }
  }
  for (std::int64_t b = 0; b < B; ++b) {
    if (empty[b]) throw std::invalid_argument("mask: sample " + std::to_string(b) + " has no real nodes (all padding)");
    if (nonfinite[b])
      throw std::invalid_argument("x_t or eps_hat: contains NaN or Inf in sample " + std::to_string(b));
  }
}

std::vector<std::uint32_t> philox4x32_np(std::vector<std::uint32_t> ctr, std::vector<std::uint32_t> key) {
  if (ctr.size() != 4 || key.size() != 2) throw std::invalid_argument("philox4x32: need 4 counter and 2 key words");
  Philox4x32::block(ctr.data(), key.data());
  return ctr;
}

template <typename T>
void philox_normal_np(CArray<std::uint64_t> seeds, CArray<std::int64_t> t, CArray<T> out) {
  check_shape(seeds, "seeds", {-1});
  const std::int64_t B = seeds.shape(0);
  check_shape(t, "t", {B});
  if (out.ndim() < 1 || out.shape(0) != B) throw std::invalid_argument("out: first dimension must be B");
  const std::int64_t per = B ? out.size() / B : 0;
  T* o = writable_data(out, "out");
  const std::uint64_t* s = seeds.data();
  const std::int64_t* tp = t.data();
  py::gil_scoped_release no_gil;
#pragma omp parallel for schedule(static)
  for (std::int64_t b = 0; b < B; ++b) fill_normals(s[b], tp[b], o + b * per, per);
}

#define PROTDIFF_INSTANTIATE_DDPM(T)                                                                              \
  template void ddpm_step_np<T>(CArray<T>, CArray<T>, CArray<double>, CArray<double>, CArray<double>,           \
                                CArray<double>, CArray<double>, CArray<std::uint8_t>, std::optional<CArray<T>>, \
                                CArray<std::uint64_t>, CArray<std::int64_t>, CArray<T>, std::optional<CArray<T>>, \
                                std::optional<CArray<T>>);                                                      \
  template void philox_normal_np<T>(CArray<std::uint64_t>, CArray<std::int64_t>, CArray<T>);
PROTDIFF_INSTANTIATE_DDPM(float)
PROTDIFF_INSTANTIATE_DDPM(double)

}  // namespace protdiff
