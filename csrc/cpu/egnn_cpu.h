// Fused EGNN pair aggregation on the CPU: the `egnn_pair_aggregate` contract of
// protdiff_fast/reference/egnn.py, forward and backward, never materializing O(N^2 H).
//
// This header is plain C++ (no pybind11): egnn_cpu.cpp includes it and is compiled once per
// instruction set, into the namespaces declared at the bottom; egnn_bind.cpp picks one at run time.
#pragma once

#include <cstdint>

namespace protdiff {

// All buffers C-contiguous; weights in (in, out) layout, as in the contract. Three widths: He of
// the pair input z_ij (p, q, w_d, the edge term), M of the messages m_ij (W2's columns), Hx of
// phi_x's hidden layer (W3's columns); ProtDiff has He = M = Hx = H, egnn-pytorch's layer He = 4M + 2,
// Hx = 4M.
template <typename T>
struct EgnnProblem {
  std::int64_t B = 0, N = 0, He = 0, M = 0, Hx = 0;
  std::int64_t E = 0;   // dense edge width; 0 when there is no dense edge term
  std::int64_t K = -1;  // relative-offset table half width; -1 when there is no table
  const T* x = nullptr;  // (B, N, 3)
  const T* p = nullptr;  // (B, N, He)
  const T* q = nullptr;  // (B, N, He)
  const T* w_d = nullptr;  // (He)
  const T* W2 = nullptr;   // (He, M)
  const T* b2 = nullptr;   // (M)
  const T* W3 = nullptr;   // (M, Hx)
  const T* b3 = nullptr;   // (Hx)
  const T* w4 = nullptr;   // (Hx)
  const T* edge_attr = nullptr;  // (B, N, N, E)
  const T* W_e = nullptr;        // (E, He)
  const T* rel = nullptr;        // (2K + 1, He)
  const T* w_att = nullptr;      // (M); attention on when non-null
  T b_att = 0;
  const std::uint8_t* mask = nullptr;  // (B, N); all real when null
  int normalize = 0;  // 0: u = x_i - x_j; 1: u / (stopgrad |u| + eps); 2: u / max(|u|, eps), gradient through |u|
  bool use_tanh = false, mean_agg = true;
  T eps = T(1e-8);
  // float, AVX-512 build: the per-pair products (forward: a W2, m W3; backward also dS W3^T,
  // dY W2^T and the weight gradients a^T dY, m^T dS) with bf16 operands on AMX and fp32
  // accumulation, everything else fp32. a and m go in as bf16 hi + lo where a bend reads the
  // product (silu' in the backward, the attention gate): see tile_forward. The caller checks
  // amx::available().
  bool amx = false;
};

// Gradient outputs (written, not accumulated). edge_attr may be null (not needed).
template <typename T>
struct EgnnGrads {
  T *x = nullptr, *p = nullptr, *q = nullptr, *w_d = nullptr, *W2 = nullptr, *b2 = nullptr, *W3 = nullptr,
    *b3 = nullptr, *w4 = nullptr, *edge_attr = nullptr, *W_e = nullptr, *rel = nullptr, *w_att = nullptr,
    *b_att = nullptr;
};

// Bytes held by the backward's per-thread workspaces (kept between calls), over all threads and
// builds; egnn_bind.cpp keeps the count, the benchmark adds it to the memory it measures.
void workspace_bytes_add(std::int64_t delta);
std::int64_t workspace_bytes();

#define PROTDIFF_DECLARE_EGNN_ISA(ns)                                                                  \
  namespace ns {                                                                                       \
  template <typename T>                                                                                \
  void egnn_forward(const EgnnProblem<T>& pr, T* m_out, T* dx_out);                                    \
  template <typename T>                                                                                \
  void egnn_backward(const EgnnProblem<T>& pr, const T* grad_m, const T* grad_dx, const EgnnGrads<T>& g); \
  int vector_bytes();                                                                                  \
  }

PROTDIFF_DECLARE_EGNN_ISA(isa_base)
PROTDIFF_DECLARE_EGNN_ISA(isa_avx2)    // x86 only
PROTDIFF_DECLARE_EGNN_ISA(isa_avx512)  // x86 only

}  // namespace protdiff
