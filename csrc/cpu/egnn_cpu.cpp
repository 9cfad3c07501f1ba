// Fused EGNN pair aggregation, forward and backward, for one instruction set.
//
// Compiled three times (CMakeLists.txt) with PROTDIFF_ISA = isa_avx512 | isa_avx2 | isa_base and
// matching -m flags and PROTDIFF_VBYTES. Everything here lives in that namespace, and the file
// uses no std:: containers or algorithms: inline library code instantiated under different -m
// flags could be merged by the linker into one copy, and an AVX-512 copy must never run on a
// machine without it.
//
// The math is the contract in protdiff_fast/reference/egnn.py. Per pair (i, j), real and i != j:
//   z_ij = p_i + q_j + w_d d2_ij + e_ij          a_ij = silu(z_ij)
//   y_ij = a_ij W2 + b2                          m0_ij = silu(y_ij)
//   g_ij = sigmoid(m0_ij . w_att + b_att)        m_ij = g_ij m0_ij        (attention; else m = m0)
//   s_ij = m_ij W3 + b3                          phi_ij = silu(s_ij) . w4,  psi_ij = tanh(phi_ij) or phi_ij
//   m_i = sum_j m_ij                             dx_i = C_b sum_j u_ij psi_ij
//
// Widths: z_ij, a_ij have He columns, y_ij, m_ij have M (W2 is He x M), s_ij has Hx (W3 is M x Hx);
// ProtDiff's layer has He = M = Hx = H, egnn-pytorch's (nn/compat.py) He = 4M + 2 and Hx = 4M.
//
// Layout of the work: a tile is up to BI x BJ pairs (an i-block against a j-block), compacted to
// the pairs that count (both real, i != j) and padded to a multiple of MR rows. The two per-pair
// products run on the whole tile ([rows, Hep] x [Hep, Mp], then [rows, Mp] x [Mp, Hxp], a
// register-blocked micro-kernel), the elementwise work runs on SIMD vectors along each width. Each
// width is padded with zeros (Hep, Mp, Hxp), to a multiple of the micro-kernel's column chunk; zero
// columns stay exactly zero through every stage.
//
// Forward: one task per (sample, i-block); each task owns its output rows, so any schedule gives
// the same bits. Backward: recomputes the tile, then one task per (sample, group of i-blocks),
// where the number of groups depends only on B and N (never on the thread count). The j-side
// gradients (dq_j, dx_j, the offset table) and the weight gradients go to per-task partial
// buffers that are summed afterwards in a fixed order: deterministic, no atomics, O(tasks * N * H)
// extra memory.
#include "cpu/egnn_cpu.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "cpu/amx_gemm.h"
#include "cpu/simd.h"

#ifdef PROTDIFF_HAVE_OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#ifndef PROTDIFF_ISA
#error "PROTDIFF_ISA must name the namespace of this instruction set"
#endif

