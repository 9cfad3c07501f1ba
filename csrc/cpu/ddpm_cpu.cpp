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

// Four standard normals for (seed, t, block) by Box-Muller on Philox output. Single precision
// on purpose: the noise only needs to be Gaussian to ~1e-7, and float log/sin/cos are ~2x faster.
inline void normals4(std::uint64_t seed, std::int64_t t, std::uint64_t block, double out[4]) {
  std::uint32_t key[2] = {static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)};
  std::uint32_t ctr[4] = {static_cast<std::uint32_t>(block), static_cast<std::uint32_t>(block >> 32),
                          static_cast<std::uint32_t>(t), static_cast<std::uint32_t>(static_cast<std::uint64_t>(t) >> 32)};
  Philox4x32::block(ctr, key);
  const float two_pi = 6.283185307179586f;
  for (int k = 0; k < 2; ++k) {
    const float radius = std::sqrt(-2.0f * std::log(uniform_open(ctr[2 * k])));
    const float angle = two_pi * uniform_open(ctr[2 * k + 1]);
    out[2 * k] = radius * std::cos(angle);
    out[2 * k + 1] = radius * std::sin(angle);
  }
}

template <typename T>
void fill_normals(std::uint64_t seed, std::int64_t t, T* z, std::int64_t count) {
  double four[4];
  for (std::int64_t e = 0; e < count; e += 4) {
    normals4(seed, t, static_cast<std::uint64_t>(e / 4), four);
    for (std::int64_t k = 0; k < 4 && e + k < count; ++k) z[e + k] = static_cast<T>(four[k]);
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
        bool finite = true;  // checked here, in the pass that reads them, instead of a separate sweep
        for (std::int64_t k = 0; k < N * 3; ++k) {
          finite = finite && std::isfinite(static_cast<double>(x[k])) && std::isfinite(static_cast<double>(e[k]));
          mu[k] = static_cast<T>(c1p[b] * (x[k] - c2p[b] * e[k]));
        }
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
