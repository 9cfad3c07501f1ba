// bf16 matrix products on Intel AMX (Sapphire Rapids and later), for the bf16 path of the fused
// EGNN forward. Plain functions (no templates): amx_gemm.cpp is compiled with the AMX flags and
// nothing else may inline its code into a translation unit built without them.
#pragma once

#include <cstdint>

namespace protdiff {
namespace amx {

// True when this build has the AMX code, the CPU has AMX-TILE, AMX-BF16 and AVX512-BF16, and
// the kernel granted this process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM). Cached.
bool available();

// Why available() is false ("" when it is true).
const char* unavailable_reason();

// W (K x N fp32, row-major) -> bf16 in AMX's pair-interleaved ("VNNI") layout:
// out[(k / 2) * 2N + 2n + (k % 2)] = bf16(W[k][n]). K even.
void pack_b_vnni(const float* W, std::int64_t K, std::int64_t N, std::int64_t ldw, std::uint16_t* out);

// dst[r][c] = bf16(src[r][c]) (round to nearest even) for r < rows, c < cols; cols % 32 == 0.
void rows_to_bf16(const float* src, std::int64_t ld_src, std::int64_t rows, std::int64_t cols, std::uint16_t* dst,
                  std::int64_t ld_dst);

// hi[r][c] = bf16(src[r][c]), lo[r][c] = bf16(src[r][c] - hi[r][c]) (round to nearest even) for
// r < rows, c < cols; cols % 16 == 0, hi and lo with ld_dst. hi + lo carries ~16 of fp32's 24 bits:
// the left operand (gemm_bias_hi_lo) of a product whose columns cancel.
void rows_to_bf16_hi_lo(const float* src, std::int64_t ld_src, std::int64_t rows, std::int64_t cols,
                        std::uint16_t* hi, std::uint16_t* lo, std::int64_t ld_dst);

// dst[c][r] = bf16(src[r][c]) for c < cols, r < rows32 (rows >= `rows` are zeros): the left
// operand of a weight gradient (A^T of a [rows x cols] activation). dst has rows32 columns.
void transpose_to_bf16(const float* src, std::int64_t ld_src, std::int64_t rows, std::int64_t rows32,
                       std::int64_t cols, std::uint16_t* dst);

// The [rows32 x cols] matrix src (rows >= `rows` taken as zeros) as a right operand: pack_b_vnni
// without a separate fp32 copy. cols % 16 == 0, rows32 % 2 == 0.
void rows_to_vnni(const float* src, std::int64_t ld_src, std::int64_t rows, std::int64_t rows32, std::int64_t cols,
                  std::uint16_t* dst);

// out[r][n] = bias[n] for r < 16: gemm_bias's bias operand.
void bias_rows(const float* bias, std::int64_t N, float* out);

// C[M x N] = A[M x K] (bf16, row-major, lda elements) x Bp (pack_b_vnni of a K x N matrix) + bias,
// or with a null bias C += A x Bp; fp32 accumulation. bias: 16 identical rows of N entries
// (bias_rows), the starting value of a 16-row C tile.
// M % 16 == 0, K % 32 == 0, N % 32 == 0. C fp32 row-major with ldc elements.
void gemm_bias(std::int64_t M, std::int64_t K, std::int64_t N, const std::uint16_t* A, std::int64_t lda,
               const std::uint16_t* Bp, const float* bias, float* C, std::int64_t ldc);

// gemm_bias with A = A_hi + A_lo (rows_to_bf16_hi_lo), both with lda: each B tile serves both.
void gemm_bias_hi_lo(std::int64_t M, std::int64_t K, std::int64_t N, const std::uint16_t* A_hi,
                     const std::uint16_t* A_lo, std::int64_t lda, const std::uint16_t* Bp, const float* bias, float* C,
                     std::int64_t ldc);

}  // namespace amx
}  // namespace protdiff