namespace protdiff {
namespace PROTDIFF_ISA {

using simd::Vec;
using std::int64_t;

int vector_bytes() { return PROTDIFF_VBYTES; }

template <typename T>
struct Tiles {
  static constexpr int kLanes = simd::VecTraits<T>::kLanes;
  // AVX-512: 8 rows x 2 vectors (16 accumulators); the [K, 2 vectors] panel of the weight is
  // 32 KB at H = 256 and stays in L1 across the row blocks (4 x 4 streamed a 64 KB panel from L2
  // per 4 rows: ~10% slower at H = 64 and 256). AVX2 has 16 registers: 6 x 2 (12 accumulators, as
  // BLIS's Haswell kernel: 4 x 2's 8 cannot hide the FMA latency of two pipes; row counts that are
  // not a multiple of 6, such as the weight gradients' Hp, finish with a smaller block).
  static constexpr int kMR = PROTDIFF_VBYTES == 64 ? 8 : (PROTDIFF_VBYTES == 32 ? 6 : 4);  // micro-kernel rows
  static constexpr int kNV = 2;                                  // micro-kernel vectors per row
  static constexpr int kChunk = kNV * kLanes;                    // micro-kernel columns
  // each width (He, M, Hx) is padded to kColPad columns: 64 in the AVX-512 build (AMX's gemm_bias needs it)
  static constexpr int kColPad = PROTDIFF_VBYTES == 64 ? 64 : kChunk;
};
constexpr int BI = 8;  // i-block
constexpr int BJ = 8;  // j-block
constexpr int kMaxRows = BI * BJ;
// tile rows padded for the products: to kMR, to 16 (AMX rows), to 32 (AMX weight gradients); 64
// pairs padded to 6 rows (AVX2) are 66
constexpr int kScratchRows = PROTDIFF_VBYTES == 32 ? 72 : 64;
static_assert(kScratchRows >= BI * BJ && kScratchRows % 8 == 0, "tile padding");
static_assert(PROTDIFF_VBYTES != 64 || kScratchRows % 32 == 0, "AMX tiles");

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

template <typename T>
struct IsFloat {
  static constexpr bool value = false;
};
template <>
struct IsFloat<float> {
  static constexpr bool value = true;
};
// The AMX products run only in the AVX-512 build for float (the column padding Hp is then a
// multiple of 64, as gemm_bias needs).
template <typename T>
constexpr bool kAmxCapable = IsFloat<T>::value && PROTDIFF_VBYTES == 64;
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t clip64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// A zero-initialized heap array; no std::vector (see the file comment).
template <typename T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(int64_t n) { reset(n); }
  ~Buffer() { std::free(data_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void reset(int64_t n) {
    std::free(data_);
    data_ = nullptr;
    size_ = n;
    if (n > 0) {
      data_ = static_cast<T*>(std::calloc(static_cast<size_t>(n), sizeof(T)));
      if (!data_) throw std::bad_alloc();
    }
  }
  T* get() { return data_; }
  const T* get() const { return data_; }
  T& operator[](int64_t k) { return data_[k]; }
  int64_t size() const { return size_; }

 private:
  T* data_ = nullptr;
  int64_t size_ = 0;
};

inline int64_t max_threads_here() {
#ifdef PROTDIFF_HAVE_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// Flush denormals to zero (and treat denormal inputs as zero) while a kernel runs on this thread:
// saturated sigmoids produce values near 1e-39, and denormal arithmetic is ~100x slower. Results
// differ from IEEE only below 1.2e-38 in magnitude. The previous mode is restored on exit.
class FlushDenormals {
 public:
#if defined(__x86_64__) || defined(__i386__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
};

template <typename T>
void zero(T* p, int64_t n) {
  std::memset(p, 0, static_cast<size_t>(n) * sizeof(T));
}

// The backward's per-task partial buffers, reused across calls by the calling thread (grow-only,
// zeroed per call). Fresh pages for them every call cost a page fault per 4 KB, and calloc's
// pages fault twice (the zero page is mapped on the first read of `acc += ...`, the first write
// copies it and flushes the TLB of every thread with an IPI): ~8% of an H = 256 backward.
// Areas above kWorkspaceKeep elements are not kept, so a one-off huge call does not pin memory.
constexpr int64_t kWorkspaceKeep = int64_t(1) << 24;  // 64 MB of float

template <typename T>
class Workspace {
 public:
  Workspace() = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace() { workspace_bytes_add(-kept_.size() * static_cast<int64_t>(sizeof(T))); }

  // n elements (not zeroed), valid until the next call on this thread
  T* get(int64_t n) {
    if (n > kWorkspaceKeep) {
      oneoff_.reset(n);
      return oneoff_.get();
    }
    oneoff_.reset(0);
    if (kept_.size() < n) {
      workspace_bytes_add((n - kept_.size()) * static_cast<int64_t>(sizeof(T)));
      kept_.reset(n);
    }
    return kept_.get();
  }

 private:
  Buffer<T> kept_, oneoff_;
};

// C[M x Nc] += op(A) B[K x Nc], row-major with leading dimensions; op(A) is A[M x K], or with
// kTransA the transpose of A stored as [K x M] (the weight-gradient products a^T dy, m^T ds read
// the tile column-wise instead of transposing it). Nc % kChunk == 0; M is any count (blocks of
// kMR rows, then one smaller block). The accumulators of a block stay in registers across K.
// With a non-null `bias` (Nc entries) C is not read: each row starts from the bias instead.
// One MR x kChunk block of gemm_acc: rows r0.., columns n0.., accumulators in registers across K.
template <typename T, bool kTransA, int MR>
inline void gemm_block(int64_t r0, int64_t n0, int64_t K, const T* A, int64_t lda, const T* Bm, int64_t ldb,
                       T* C, int64_t ldc, const T* bias) {
  using V = Vec<T>;
  constexpr int L = Tiles<T>::kLanes, NV = Tiles<T>::kNV;
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] = simd::load((bias ? bias : C + (r0 + r) * ldc) + n0 + v * L);
  const T* b = Bm + n0;
  for (int64_t k = 0; k < K; ++k) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = simd::load(b + k * ldb + v * L);
    for (int r = 0; r < MR; ++r) {
      const V av = simd::splat(kTransA ? A[k * lda + r0 + r] : A[(r0 + r) * lda + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) simd::store(C + (r0 + r) * ldc + n0 + v * L, acc[r][v]);
}

// The last M % MR rows, as one smaller block (R = MR - 1 down to 1).
template <typename T, bool kTransA, int R>
inline void gemm_tail(int64_t rest, int64_t r0, int64_t n0, int64_t K, const T* A, int64_t lda, const T* Bm,
                      int64_t ldb, T* C, int64_t ldc, const T* bias) {
  if constexpr (R > 0) {
    if (rest == R) {
      gemm_block<T, kTransA, R>(r0, n0, K, A, lda, Bm, ldb, C, ldc, bias);
      return;
    }
    gemm_tail<T, kTransA, R - 1>(rest, r0, n0, K, A, lda, Bm, ldb, C, ldc, bias);
  }
}

template <typename T, bool kTransA = false>
void gemm_acc(int64_t M, int64_t K, int64_t Nc, const T* A, int64_t lda, const T* Bm, int64_t ldb, T* C,
              int64_t ldc, const T* bias = nullptr) {
  constexpr int MR = Tiles<T>::kMR, NCH = Tiles<T>::kChunk;
  for (int64_t n0 = 0; n0 < Nc; n0 += NCH) {
    int64_t r0 = 0;
    for (; r0 + MR <= M; r0 += MR) gemm_block<T, kTransA, MR>(r0, n0, K, A, lda, Bm, ldb, C, ldc, bias);
    gemm_tail<T, kTransA, MR - 1>(M - r0, r0, n0, K, A, lda, Bm, ldb, C, ldc, bias);
  }
}

// Weights and per-node halves, zero-padded from He, M, Hx to Hep, Mp, Hxp columns (and E to Ep).
template <typename T>
struct Packed {
  bool amx = false;
  int64_t He, M, Hx, Hep, Mp, Hxp, E, Ep, Er;  // Ep: E padded to a column chunk; Er: E padded to MR rows
  Buffer<T> W2, W2T, W3, W3T, b2, b3, w4, wd, watt, We, WeT, rel, P, Q;
  Buffer<std::uint16_t> W2p, W3p, W2Tp, W3Tp;  // bf16, AMX's pair-interleaved layout (EgnnProblem::amx)
  Buffer<float> b2rows, b3rows;                 // 16 rows of b2, b3: the AMX products' starting tiles

  explicit Packed(const EgnnProblem<T>& pr) {
    He = pr.He, M = pr.M, Hx = pr.Hx;
    Hep = round_up(He, Tiles<T>::kColPad);
    Mp = round_up(M, Tiles<T>::kColPad);
    Hxp = round_up(Hx, Tiles<T>::kColPad);
    E = pr.E;
    Ep = round_up(E > 0 ? E : 1, Tiles<T>::kChunk);
    Er = round_up(E > 0 ? E : 1, Tiles<T>::kMR);
    // src is rows x cols (row-major); dst gets it (or its transpose) zero-padded to the padded widths
    auto pad_matrix = [&](Buffer<T>& dst, const T* src, int64_t rows, int64_t cols, int64_t rows_p, int64_t cols_p,
                          bool transpose_it) {
      const int64_t ld = transpose_it ? rows_p : cols_p;
      dst.reset(rows_p * cols_p);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) dst[transpose_it ? c * ld + r : r * ld + c] = src[r * cols + c];
    };
    auto pad_vector = [&](Buffer<T>& dst, const T* src, int64_t n, int64_t np) {
      dst.reset(np);
      if (src)
        for (int64_t c = 0; c < n; ++c) dst[c] = src[c];
    };
    pad_matrix(W2, pr.W2, He, M, Hep, Mp, false);   // [Hep x Mp]
    pad_matrix(W2T, pr.W2, He, M, Hep, Mp, true);   // [Mp x Hep]
    pad_matrix(W3, pr.W3, M, Hx, Mp, Hxp, false);   // [Mp x Hxp]
    pad_matrix(W3T, pr.W3, M, Hx, Mp, Hxp, true);   // [Hxp x Mp]
    pad_vector(b2, pr.b2, M, Mp);
    pad_vector(b3, pr.b3, Hx, Hxp);
    pad_vector(w4, pr.w4, Hx, Hxp);
    pad_vector(wd, pr.w_d, He, Hep);
    pad_vector(watt, pr.w_att, M, Mp);
    if constexpr (kAmxCapable<T>) {
      if (pr.amx) {
        amx = true;
        W2p.reset(Hep * Mp);
        W3p.reset(Mp * Hxp);
        amx::pack_b_vnni(W2.get(), Hep, Mp, Mp, W2p.get());
        amx::pack_b_vnni(W3.get(), Mp, Hxp, Hxp, W3p.get());
        W2Tp.reset(Mp * Hep);
        W3Tp.reset(Hxp * Mp);
        amx::pack_b_vnni(W2T.get(), Mp, Hep, Hep, W2Tp.get());
        amx::pack_b_vnni(W3T.get(), Hxp, Mp, Mp, W3Tp.get());
        b2rows.reset(16 * Mp);
        b3rows.reset(16 * Hxp);
        amx::bias_rows(b2.get(), Mp, b2rows.get());
        amx::bias_rows(b3.get(), Hxp, b3rows.get());
      }
    }
    if (E > 0) {
      We.reset(E * Hep);
      WeT.reset(Hep * Ep);
      for (int64_t e = 0; e < E; ++e)
        for (int64_t c = 0; c < He; ++c) {
          We[e * Hep + c] = pr.W_e[e * He + c];
          WeT[c * Ep + e] = pr.W_e[e * He + c];
        }
    }
    if (pr.K >= 0) {
      const int64_t R = 2 * pr.K + 1;
      rel.reset(R * Hep);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t c = 0; c < He; ++c) rel[r * Hep + c] = pr.rel[r * He + c];
    }
    const int64_t nodes = pr.B * pr.N;
    P.reset(nodes * Hep);
    Q.reset(nodes * Hep);
    for (int64_t n = 0; n < nodes; ++n)
      for (int64_t c = 0; c < He; ++c) {
        P[n * Hep + c] = pr.p[n * He + c];
        Q[n * Hep + c] = pr.q[n * He + c];
      }
  }
};

// Per-thread scratch for one tile of up to kMaxRows pairs.
template <typename T>
struct Scratch {
  Buffer<T> Z, A, Y, M0, MG, S, SZ, SY, SS, G1, G2, G3, Erow, dE;  // SZ, SY, SS: sigmoid(z), sigmoid(y), sigmoid(s)
  Buffer<std::uint16_t> Abf, AT, Bv;  // bf16 operands (EgnnProblem::amx): rows, transposed rows, pair-interleaved
  // per pair; sized to the padded rows (loops such as the gate's run over rows_padded)
  int64_t ii[kScratchRows], jj[kScratchRows];  // pair -> (row of the i-block, node j)
  T d[kScratchRows][3], d2[kScratchRows], gate[kScratchRows], psi[kScratchRows];
  int64_t rows = 0, rows_padded = 0;

  Scratch(const Packed<T>& pk, bool backward) {
    const int64_t ne = kScratchRows * pk.Hep, nm = kScratchRows * pk.Mp, nx = kScratchRows * pk.Hxp;
    Z.reset(ne), A.reset(ne), SZ.reset(ne);
    Y.reset(nm), M0.reset(nm), MG.reset(nm), SY.reset(nm);
    S.reset(nx), SS.reset(nx);
    if (pk.E > 0) Erow.reset(kScratchRows * pk.Er);  // rows padded to Er columns (zeros) for the dW_e product
    if (pk.amx) {
      const int64_t widest = kScratchRows * (pk.Hep > pk.Mp ? (pk.Hep > pk.Hxp ? pk.Hep : pk.Hxp)
                                                            : (pk.Mp > pk.Hxp ? pk.Mp : pk.Hxp));
      Abf.reset(2 * widest);  // hi and lo rows (pair_product's hi_lo)
      if (backward) AT.reset(widest), Bv.reset(widest);
    }
    if (backward) {
      G1.reset(nx), G2.reset(nm), G3.reset(ne);  // dS, dM (then dY), dZ
      if (pk.E > 0) dE.reset(kScratchRows * pk.Ep);
    }
  }
};

template <typename T>
inline bool is_real(const EgnnProblem<T>& pr, int64_t b, int64_t i) {
  return pr.mask == nullptr || pr.mask[b * pr.N + i] != 0;
}

template <typename T>
T coord_scale(const EgnnProblem<T>& pr, int64_t b) {
  if (!pr.mean_agg) return T(1);
  int64_t n = 0;
  for (int64_t i = 0; i < pr.N; ++i) n += is_real(pr, b, i);
  return T(1) / T(n > 1 ? n - 1 : 1);
}

// The pairs of tile (i0.., j0..) that count, compacted; returns false when there are none.
template <typename T>
bool gather_pairs(const EgnnProblem<T>& pr, Scratch<T>& s, int64_t b, int64_t i0, int64_t bi, int64_t j0,
                  int64_t bj) {
  int64_t rows = 0;
  for (int64_t a = 0; a < bi; ++a) {
    const int64_t i = i0 + a;
    if (!is_real(pr, b, i)) continue;
    for (int64_t c = 0; c < bj; ++c) {
      const int64_t j = j0 + c;
      if (j == i || !is_real(pr, b, j)) continue;
      s.ii[rows] = a;
      s.jj[rows] = j;
      ++rows;
    }
  }
  s.rows = rows;
  s.rows_padded = round_up(rows, Tiles<T>::kMR);
  return rows > 0;
}

// dst = silu(src) = src * sigmoid(src); the sigmoid is kept for the backward.
template <typename T>
inline void silu_rows(const T* src, T* dst, T* sig, int64_t n) {
  using V = Vec<T>;
  constexpr int L = Tiles<T>::kLanes;
  for (int64_t k = 0; k < n; k += L) {
    const V v = simd::load(src + k);
    const V sg = simd::vsigmoid<T>(v);
    simd::store(sig + k, sg);
    simd::store(dst + k, v * sg);
  }
}

// grad *= d silu(v) / dv = sigmoid(v) (1 + v (1 - sigmoid(v))), from the kept sigmoid.
template <typename T>
inline void silu_backward_rows(const T* pre, const T* sig, T* grad, int64_t n) {
  using V = Vec<T>;
  constexpr int L = Tiles<T>::kLanes;
  for (int64_t k = 0; k < n; k += L) {
    const V v = simd::load(pre + k);
    const V sg = simd::load(sig + k);
    simd::store(grad + k, simd::load(grad + k) * (sg * (T(1) + v * (T(1) - sg))));
  }
}

template <typename T>
inline T dot_rows(const T* a, const T* b, int64_t n) {
  using V = Vec<T>;
  constexpr int L = Tiles<T>::kLanes;
  V acc = V{};
  for (int64_t k = 0; k < n; k += L) acc += simd::load(a + k) * simd::load(b + k);
  return simd::hsum<T>(acc);
}


// m_ij of the tile's rows: the gated copy with attention, else m0 itself.
template <typename T>
inline const T* messages(const EgnnProblem<T>& pr, const Scratch<T>& s) {
  return pr.w_att ? s.MG.get() : s.M0.get();
}

// dst = src W + bias (or dst += src W for a null bias) over the tile's rows_p rows
// ([rows_p, K] x [K, Nc], both padded widths): fp32 FMAs, or with EgnnProblem::amx bf16 operands on
// AMX (rows padded to 16 with zeros; dst has kMaxRows rows, those past rows_p are scratch). With
// hi_lo, src goes to AMX as bf16 hi + lo, src W = hi W + lo W: src to ~16 bits for twice the tile
// products (see tile_forward).
template <typename T>
inline void pair_product(const EgnnProblem<T>& pr, Scratch<T>& s, int64_t rows_p, int64_t K, int64_t Nc,
                         const T* src, const T* W, const std::uint16_t* Wp, const T* bias, const float* bias16,
                         T* dst, bool hi_lo = false) {
  if constexpr (kAmxCapable<T>) {
    if (pr.amx) {
      const int64_t rows16 = round_up(rows_p, 16);
      std::uint16_t* hi = s.Abf.get();
      std::uint16_t* lo = hi + rows16 * K;
      if (hi_lo) {
        amx::rows_to_bf16_hi_lo(src, K, rows_p, K, hi, lo, K);
        zero(lo + rows_p * K, (rows16 - rows_p) * K);
      } else {
        amx::rows_to_bf16(src, K, rows_p, K, hi, K);
      }
      zero(hi + rows_p * K, (rows16 - rows_p) * K);
      if (hi_lo)
        amx::gemm_bias_hi_lo(rows16, K, Nc, hi, lo, K, Wp, bias ? bias16 : nullptr, dst, Nc);
      else
        amx::gemm_bias(rows16, K, Nc, hi, K, Wp, bias ? bias16 : nullptr, dst, Nc);
      return;
    }
  }
  (void)hi_lo;
  (void)Wp;
  (void)bias16;
  gemm_acc<T>(rows_p, K, Nc, src, K, W, Nc, dst, Nc, bias);
}

// dW += act^T grad over the tile's rows_p pairs ([Ka, rows_p] x [rows_p, Ng]), the weight gradient
// of a per-pair product act W (W is Ka x Ng): fp32 FMAs, or with EgnnProblem::amx bf16 on AMX (the
// pair dimension padded to 32 with zeros).
template <typename T>
inline void weight_grad_product(const EgnnProblem<T>& pr, Scratch<T>& s, int64_t rows_p, int64_t Ka, int64_t Ng,
                                const T* act, const T* grad, T* dW) {
  if constexpr (kAmxCapable<T>) {
    if (pr.amx) {
      const int64_t rows32 = round_up(rows_p, 32);
      amx::transpose_to_bf16(act, Ka, rows_p, rows32, Ka, s.AT.get());
      amx::rows_to_vnni(grad, Ng, rows_p, rows32, Ng, s.Bv.get());
      amx::gemm_bias(Ka, rows32, Ng, s.AT.get(), rows32, s.Bv.get(), nullptr, dW, Ng);
      return;
    }
  }
  gemm_acc<T, true>(Ka, rows_p, Ng, act, Ka, grad, Ng, dW, Ng);
}

// Forward over the gathered pairs of one tile: fills Z, A, Y, M0, MG (with attention), S, the
// kept sigmoids, d, d2, gate, psi.
//
// On AMX, a and m go into y = a W2 + b2 and s = m W3 + b3 as bf16 hi + lo where a bend reads the
// result: silu'(y), silu'(s) in the backward, the attention gate sigmoid(m0 . w_att + b_att) in both.
// Where silu saturates (|z| in the thousands: coordinates ~100, p, q ~50) a and m are that large
// while a few columns of y or s cancel to O(10), and one bf16 rounding of a or m (2^-9 relative)
// moves such a column by more than the bend's width: b2's gradient came out at 4x, q's at 3x, m_i
// (through the gate) at 3.7x the bf16 reference's error. Elsewhere the forward keeps one bf16
// operand: silu(y), silu(s) move only by those columns' small absolute error, a sliver of m_i's and
// dx_i's norms. The lo tiles reuse the weight's tiles (gemm_bias_hi_lo): within timing noise at
// H = 64, a few percent of a backward at H = 256.
template <typename T>
void tile_forward(const EgnnProblem<T>& pr, const Packed<T>& pk, Scratch<T>& s, int64_t b, int64_t i0,
                  bool for_backward = false) {
  using V = Vec<T>;
  constexpr int L = Tiles<T>::kLanes;
  const int64_t Hep = pk.Hep, Mp = pk.Mp, Hxp = pk.Hxp, rows = s.rows, rows_p = s.rows_padded, N = pr.N;
  const int64_t Kt = pr.K;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + s.ii[r], j = s.jj[r];
    const T* xi = pr.x + (b * N + i) * 3;
    const T* xj = pr.x + (b * N + j) * 3;
    T dist2 = 0;
    for (int c = 0; c < 3; ++c) {
      s.d[r][c] = xi[c] - xj[c];
      dist2 += s.d[r][c] * s.d[r][c];
    }
    s.d2[r] = dist2;
    const T* pi = pk.P.get() + (b * N + i) * Hep;
    const T* qj = pk.Q.get() + (b * N + j) * Hep;
    T* z = s.Z.get() + r * Hep;
    const V vd2 = simd::splat(dist2);
    if (Kt >= 0) {
      const T* e = pk.rel.get() + (clip64(j - i, -Kt, Kt) + Kt) * Hep;
      for (int64_t k = 0; k < Hep; k += L)
        simd::store(z + k, simd::load(pi + k) + simd::load(qj + k) + vd2 * simd::load(pk.wd.get() + k) +
                               simd::load(e + k));
    } else {
      for (int64_t k = 0; k < Hep; k += L)
        simd::store(z + k, simd::load(pi + k) + simd::load(qj + k) + vd2 * simd::load(pk.wd.get() + k));
    }
    if (pk.E > 0)
      std::memcpy(s.Erow.get() + r * pk.Er, pr.edge_attr + ((b * N + i) * N + j) * pk.E,
                  static_cast<size_t>(pk.E) * sizeof(T));
  }
  zero(s.Z.get() + rows * Hep, (rows_p - rows) * Hep);
  if (pk.E > 0) {
    zero(s.Erow.get() + rows * pk.Er, (rows_p - rows) * pk.Er);
    gemm_acc<T>(rows_p, pk.E, Hep, s.Erow.get(), pk.Er, pk.We.get(), Hep, s.Z.get(), Hep);  // z += e_ij W_e
  }
  silu_rows(s.Z.get(), s.A.get(), s.SZ.get(), rows_p * Hep);  // a = silu(z)
  pair_product(pr, s, rows_p, Hep, Mp, s.A.get(), pk.W2.get(), pk.W2p.get(), pk.b2.get(), pk.b2rows.get(),
               s.Y.get(), for_backward || pr.w_att != nullptr);  // y = a W2 + b2
  silu_rows(s.Y.get(), s.M0.get(), s.SY.get(), rows_p * Mp);  // m0 = silu(y)
  T* m = s.M0.get();  // without attention m_ij = m0_ij: MG is not used
  if (pr.w_att) {
    m = s.MG.get();
    for (int64_t r = 0; r < rows_p; ++r) {
      const T logit = dot_rows(s.M0.get() + r * Mp, pk.watt.get(), Mp) + pr.b_att;
      const T g = T(1) / (T(1) + std::exp(-logit));
      s.gate[r] = g;
      const V vg = simd::splat(g);
      for (int64_t k = 0; k < Mp; k += L) simd::store(m + r * Mp + k, simd::load(s.M0.get() + r * Mp + k) * vg);
    }
  }
  pair_product(pr, s, rows_p, Mp, Hxp, m, pk.W3.get(), pk.W3p.get(), pk.b3.get(), pk.b3rows.get(),
               s.S.get(), for_backward);  // s = m W3 + b3
  for (int64_t r = 0; r < rows; ++r) {
    const T* sr = s.S.get() + r * Hxp;
    T* ss = s.SS.get() + r * Hxp;
    V acc = V{};
    for (int64_t k = 0; k < Hxp; k += L) {
      const V v = simd::load(sr + k);
      const V sg = simd::vsigmoid<T>(v);
      simd::store(ss + k, sg);
      acc += v * sg * simd::load(pk.w4.get() + k);
    }
    const T phi = simd::hsum<T>(acc);
    s.psi[r] = pr.use_tanh ? std::tanh(phi) : phi;
  }
}

// The coordinate direction u_ij = s(d2) (x_i - x_j): s = 1, 1 / (stopgrad |x_i - x_j| + eps)
// (normalize 1), or 1 / max(|x_i - x_j|, eps) (normalize 2, egnn-pytorch's CoorsNorm).
template <typename T>
inline T direction_scale(const EgnnProblem<T>& pr, T d2) {
  if (pr.normalize == 1) return T(1) / (std::sqrt(d2) + pr.eps);
  if (pr.normalize == 2) return T(1) / (std::sqrt(d2) > pr.eps ? std::sqrt(d2) : pr.eps);
  return T(1);
}

// ds/dd2: nonzero only for normalize 2 above eps (-1/2 d2^(-3/2)); normalize 1 stops the gradient.
template <typename T>
inline T direction_scale_grad(const EgnnProblem<T>& pr, T d2) {
  if (pr.normalize != 2) return T(0);
  const T r = std::sqrt(d2);
  return r > pr.eps ? T(-0.5) / (d2 * r) : T(0);
}

template <typename T>
void egnn_forward(const EgnnProblem<T>& pr, T* m_out, T* dx_out) {
  constexpr int L = Tiles<T>::kLanes;
  const Packed<T> pk(pr);
  const int64_t B = pr.B, N = pr.N, M = pr.M, Mp = pk.Mp;
  const int64_t n_iblocks = (N + BI - 1) / BI, n_jblocks = (N + BJ - 1) / BJ;
#pragma omp parallel
  {
    FlushDenormals ftz;
    Scratch<T> s(pk, false);
    Buffer<T> m_acc(BI * Mp);
    T dx_acc[BI][3];
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < B * n_iblocks; ++task) {
      const int64_t b = task / n_iblocks, i0 = (task % n_iblocks) * BI, bi = min64(BI, N - i0);
      zero(m_acc.get(), BI * Mp);
      for (int a = 0; a < BI; ++a) dx_acc[a][0] = dx_acc[a][1] = dx_acc[a][2] = 0;
      for (int64_t jb = 0; jb < n_jblocks; ++jb) {
        const int64_t j0 = jb * BJ;
        if (!gather_pairs(pr, s, b, i0, bi, j0, min64(BJ, N - j0))) continue;
        tile_forward(pr, pk, s, b, i0);
        for (int64_t r = 0; r < s.rows; ++r) {
          T* acc = m_acc.get() + s.ii[r] * Mp;
          const T* m = messages(pr, s) + r * Mp;
          for (int64_t k = 0; k < Mp; k += L) simd::store(acc + k, simd::load(acc + k) + simd::load(m + k));
          const T w = s.psi[r] * direction_scale(pr, s.d2[r]);
          for (int c = 0; c < 3; ++c) dx_acc[s.ii[r]][c] += w * s.d[r][c];
        }
      }
      const T C = coord_scale(pr, b);
      for (int64_t a = 0; a < bi; ++a) {
        const int64_t i = i0 + a;
        std::memcpy(m_out + (b * N + i) * M, m_acc.get() + a * Mp, static_cast<size_t>(M) * sizeof(T));
        for (int c = 0; c < 3; ++c) dx_out[(b * N + i) * 3 + c] = C * dx_acc[a][c];
      }
    }
  }
}

// Number of i-block groups per sample in the backward: a function of B and N only, so the
// summation order (and the result) does not depend on the thread count.
inline int64_t backward_groups(int64_t B, int64_t n_iblocks) {
  const int64_t want = B > 0 ? (16 + B - 1) / B : 1;  // B = 0: no tasks either way
  return want < n_iblocks ? want : n_iblocks;
}

template <typename T>
void egnn_backward(const EgnnProblem<T>& pr, const T* grad_m, const T* grad_dx, const EgnnGrads<T>& out) {
  using V = Vec<T>;
  constexpr int L = Tiles<T>::kLanes;
  const Packed<T> pk(pr);
  const int64_t B = pr.B, N = pr.N, He = pr.He, M = pr.M, Hx = pr.Hx, Hep = pk.Hep, Mp = pk.Mp, Hxp = pk.Hxp;
  const int64_t E = pk.E;
  const int64_t n_iblocks = (N + BI - 1) / BI, n_jblocks = (N + BJ - 1) / BJ;
  const int64_t G = backward_groups(B, n_iblocks), tasks = B * G;
  // offsets j - i lie in [-(N-1), N-1]; after clipping to [-K, K] they touch rows [K - Kt, K + Kt]
  const int64_t Kt = pr.K >= 0 ? min64(pr.K, N - 1) : -1, R = 2 * Kt + 1;
  // Each task accumulates its j-side node gradients (q, x), offset-table and weight gradients in a
  // partial buffer; the partials are folded into running sums in task order (the same order for
  // any thread count, so the same bits), as soon as every earlier task is folded. A task may start
  // only while it is fewer than `slots` tasks ahead of the fold, so at most `slots` partials exist.
  // weight gradients: dW2 [Hep x Mp], dW3 [Mp x Hxp], db2 (Mp), db3 (Hxp), dw4 (Hxp), dw_d (Hep),
  // dw_att (Mp), db_att (1), dW_e [Er x Hep]
  const int64_t wsize = Hep * Mp + Mp * Hxp + 2 * Mp + 2 * Hxp + Hep + 1 + (E > 0 ? pk.Er * Hep : 0);
  const int64_t rel_size = pr.K >= 0 ? R * Hep : 0;
  const int64_t part_size = round_up(N * Hep + rel_size + wsize + N * 3, 16);
  const int64_t slots = min64(tasks, 2 * max_threads_here());
  const int64_t sums_size = round_up(B * N * Hep + rel_size + wsize + B * N * 3, 16);
  thread_local Workspace<T> workspace;
  T* const sum_q = workspace.get(sums_size + slots * part_size);
  T* const sum_rel = sum_q + B * N * Hep;
  T* const sum_w = sum_rel + rel_size;
  T* const sum_x = sum_w + wsize;
  T* const pool = sum_q + sums_size;
  zero(sum_q, sums_size);
  Buffer<int64_t> free_slots(slots), done_slot(tasks);
  for (int64_t k = 0; k < slots; ++k) free_slots[k] = k;
  for (int64_t k = 0; k < tasks; ++k) done_slot[k] = -1;
  int64_t n_free = slots, next_fold = 0;
  auto add_into = [](T* dst, const T* src, int64_t n) {
    for (int64_t k = 0; k < n; ++k) dst[k] += src[k];
  };
  auto fold = [&](int64_t task, const T* part) {
    const int64_t b = task / G;
    add_into(sum_q + b * N * Hep, part, N * Hep);
    add_into(sum_rel, part + N * Hep, rel_size);
    add_into(sum_w, part + N * Hep + rel_size, wsize);
    add_into(sum_x + b * N * 3, part + N * Hep + rel_size + wsize, N * 3);
  };
  zero(out.p, B * N * He);
  if (out.edge_attr) zero(out.edge_attr, B * N * N * E);

#pragma omp parallel
  {
    FlushDenormals ftz;
    Scratch<T> s(pk, true);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / G, g = task % G;
      int64_t slot = -1;
      while (slot < 0) {  // the task that the fold waits for is always inside the window: no deadlock
#pragma omp critical(protdiff_egnn_partials)
        {
          if (task < next_fold + slots) slot = free_slots[--n_free];
        }
        if (slot < 0) cpu_relax();
      }
      T* pq = pool + slot * part_size;
      zero(pq, part_size);
      T* prel = pr.K >= 0 ? pq + N * Hep : nullptr;
      T* pw = pq + N * Hep + rel_size;
      T* px = pw + wsize;
      T *dW2 = pw, *dW3 = dW2 + Hep * Mp, *db2 = dW3 + Mp * Hxp, *db3 = db2 + Mp, *dw4 = db3 + Hxp,
        *dwd = dw4 + Hxp, *dwatt = dwd + Hep, *dbatt = dwatt + Mp, *dWe = dbatt + 1;
      const T C = coord_scale(pr, b);
      for (int64_t ib = g * n_iblocks / G; ib < (g + 1) * n_iblocks / G; ++ib) {
        const int64_t i0 = ib * BI, bi = min64(BI, N - i0);
        for (int64_t jb = 0; jb < n_jblocks; ++jb) {
          const int64_t j0 = jb * BJ;
          if (!gather_pairs(pr, s, b, i0, bi, j0, min64(BJ, N - j0))) continue;
          tile_forward(pr, pk, s, b, i0, true);
          const int64_t rows = s.rows, rows_p = s.rows_padded;
          T* dS = s.G1.get();
          // psi -> phi -> s:  dS = dphi * w4 * silu'(s);  dw4 += dphi * silu(s);  db3 += dS
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = i0 + s.ii[r];
            const T* gx = grad_dx + (b * N + i) * 3;
            const T scale = direction_scale(pr, s.d2[r]);
            const T dpsi = C * scale * (gx[0] * s.d[r][0] + gx[1] * s.d[r][1] + gx[2] * s.d[r][2]);
            const T dphi = pr.use_tanh ? dpsi * (T(1) - s.psi[r] * s.psi[r]) : dpsi;
            const V vdphi = simd::splat(dphi);
            const T* sr = s.S.get() + r * Hxp;
            const T* ss = s.SS.get() + r * Hxp;
            T* dsr = dS + r * Hxp;
            for (int64_t k = 0; k < Hxp; k += L) {
              const V v = simd::load(sr + k);
              const V sg = simd::load(ss + k);
              const V w4 = simd::load(pk.w4.get() + k);
              simd::store(dw4 + k, simd::load(dw4 + k) + vdphi * v * sg);
              const V ds = vdphi * w4 * (sg * (T(1) + v * (T(1) - sg)));
              simd::store(dsr + k, ds);
              simd::store(db3 + k, simd::load(db3 + k) + ds);
            }
          }
          zero(dS + rows * Hxp, (rows_p - rows) * Hxp);
          // dW3 += m^T dS
          weight_grad_product<T>(pr, s, rows_p, Mp, Hxp, messages(pr, s), dS, dW3);
          // dm = grad_m_i + dS W3^T
          T* dM = s.G2.get();
          for (int64_t r = 0; r < rows; ++r) {
            const T* gm = grad_m + (b * N + i0 + s.ii[r]) * M;
            std::memcpy(dM + r * Mp, gm, static_cast<size_t>(M) * sizeof(T));
            zero(dM + r * Mp + M, Mp - M);
          }
          zero(dM + rows * Mp, (rows_p - rows) * Mp);
          pair_product<T>(pr, s, rows_p, Hxp, Mp, dS, pk.W3T.get(), pk.W3Tp.get(), nullptr, nullptr,
                          dM);  // dM += dS W3^T
          // attention: m = g m0  ->  dm0 = g dm + g (1 - g) (dm . m0) w_att
          if (pr.w_att) {
            for (int64_t r = 0; r < rows; ++r) {
              T* dmr = dM + r * Mp;
              const T* m0 = s.M0.get() + r * Mp;
              const T gt = s.gate[r];
              const T coef = dot_rows(dmr, m0, Mp) * gt * (T(1) - gt);
              dbatt[0] += coef;
              const V vc = simd::splat(coef), vg = simd::splat(gt);
              for (int64_t k = 0; k < Mp; k += L) {
                simd::store(dwatt + k, simd::load(dwatt + k) + vc * simd::load(m0 + k));
                simd::store(dmr + k, simd::load(dmr + k) * vg + vc * simd::load(pk.watt.get() + k));
              }
            }
          }
          // dy = dm0 * silu'(y);  db2 += dy;  dW2 += a^T dy;  da = dy W2^T
          T* dY = dM;
          silu_backward_rows(s.Y.get(), s.SY.get(), dY, rows_p * Mp);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t k = 0; k < Mp; k += L)
              simd::store(db2 + k, simd::load(db2 + k) + simd::load(dY + r * Mp + k));
          weight_grad_product<T>(pr, s, rows_p, Hep, Mp, s.A.get(), dY, dW2);
          T* dZ = s.G3.get();
          zero(dZ, rows_p * Hep);
          pair_product<T>(pr, s, rows_p, Mp, Hep, dY, pk.W2T.get(), pk.W2Tp.get(), nullptr, nullptr,
                          dZ);  // dZ = dY W2^T
          silu_backward_rows(s.Z.get(), s.SZ.get(), dZ, rows_p * Hep);  // dz = da * silu'(z)
          // z = p_i + q_j + w_d d2 + e:  dp_i, dq_j, dw_d, the edge term, and x through d2 and u
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = i0 + s.ii[r], j = s.jj[r];
            const T* dz = dZ + r * Hep;
            T* dp = out.p + (b * N + i) * He;
            for (int64_t k = 0; k < He; ++k) dp[k] += dz[k];
            T* dq = pq + j * Hep;
            const V vd2 = simd::splat(s.d2[r]);
            for (int64_t k = 0; k < Hep; k += L) {
              const V v = simd::load(dz + k);
              simd::store(dq + k, simd::load(dq + k) + v);
              simd::store(dwd + k, simd::load(dwd + k) + v * vd2);
            }
            if (prel) {
              T* dr = prel + (clip64(j - i, -pr.K, pr.K) + Kt) * Hep;
              for (int64_t k = 0; k < Hep; k += L) simd::store(dr + k, simd::load(dr + k) + simd::load(dz + k));
            }
            const T* gx = grad_dx + (b * N + i) * 3;
            const T gxd = gx[0] * s.d[r][0] + gx[1] * s.d[r][1] + gx[2] * s.d[r][2];
            // d2 enters z (through w_d) and, for normalize 2, the direction scale s(d2)
            const T dd2 = dot_rows(dz, pk.wd.get(), Hep) + C * s.psi[r] * gxd * direction_scale_grad(pr, s.d2[r]);
            const T du = C * s.psi[r] * direction_scale(pr, s.d2[r]);
            for (int c = 0; c < 3; ++c) {
              const T gc = T(2) * dd2 * s.d[r][c] + du * gx[c];
              px[i * 3 + c] += gc;
              px[j * 3 + c] -= gc;
            }
          }
          if (E > 0) {
            // e = edge_attr W_e:  d edge_attr = dz W_e^T;  dW_e += edge_attr^T dz
            gemm_acc<T, true>(pk.Er, rows_p, Hep, s.Erow.get(), pk.Er, dZ, Hep, dWe, Hep);
            if (out.edge_attr) {
              zero(s.dE.get(), rows_p * pk.Ep);
              gemm_acc<T>(rows_p, Hep, pk.Ep, dZ, Hep, pk.WeT.get(), pk.Ep, s.dE.get(), pk.Ep);
              for (int64_t r = 0; r < rows; ++r) {
                const int64_t i = i0 + s.ii[r], j = s.jj[r];
                std::memcpy(out.edge_attr + ((b * N + i) * N + j) * E, s.dE.get() + r * pk.Ep,
                            static_cast<size_t>(E) * sizeof(T));
              }
            }
          }
        }
      }
