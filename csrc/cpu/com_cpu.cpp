// Masked centre-of-mass projection, x <- P x, the zero-CoM subspace DDPM over C-alpha
// coordinates lives in (noise, samples and model outputs are all projected onto it).
//
//   x (B, N, D), mask (B, N) in {0, 1};  n_b = sum_i mask[b, i]
//   c_b = (1 / n_b) sum_{i : mask[b, i]} x[b, i, :]
//   x[b, i, :] <- x[b, i, :] - c_b   if mask[b, i]   else 0
//
// One sample per OpenMP iteration; the centroid is summed in double in index order,
// so the result does not depend on the thread count.
#include "cpu/com_cpu.h"

#include <vector>

namespace protdiff {

// The centroid lives in a fixed-size stack array so the per-sample loop never allocates.
constexpr py::ssize_t kMaxDim = 16;

template <typename T>
void center_masked_(CArray<T> x, CArray<std::uint8_t> mask) {
  check_shape(x, "x", {-1, -1, -1});
  const py::ssize_t B = x.shape(0), N = x.shape(1), D = x.shape(2);
  check_shape(mask, "mask", {B, N});
  if (D > kMaxDim) {
    throw std::invalid_argument("x: coordinate dimension must be <= " + std::to_string(kMaxDim) + ", got " +
                                std::to_string(D));
  }
  T* xp = writable_data(x, "x");
  const std::uint8_t* mp = mask.data();

  std::vector<char> empty_sample(static_cast<size_t>(B), 0);
  {
    py::gil_scoped_release no_gil;
#pragma omp parallel for schedule(static)
    for (py::ssize_t b = 0; b < B; ++b) {
      T* xb = xp + b * N * D;
      const std::uint8_t* mb = mp + b * N;
      double centroid[kMaxDim] = {0.0};
      py::ssize_t n_real = 0;
      for (py::ssize_t i = 0; i < N; ++i) {
        if (!mb[i]) continue;
        ++n_real;
        for (py::ssize_t d = 0; d < D; ++d) centroid[d] += static_cast<double>(xb[i * D + d]);
      }
      if (n_real == 0) {
        empty_sample[b] = 1;
        continue;
      }
      for (py::ssize_t d = 0; d < D; ++d) centroid[d] /= static_cast<double>(n_real);
      for (py::ssize_t i = 0; i < N; ++i) {
        for (py::ssize_t d = 0; d < D; ++d) {
          xb[i * D + d] = mb[i] ? static_cast<T>(static_cast<double>(xb[i * D + d]) - centroid[d]) : T(0);
        }
      }
    }
  }
  for (py::ssize_t b = 0; b < B; ++b) {
    if (empty_sample[b]) {
      throw std::invalid_argument("mask: sample " + std::to_string(b) + " has no real nodes (all padding)");
    }
  }
}

template void center_masked_<float>(CArray<float>, CArray<std::uint8_t>);
template void center_masked_<double>(CArray<double>, CArray<std::uint8_t>);

}  // namespace protdiff
