// The only PYBIND11_MODULE of protdiff_fast._C. Kernels live in csrc/cpu/.
#include "common.h"
#include "cpu/com_cpu.h"
#include "cpu/linear_cpu.h"
#include "cpu/ddpm_cpu.h"
#include "cpu/egnn_bind.h"

namespace py = pybind11;
using protdiff::CArray;

namespace {

// One overload per dtype (float32, float64): arrays are never converted, so a buffer of the
// wrong dtype or layout selects no overload and raises TypeError instead of being copied.
template <typename T>
void def_egnn(py::module_& m) {
  const auto none = py::none();
  m.def("egnn_forward", &protdiff::egnn_forward_np<T>, py::arg("x").noconvert(), py::arg("p").noconvert(),
        py::arg("q").noconvert(), py::arg("w_d").noconvert(), py::arg("W2").noconvert(), py::arg("b2").noconvert(),
        py::arg("W3").noconvert(), py::arg("b3").noconvert(), py::arg("w4").noconvert(),
        py::arg("edge_attr").noconvert() = none, py::arg("W_e").noconvert() = none,
        py::arg("rel").noconvert() = none, py::arg("w_att").noconvert() = none, py::arg("b_att") = 0.0,
        py::arg("mask").noconvert() = none, py::arg("normalize") = 0, py::arg("tanh") = false,
        py::arg("mean_agg") = true, py::arg("eps") = 1e-8, py::arg("m_out").noconvert(),
        py::arg("dx_out").noconvert(), py::arg("amx") = false,
        "Fused EGNN pair aggregation forward (the egnn_pair_aggregate contract): writes m_i into m_out "
        "(B, N, M) and dx_i into dx_out (B, N, 3); p, q (B, N, He), W2 (He, M), W3 (M, Hx). Weights in (in, out) "
        "layout; mask uint8 (B, N). amx=True: the two per-pair products in bf16 on AMX, fp32 accumulation (float32 buffers, "
        "avx512 kernels; see amx_available()).");
  m.def("egnn_backward", &protdiff::egnn_backward_np<T>, py::arg("x").noconvert(), py::arg("p").noconvert(),
        py::arg("q").noconvert(), py::arg("w_d").noconvert(), py::arg("W2").noconvert(), py::arg("b2").noconvert(),
        py::arg("W3").noconvert(), py::arg("b3").noconvert(), py::arg("w4").noconvert(),
        py::arg("edge_attr").noconvert() = none, py::arg("W_e").noconvert() = none,
        py::arg("rel").noconvert() = none, py::arg("w_att").noconvert() = none, py::arg("b_att") = 0.0,
        py::arg("mask").noconvert() = none, py::arg("normalize") = 0, py::arg("tanh") = false,
        py::arg("mean_agg") = true, py::arg("eps") = 1e-8, py::arg("grad_m").noconvert(),
        py::arg("grad_dx").noconvert(), py::arg("d_x").noconvert(), py::arg("d_p").noconvert(),
        py::arg("d_q").noconvert(), py::arg("d_w_d").noconvert(), py::arg("d_W2").noconvert(),
        py::arg("d_b2").noconvert(), py::arg("d_W3").noconvert(), py::arg("d_b3").noconvert(),
        py::arg("d_w4").noconvert(), py::arg("d_edge_attr").noconvert() = none,
        py::arg("d_W_e").noconvert() = none, py::arg("d_rel").noconvert() = none,
        py::arg("d_w_att").noconvert() = none, py::arg("d_b_att").noconvert() = none, py::arg("amx") = false,
        "Fused EGNN pair aggregation backward: recomputes the pair quantities and writes the gradient of "
        "every input into the d_* buffers (deterministic: fixed-order reductions, no atomics). amx=True: "
        "the recomputed forward products and dS W3^T, dY W2^T in bf16 on AMX (weight gradients fp32).");
}

template <typename T>
void def_ddpm(py::module_& m) {
  const auto none = py::none();
  m.def("ddpm_step", &protdiff::ddpm_step_np<T>, py::arg("x_t").noconvert(), py::arg("eps_hat").noconvert(),
        py::arg("c1").noconvert(), py::arg("c2").noconvert(), py::arg("sigma").noconvert(),
        py::arg("x0_a").noconvert(), py::arg("x0_b").noconvert(), py::arg("mask").noconvert(),
        py::arg("noise").noconvert() = none, py::arg("seeds").noconvert(), py::arg("t").noconvert(),
        py::arg("prev_out").noconvert(), py::arg("mean_out").noconvert() = none,
        py::arg("x0_out").noconvert() = none,
        "Fused DDPM ancestral step with per-sample coefficients (float64, (B,)), zero-CoM projection over "
        "real nodes, and Philox noise keyed by (seeds[b], t[b], element) unless `noise` is given.");
  m.def("philox_normal", &protdiff::philox_normal_np<T>, py::arg("seeds").noconvert(), py::arg("t").noconvert(),
        py::arg("out").noconvert(),
        "Fill out[b] with the step's standard normals for (seeds[b], t[b]) (the draw ddpm_step uses).");
}

}  // namespace

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

  m.def("rowwise_linear", &protdiff::rowwise_linear<float>, py::arg("x").noconvert(), py::arg("wt").noconvert(),
        py::arg("bias").noconvert(), py::arg("out").noconvert(),
        "out = x wt + bias, every row summed over k in index order (batch-invariant: a row's bits depend only\n"
        "on that row). x (R, K), wt (K, H), bias (H,) or (0,), out (R, H): float32 or float64, C-contiguous.");
  m.def("rowwise_linear", &protdiff::rowwise_linear<double>, py::arg("x").noconvert(), py::arg("wt").noconvert(),
        py::arg("bias").noconvert(), py::arg("out").noconvert());

  def_egnn<float>(m);
  def_egnn<double>(m);
  def_ddpm<float>(m);
  def_ddpm<double>(m);
  m.def("philox4x32", &protdiff::philox4x32_np, py::arg("counter"), py::arg("key"),
        "One Philox4x32-10 block: 4 counter words and 2 key words in, 4 words out.");
  m.def("amx_available", &protdiff::amx_available,
        "Whether the bf16 AMX products can run here (build, CPU and the kernel's tile-state permission).");
  m.def("amx_unavailable_reason", &protdiff::amx_unavailable_reason, "Why amx_available() is False ('' if True).");
  m.def("simd_isa", &protdiff::simd_isa, "Instruction set the EGNN kernels run with (avx512, avx2 or base).");
  m.def("set_simd_isa", &protdiff::set_simd_isa, py::arg("name"),
        "Run the EGNN kernels with another instruction set this CPU supports (for testing every build).");
  m.def("supported_simd_isas", &protdiff::supported_isas, "Comma-separated instruction sets this CPU runs.");

  m.def("workspace_bytes", &protdiff::workspace_bytes,
        "Bytes the EGNN backward keeps between calls (per-thread partial buffers, grow-only).");
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
