// numpy-buffer entry points of the fused EGNN op (checked, then dispatched to one ISA build).
#pragma once

#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "common.h"

namespace protdiff {

template <typename T>
using OptArray = std::optional<CArray<T>>;

template <typename T>
void egnn_forward_np(CArray<T> x, CArray<T> p, CArray<T> q, CArray<T> w_d, CArray<T> W2, CArray<T> b2,
                     CArray<T> W3, CArray<T> b3, CArray<T> w4, OptArray<T> edge_attr, OptArray<T> W_e,
                     OptArray<T> rel, OptArray<T> w_att, double b_att, OptArray<std::uint8_t> mask, int normalize,
                     bool use_tanh, bool mean_agg, double eps, CArray<T> m_out, CArray<T> dx_out, bool amx);

template <typename T>
void egnn_backward_np(CArray<T> x, CArray<T> p, CArray<T> q, CArray<T> w_d, CArray<T> W2, CArray<T> b2,
                      CArray<T> W3, CArray<T> b3, CArray<T> w4, OptArray<T> edge_attr, OptArray<T> W_e,
                      OptArray<T> rel, OptArray<T> w_att, double b_att, OptArray<std::uint8_t> mask, int normalize,
                      bool use_tanh, bool mean_agg, double eps, CArray<T> grad_m, CArray<T> grad_dx,
                      CArray<T> d_x, CArray<T> d_p, CArray<T> d_q, CArray<T> d_w_d, CArray<T> d_W2,
                      CArray<T> d_b2, CArray<T> d_W3, CArray<T> d_b3, CArray<T> d_w4, OptArray<T> d_edge_attr,
                      OptArray<T> d_W_e, OptArray<T> d_rel, OptArray<T> d_w_att, OptArray<T> d_b_att, bool amx);

std::string simd_isa();
bool amx_available();
std::string amx_unavailable_reason();
void set_simd_isa(const std::string& name);
std::string supported_isas();
std::int64_t workspace_bytes();  // defined in egnn_bind.cpp, declared for the kernels in egnn_cpu.h

}  // namespace protdiff
