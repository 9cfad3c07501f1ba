#pragma once
#include "common.h"

namespace protdiff {

// In place: x[b, i, :] -= mean_{j : mask[b, j]} x[b, j, :] for real nodes, 0 for padding.
template <typename T>
void center_masked_(CArray<T> x, CArray<std::uint8_t> mask);

}  // namespace protdiff
