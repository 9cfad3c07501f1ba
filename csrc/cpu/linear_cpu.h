#pragma once
#include "common.h"

namespace protdiff {

// out[r, :] = bias + sum_k x[r, k] wt[k, :], each row summed over k in index order (batch-invariant).
template <typename T>
void rowwise_linear(CArray<T> x, CArray<T> wt, CArray<T> bias, CArray<T> out);

}  // namespace protdiff
