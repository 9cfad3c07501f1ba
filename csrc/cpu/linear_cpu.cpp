// A batch-invariant linear layer for sampling: out (R, H) = x (R, K) W^T + b, with W passed
// transposed as wt (K, H).
//
// A BLAS picks its kernel, blocking and threading by the whole call's shape (and, without its
// reproducibility mode, by alignment and load), so the bits of row r of x W^T can change with the
// number of rows sharing the call; the reverse diffusion amplifies one ulp into visible coordinate
// differences. Here every output is bias[h] + x[r, 0] wt[0, h] + x[r, 1] wt[1, h] + ... in index
// order, rows are independent OpenMP iterations, and the file is compiled without FP contraction,
// so the vectorised body and a scalar remainder round alike: a row's result depends only on that
// row, never on R, its position, the alignment or the thread count.
#include "cpu/linear_cpu.h"

#include <string>
#include <vector>

namespace protdiff {

template <typename T>
void rowwise_linear(CArray<T> x, CArray<T> wt, CArray<T> bias, CArray<T> out) {
  check_shape(x, "x", {-1, -1});
  const py::ssize_t R = x.shape(0), K = x.shape(1);
  check_shape(wt, "wt", {K, -1});
  const py::ssize_t H = wt.shape(1);
  if (bias.ndim() != 1 || (bias.shape(0) != H && bias.shape(0) != 0)) {
    throw std::invalid_argument("bias: expected shape (" + std::to_string(H) + ",) or (0,)");
  }
  check_shape(out, "out", {R, H});
  const T* xp = x.data();
  const T* wp = wt.data();
  const T* bp = bias.shape(0) ? bias.data() : nullptr;
  T* op = writable_data(out, "out");
  py::gil_scoped_release no_gil;
#pragma omp parallel for schedule(static)
  for (py::ssize_t r = 0; r < R; ++r) {
    T* o = op + r * H;
    for (py::ssize_t h = 0; h < H; ++h) o[h] = bp ? bp[h] : T(0);
    const T* xr = xp + r * K;
    for (py::ssize_t k = 0; k < K; ++k) {
      const T xk = xr[k];
      const T* w = wp + k * H;
      for (py::ssize_t h = 0; h < H; ++h) o[h] += xk * w[h];
    }
  }
}

template void rowwise_linear<float>(CArray<float>, CArray<float>, CArray<float>, CArray<float>);
template void rowwise_linear<double>(CArray<double>, CArray<double>, CArray<double>, CArray<double>);

}  // namespace protdiff