#pragma omp critical(protdiff_egnn_partials)
      {
        done_slot[task] = slot;
        while (next_fold < tasks && done_slot[next_fold] >= 0) {
          fold(next_fold, pool + done_slot[next_fold] * part_size);
          free_slots[n_free++] = done_slot[next_fold];
          ++next_fold;
        }
      }
    }
  }

  for (int64_t n = 0; n < B * N; ++n) {
    std::memcpy(out.q + n * He, sum_q + n * Hep, static_cast<size_t>(He) * sizeof(T));
    for (int c = 0; c < 3; ++c) out.x[n * 3 + c] = sum_x[n * 3 + c];
  }
  const T *dW2 = sum_w, *dW3 = dW2 + Hep * Mp, *db2 = dW3 + Mp * Hxp, *db3 = db2 + Mp, *dw4 = db3 + Hxp,
          *dwd = dw4 + Hxp, *dwatt = dwd + Hep, *dbatt = dwatt + Mp, *dWe = dbatt + 1;
  for (int64_t r = 0; r < He; ++r)
    for (int64_t c = 0; c < M; ++c) out.W2[r * M + c] = dW2[r * Mp + c];
  for (int64_t r = 0; r < M; ++r)
    for (int64_t c = 0; c < Hx; ++c) out.W3[r * Hx + c] = dW3[r * Hxp + c];
  for (int64_t k = 0; k < M; ++k) {
    out.b2[k] = db2[k];
    if (out.w_att) out.w_att[k] = dwatt[k];
  }
  for (int64_t k = 0; k < Hx; ++k) {
    out.b3[k] = db3[k];
    out.w4[k] = dw4[k];
  }
  for (int64_t k = 0; k < He; ++k) out.w_d[k] = dwd[k];
  if (out.b_att) out.b_att[0] = dbatt[0];
  if (E > 0 && out.W_e)
    for (int64_t e = 0; e < E; ++e)
      for (int64_t k = 0; k < He; ++k) out.W_e[e * He + k] = dWe[e * Hep + k];
  if (pr.K >= 0 && out.rel) {
    zero(out.rel, (2 * pr.K + 1) * He);
    for (int64_t r = 0; r < R; ++r)
      std::memcpy(out.rel + (pr.K - Kt + r) * He, sum_rel + r * Hep, static_cast<size_t>(He) * sizeof(T));
  }
}

template void egnn_forward<float>(const EgnnProblem<float>&, float*, float*);
template void egnn_forward<double>(const EgnnProblem<double>&, double*, double*);
template void egnn_backward<float>(const EgnnProblem<float>&, const float*, const float*, const EgnnGrads<float>&);
template void egnn_backward<double>(const EgnnProblem<double>&, const double*, const double*,
                                   const EgnnGrads<double>&);

}  // namespace PROTDIFF_ISA
}  // namespace protdiff
