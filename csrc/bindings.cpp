// The only PYBIND11_MODULE of protdiff_fast._C. Kernels live in csrc/cpu/.
#include "common.h"
#include "cpu/com_cpu.h"

namespace py = pybind11;
using protdiff::CArray;

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "protdiff_fast CPU kernels (C++, OpenMP). Arguments are C-contiguous numpy arrays, typically "
      "zero-copy views of CPU torch tensors (tensor.numpy()); they are never converted or copied.";

  m.def("center_masked_", &protdiff::center_masked_<float>, py::arg("x").noconvert(),
        py::arg("mask").noconvert(),
        "In place: subtract each sample's centroid over its real nodes; padding rows become 0.\n"
        "x: float32 or float64 (B, N, D), C-contiguous, writeable; mask: uint8 (B, N).");
  m.def("center_masked_", &protdiff::center_masked_<double>, py::arg("x").noconvert(),
        py::arg("mask").noconvert());

  m.def("max_threads", &protdiff::max_threads, "OpenMP threads a parallel region will use (1 without OpenMP).");
  m.def("set_num_threads", &protdiff::set_threads, py::arg("n"),
        "Set the OpenMP thread count for this process's kernels.");
#ifdef PROTDIFF_HAVE_OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
  m.attr("build_type") = PROTDIFF_BUILD_TYPE;
  m.attr("native_arch") = static_cast<bool>(PROTDIFF_NATIVE);
#if defined(__clang__)
  m.attr("compiler") = "clang " __clang_version__;
#elif defined(__GNUC__)
  m.attr("compiler") = "gcc " __VERSION__;
#else
  m.attr("compiler") = "unknown";
#endif
}
