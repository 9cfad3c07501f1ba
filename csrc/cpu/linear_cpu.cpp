// A batch-invariant linear layer for sampling: out (R, H) = x (R, K) W^T + b, with W passed
// transposed as wt (K, H).
//
// A BLAS picks its kernel, blocking and threading by the whole call's shape (and, without its
// reproducibility mode, by alignment and load), so the bits of row r of x W^T can change with the
// number of rows sharing the call; the reverse diffusion amplifies one ulp into visible coordinate
// differences. Here every output is bias[h] + x[r, 0] wt[0, h] + x[r, 1] wt[1, h] + ... in index
// order, blocks of rows are independent OpenMP iterations, and the file is compiled without FP
// contraction, so the vectorised body and a scalar remainder round alike: a row's result depends
// only on that row, never on R, its position, the alignment or the thread count.
#include "cpu/linear_cpu.h"

#include <cstring>
#include <string>
#include <vector>

namespace protdiff {

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define PROTDIFF_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else  // (no ifunc, or another architecture: the baseline build only)
#define PROTDIFF_ISA_CLONES
#endif

constexpr int kRows = 4;  // rows per block: each loaded weight vector serves four rows

// Rows [r0, r0 + nr) of out = x wt + bias. Each output is bias[h] + x[r, 0] wt[0, h] + x[r, 1] wt[1, h]
// + ... in index order, one rounding per product and per sum (no contraction: CMakeLists.txt), so the
// register-blocked body, the remainder loop and every instruction set below round alike: a row's bits
// do not depend on which block, clone or thread computed it. Cloned per instruction set (picked at load
// time): the file's baseline build had 4-wide SSE2 vectors only.
template <typename T, int HB>
PROTDIFF_ISA_CLONES void row_block(const T* xp, const T* wp, const T* bp, T* op, py::ssize_t r0, int nr,
                                   py::ssize_t K, py::ssize_t H) {
  py::ssize_t h0 = 0;
  if (nr == kRows) {
    // GCC vector extensions: one 64-byte vector per row and column block, lowered to one zmm, two ymm or
    // four xmm registers per clone (the plain arrays this replaced were left scalar by the vectoriser)
    typedef T V __attribute__((vector_size(64)));
    static_assert(sizeof(V) == HB * sizeof(T), "HB lanes per vector");
    for (; h0 + HB <= H; h0 += HB) {
      V acc[kRows];
      V b0 = V{};
      if (bp) std::memcpy(&b0, bp + h0, sizeof(V));
      for (int i = 0; i < kRows; ++i) acc[i] = b0;
      for (py::ssize_t k = 0; k < K; ++k) {
        V w;
        std::memcpy(&w, wp + k * H + h0, sizeof(V));
        for (int i = 0; i < kRows; ++i) acc[i] += xp[(r0 + i) * K + k] * w;  // product rounded, then the sum
      }
      for (int i = 0; i < kRows; ++i) std::memcpy(op + (r0 + i) * H + h0, &acc[i], sizeof(V));
    }
  }
  for (int i = 0; i < nr; ++i) {  // what the blocks left: columns past the last full block, a short row block
    T* o = op + (r0 + i) * H;
    const T* xr = xp + (r0 + i) * K;
    for (py::ssize_t h = h0; h < H; ++h) o[h] = bp ? bp[h] : T(0);
    for (py::ssize_t k = 0; k < K; ++k) {
      const T xk = xr[k];
      const T* w = wp + k * H;
      for (py::ssize_t h = h0; h < H; ++h) o[h] += xk * w[h];
    }
  }
}

}  // namespace

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
  const py::ssize_t blocks = (R + kRows - 1) / kRows;
#pragma omp parallel for schedule(static)
  for (py::ssize_t b = 0; b < blocks; ++b) {
    const py::ssize_t r0 = b * kRows;
    const int nr = static_cast<int>(R - r0 < kRows ? R - r0 : kRows);
    row_block<T, 64 / sizeof(T)>(xp, wp, bp, op, r0, nr, K, H);
  }
}

template void rowwise_linear<float>(CArray<float>, CArray<float>, CArray<float>, CArray<float>);
template void rowwise_linear<double>(CArray<double>, CArray<double>, CArray<double>, CArray<double>);

}  // namespace protdiff
