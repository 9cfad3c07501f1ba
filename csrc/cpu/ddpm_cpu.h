#pragma once
#include <pybind11/stl.h>

#include <optional>
#include <vector>

#include "common.h"

namespace protdiff {

template <typename T>
void ddpm_step_np(CArray<T> x_t, CArray<T> eps_hat, CArray<double> c1, CArray<double> c2, CArray<double> sigma,
                  CArray<double> x0_a, CArray<double> x0_b, CArray<std::uint8_t> mask, std::optional<CArray<T>> noise,
                  CArray<std::uint64_t> seeds, CArray<std::int64_t> t, CArray<T> prev_out,
                  std::optional<CArray<T>> mean_out, std::optional<CArray<T>> x0_out);

// One raw Philox4x32-10 block (for known-answer tests of the generator).
std::vector<std::uint32_t> philox4x32_np(std::vector<std::uint32_t> ctr, std::vector<std::uint32_t> key);

template <typename T>
void philox_normal_np(CArray<std::uint64_t> seeds, CArray<std::int64_t> t, CArray<T> out);

}  // namespace protdiff
