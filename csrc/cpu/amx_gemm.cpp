// See amx_gemm.h. Compiled with -mamx-tile -mamx-bf16 -mavx512bf16 where the compiler has them
// (PROTDIFF_HAVE_AMX); elsewhere every entry point reports "not built".
#include "cpu/amx_gemm.h"

#include <cstring>

#if defined(PROTDIFF_HAVE_AMX)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace protdiff {
namespace amx {

#if defined(PROTDIFF_HAVE_AMX)

namespace {

constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl: ask for an XSAVE feature's state
constexpr long kXfeatureXtiledata = 18;

struct TileConfig {
  std::uint8_t palette_id;
  std::uint8_t start_row;
  std::uint8_t reserved[14];
  std::uint16_t colsb[16];
  std::uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

const char* probe() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16"))
    return "this CPU has no AMX-TILE / AMX-BF16";
  if (!__builtin_cpu_supports("avx512bf16")) return "this CPU has no AVX512-BF16";
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0)
    return "the kernel refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)";
  return "";
}

const char* reason() {
  static const char* r = probe();
  return r;
}

// Every tile 16 rows x 64 bytes: A (16 x 32 bf16), B (16 pair-rows x 16 columns x 2), C (16 x 16 fp32).
void load_config() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

inline std::uint16_t to_bf16(float f) {  // round to nearest even; NaN stays NaN
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu)) return static_cast<std::uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

// exact (bf16 is fp32's upper half); the maskz forms because GCC 12's plain ones pass an undefined
// vector that -Wmaybe-uninitialized reports
inline __m512 bf16_to_ps(__m256bh v) {
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xffff, _mm512_maskz_cvtepu16_epi32(0xffff, (__m256i)v), 16));
}

}  // namespace

bool available() { return reason()[0] == '\0'; }
const char* unavailable_reason() { return reason(); }

void pack_b_vnni(const float* W, std::int64_t K, std::int64_t N, std::int64_t ldw, std::uint16_t* out) {
  for (std::int64_t k = 0; k < K; ++k)
    for (std::int64_t n = 0; n < N; ++n) out[(k / 2) * 2 * N + 2 * n + (k % 2)] = to_bf16(W[k * ldw + n]);
}

void rows_to_bf16(const float* src, std::int64_t ld_src, std::int64_t rows, std::int64_t cols, std::uint16_t* dst,
                  std::int64_t ld_dst) {
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; c += 32) {
      const __m512 lo = _mm512_loadu_ps(src + r * ld_src + c);
      const __m512 hi = _mm512_loadu_ps(src + r * ld_src + c + 16);
      _mm512_storeu_si512(dst + r * ld_dst + c, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
}

void rows_to_bf16_hi_lo(const float* src, std::int64_t ld_src, std::int64_t rows, std::int64_t cols,
                        std::uint16_t* hi, std::uint16_t* lo, std::int64_t ld_dst) {
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; c += 16) {
      const __m512 a = _mm512_loadu_ps(src + r * ld_src + c);
      const __m256bh h = _mm512_cvtneps_pbh(a);
      // a - h is exact in fp32 (h holds a's leading bits): lo loses only its own rounding
      const __m256bh l = _mm512_cvtneps_pbh(_mm512_sub_ps(a, bf16_to_ps(h)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + r * ld_dst + c), (__m256i)h);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + r * ld_dst + c), (__m256i)l);
    }
}

void bias_rows(const float* bias, std::int64_t N, float* out) {
  for (int r = 0; r < 16; ++r) std::memcpy(out + r * N, bias, static_cast<size_t>(N) * sizeof(float));
}

void transpose_to_bf16(const float* src, std::int64_t ld_src, std::int64_t rows, std::int64_t rows32,
                       std::int64_t cols, std::uint16_t* dst) {
  // one 16-lane gather per (column, 16 rows): no shuffle network to get wrong, ~2 cycles per value
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i stride = _mm512_set1_epi32(static_cast<int>(ld_src));
  const __m512i offsets = _mm512_mullo_epi32(lanes, stride);
  for (std::int64_t r0 = 0; r0 < rows32; r0 += 32) {
    const std::int64_t left_lo = rows - r0, left_hi = rows - r0 - 16;
    const __mmask16 m_lo = left_lo >= 16 ? 0xffff : left_lo <= 0 ? 0 : static_cast<__mmask16>((1u << left_lo) - 1);
    const __mmask16 m_hi = left_hi >= 16 ? 0xffff : left_hi <= 0 ? 0 : static_cast<__mmask16>((1u << left_hi) - 1);
    for (std::int64_t c = 0; c < cols; ++c) {
      const float* base = src + r0 * ld_src + c;
      const __m512 lo = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m_lo, offsets, base, 4);
      const __m512 hi = m_hi ? _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m_hi, offsets, base + 16 * ld_src, 4)
                             : _mm512_setzero_ps();
      _mm512_storeu_si512(dst + c * rows32 + r0, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }
}

void rows_to_vnni(const float* src, std::int64_t ld_src, std::int64_t rows, std::int64_t rows32, std::int64_t cols,
                  std::uint16_t* dst) {
  // interleave two converted rows: out = ra0 rb0 ra1 rb1 ... (16-bit lanes)
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (std::int64_t r = 0; r < rows32; r += 2)
    for (std::int64_t c = 0; c < cols; c += 16) {
      const __m512 a = r < rows ? _mm512_loadu_ps(src + r * ld_src + c) : _mm512_setzero_ps();
      const __m512 b = r + 1 < rows ? _mm512_loadu_ps(src + (r + 1) * ld_src + c) : _mm512_setzero_ps();
      const __m512i ab = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // lanes 0-15: row r, 16-31: row r + 1
      _mm512_storeu_si512(dst + (r / 2) * 2 * cols + 2 * c, _mm512_permutexvar_epi16(interleave, ab));
    }
}

