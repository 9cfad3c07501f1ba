// Shared helpers for the CPU kernels: buffer checks and OpenMP shims.
//
// Every kernel takes C-contiguous numpy buffers (zero-copy views of CPU torch tensors).
// Arguments are bound with .noconvert(): a float64 or strided array passed where a
// contiguous float32 one is expected is an error, never a silent temporary copy whose
// writes would be lost.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>

#ifdef PROTDIFF_HAVE_OPENMP
#include <omp.h>
#endif

namespace protdiff {

namespace py = pybind11;

template <typename T>
using CArray = py::array_t<T, py::array::c_style>;

// Shape check: `expected` holds a size per dimension, -1 for "any".
template <typename T>
void check_shape(const CArray<T>& a, const char* name, std::initializer_list<py::ssize_t> expected) {
  std::ostringstream want;
  bool ok = a.ndim() == static_cast<py::ssize_t>(expected.size());
  py::ssize_t d = 0;
  want << "(";
  for (py::ssize_t e : expected) {
    if (d) want << ", ";
    if (e < 0) {
      want << "*";
    } else {
      want << e;
      if (ok && a.shape(d) != e) ok = false;
    }
    ++d;
  }
  want << ")";
  if (!ok) {
    std::ostringstream got;
    got << "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) got << (i ? ", " : "") << a.shape(i);
    got << ")";
    throw std::invalid_argument(std::string(name) + ": expected shape " + want.str() + ", got " + got.str());
  }
}

template <typename T>
T* writable_data(CArray<T>& a, const char* name) {
  if (!a.writeable()) throw std::invalid_argument(std::string(name) + ": array is read-only");
  return a.mutable_data();
}

inline int max_threads() {
#ifdef PROTDIFF_HAVE_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline void set_threads(int n) {
  if (n < 1) throw std::invalid_argument("num_threads must be >= 1");
#ifdef PROTDIFF_HAVE_OPENMP
  omp_set_num_threads(n);
#endif
}

}  // namespace protdiff