namespace {

// 2 x 2 blocks of 16 x 16 output tiles (tmm0-3) from two A tiles (tmm4-5) and two B tiles
// (tmm6-7); a last odd block row uses tmm0-1 only. kLo: A_lo's tiles go through tmm4-5 after A's,
// against the B tiles already loaded (no second pass over B and C).
template <bool kLo>
void gemm_tiles(std::int64_t M, std::int64_t K, std::int64_t N, const std::uint16_t* A, const std::uint16_t* A_lo,
                std::int64_t lda, const std::uint16_t* Bp, const float* bias, float* C, std::int64_t ldc) {
  load_config();
  const long sa = lda * 2, sb = 4 * N, sc = ldc * 4;
  for (std::int64_t n0 = 0; n0 < N; n0 += 32) {
    // the starting value of the C tile at (row m, column n0 + c16): the bias rows, or C itself
    const long sstart = bias ? 4 * N : sc;
    auto start = [&](std::int64_t m, int c16) { return bias ? bias + n0 + c16 : C + m * ldc + n0 + c16; };
    std::int64_t m0 = 0;
    for (; m0 + 32 <= M; m0 += 32) {
      _tile_loadd(0, start(m0, 0), sstart);
      _tile_loadd(1, start(m0, 16), sstart);
      _tile_loadd(2, start(m0 + 16, 0), sstart);
      _tile_loadd(3, start(m0 + 16, 16), sstart);
      for (std::int64_t k = 0; k < K; k += 32) {
        _tile_loadd(4, A + m0 * lda + k, sa);
        _tile_loadd(5, A + (m0 + 16) * lda + k, sa);
        _tile_loadd(6, Bp + (k / 2) * 2 * N + 2 * n0, sb);
        _tile_loadd(7, Bp + (k / 2) * 2 * N + 2 * (n0 + 16), sb);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
        if constexpr (kLo) {
          _tile_loadd(4, A_lo + m0 * lda + k, sa);
          _tile_loadd(5, A_lo + (m0 + 16) * lda + k, sa);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, C + m0 * ldc + n0, sc);
      _tile_stored(1, C + m0 * ldc + n0 + 16, sc);
      _tile_stored(2, C + (m0 + 16) * ldc + n0, sc);
      _tile_stored(3, C + (m0 + 16) * ldc + n0 + 16, sc);
    }
    if (m0 < M) {  // one block row of 16 left
      _tile_loadd(0, start(m0, 0), sstart);
      _tile_loadd(1, start(m0, 16), sstart);
      for (std::int64_t k = 0; k < K; k += 32) {
        _tile_loadd(4, A + m0 * lda + k, sa);
        _tile_loadd(6, Bp + (k / 2) * 2 * N + 2 * n0, sb);
        _tile_loadd(7, Bp + (k / 2) * 2 * N + 2 * (n0 + 16), sb);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if constexpr (kLo) {
          _tile_loadd(4, A_lo + m0 * lda + k, sa);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
        }
      }
      _tile_stored(0, C + m0 * ldc + n0, sc);
      _tile_stored(1, C + m0 * ldc + n0 + 16, sc);
    }
  }
  // no _tile_release(): after a release the next tile instruction traps into the kernel to
  // re-enable the tile state (measured: ~10% of a backward in kernel time)
}

}  // namespace

void gemm_bias(std::int64_t M, std::int64_t K, std::int64_t N, const std::uint16_t* A, std::int64_t lda,
               const std::uint16_t* Bp, const float* bias, float* C, std::int64_t ldc) {
  gemm_tiles<false>(M, K, N, A, nullptr, lda, Bp, bias, C, ldc);
}

void gemm_bias_hi_lo(std::int64_t M, std::int64_t K, std::int64_t N, const std::uint16_t* A_hi,
                     const std::uint16_t* A_lo, std::int64_t lda, const std::uint16_t* Bp, const float* bias, float* C,
                     std::int64_t ldc) {
  gemm_tiles<true>(M, K, N, A_hi, A_lo, lda, Bp, bias, C, ldc);
}

#else  // built without AMX

bool available() { return false; }
const char* unavailable_reason() { return "this build of the extension has no AMX code (compiler or platform)"; }
void pack_b_vnni(const float*, std::int64_t, std::int64_t, std::int64_t, std::uint16_t*) {}
void rows_to_bf16(const float*, std::int64_t, std::int64_t, std::int64_t, std::uint16_t*, std::int64_t) {}
void rows_to_bf16_hi_lo(const float*, std::int64_t, std::int64_t, std::int64_t, std::uint16_t*, std::uint16_t*,
                        std::int64_t) {}
void gemm_bias(std::int64_t, std::int64_t, std::int64_t, const std::uint16_t*, std::int64_t, const std::uint16_t*,
               const float*, float*, std::int64_t) {}
void gemm_bias_hi_lo(std::int64_t, std::int64_t, std::int64_t, const std::uint16_t*, const std::uint16_t*, std::int64_t,
                     const std::uint16_t*, const float*, float*, std::int64_t) {}
void transpose_to_bf16(const float*, std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::uint16_t*) {}
void bias_rows(const float*, std::int64_t, float*) {}
void rows_to_vnni(const float*, std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::uint16_t*) {}

#endif

}  // namespace amx
}  // namespace protdiff
