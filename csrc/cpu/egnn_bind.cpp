// Buffer checks and ISA dispatch for the fused EGNN op. The kernels are in egnn_cpu.cpp.
#include "cpu/egnn_bind.h"

#include "cpu/amx_gemm.h"
#include "cpu/egnn_cpu.h"

#include <type_traits>

namespace protdiff {

namespace {
std::int64_t g_workspace_bytes = 0;  // __atomic builtins: egnn_cpu.cpp's builds use no std:: templates
}  // namespace

void workspace_bytes_add(std::int64_t delta) { __atomic_fetch_add(&g_workspace_bytes, delta, __ATOMIC_RELAXED); }
std::int64_t workspace_bytes() { return __atomic_load_n(&g_workspace_bytes, __ATOMIC_RELAXED); }

namespace {

enum class Isa { base = 0, avx2 = 1, avx512 = 2 };

Isa best_isa() {
#ifdef PROTDIFF_X86_ISAS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::base;
}

Isa& current_isa() {
  static Isa isa = best_isa();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "base";
  }
}

template <typename T>
const T* opt_ptr(const OptArray<T>& a) {
  return a ? a->data() : nullptr;
}

template <typename T>
T* opt_mut(OptArray<T>& a, const char* name) {
  return a ? writable_data(*a, name) : nullptr;
}

// Check every buffer against the sizes the kernels will index, and fill the problem struct.
template <typename T>
EgnnProblem<T> make_problem(const CArray<T>& x, const CArray<T>& p, const CArray<T>& q, const CArray<T>& w_d,
                            const CArray<T>& W2, const CArray<T>& b2, const CArray<T>& W3, const CArray<T>& b3,
                            const CArray<T>& w4, const OptArray<T>& edge_attr, const OptArray<T>& W_e,
                            const OptArray<T>& rel, const OptArray<T>& w_att, double b_att,
                            const OptArray<std::uint8_t>& mask, int normalize, bool use_tanh, bool mean_agg,
                            double eps) {
  check_shape(x, "x", {-1, -1, 3});
  EgnnProblem<T> pr;
  pr.B = x.shape(0);
  pr.N = x.shape(1);
  check_shape(p, "p", {pr.B, pr.N, -1});
  check_shape(W2, "W2", {p.shape(2), -1});
  check_shape(W3, "W3", {W2.shape(1), -1});
  pr.He = p.shape(2), pr.M = W2.shape(1), pr.Hx = W3.shape(1);
  const auto B = pr.B, N = pr.N, He = pr.He, M = pr.M, Hx = pr.Hx;
  check_shape(q, "q", {B, N, He});
  check_shape(w_d, "w_d", {He});
  check_shape(b2, "b2", {M});
  check_shape(b3, "b3", {Hx});
  check_shape(w4, "w4", {Hx});
  if (edge_attr.has_value() != W_e.has_value())
    throw std::invalid_argument("edge_attr and W_e come together");
  if (edge_attr && rel) throw std::invalid_argument("give at most one edge term: edge_attr or rel");
  if (edge_attr) {
    check_shape(*edge_attr, "edge_attr", {B, N, N, -1});
    pr.E = edge_attr->shape(3);
    check_shape(*W_e, "W_e", {pr.E, He});
    pr.edge_attr = edge_attr->data();
    pr.W_e = W_e->data();
  }
  if (rel) {
    check_shape(*rel, "rel", {-1, He});
    if (rel->shape(0) % 2 != 1) throw std::invalid_argument("rel: expected 2K + 1 rows");
    pr.K = rel->shape(0) / 2;
    pr.rel = rel->data();
  }
  if (w_att) {
    check_shape(*w_att, "w_att", {M});
    pr.w_att = w_att->data();
    pr.b_att = static_cast<T>(b_att);
  }
  if (mask) {
    check_shape(*mask, "mask", {B, N});
    pr.mask = mask->data();
  }
  if (!(eps > 0)) throw std::invalid_argument("eps must be > 0");
  if (normalize < 0 || normalize > 2) throw std::invalid_argument("normalize must be 0, 1 or 2");
  pr.x = x.data(), pr.p = p.data(), pr.q = q.data(), pr.w_d = w_d.data(), pr.W2 = W2.data(), pr.b2 = b2.data();
  pr.W3 = W3.data(), pr.b3 = b3.data(), pr.w4 = w4.data();
  pr.normalize = normalize, pr.use_tanh = use_tanh, pr.mean_agg = mean_agg, pr.eps = static_cast<T>(eps);
  return pr;
}

template <typename T>
void enable_amx(EgnnProblem<T>& pr, bool amx) {
  if (!amx) return;
  if (!std::is_same<T, float>::value) throw std::invalid_argument("amx: the AMX products take float32 buffers");
  if (current_isa() != Isa::avx512)
    throw std::invalid_argument(std::string("amx: needs the avx512 kernels (running: ") + isa_name(current_isa()) + ")");
  if (!amx::available()) throw std::invalid_argument(std::string("amx: ") + amx::unavailable_reason());
  pr.amx = true;
}

}  // namespace

std::string simd_isa() { return isa_name(current_isa()); }

bool amx_available() { return amx::available(); }
std::string amx_unavailable_reason() { return amx::unavailable_reason(); }

std::string supported_isas() {
  std::string s;
  for (int k = 0; k <= static_cast<int>(best_isa()); ++k) s += std::string(k ? "," : "") + isa_name(Isa(k));
  return s;
}

void set_simd_isa(const std::string& name) {
  Isa want;
  if (name == "avx512") want = Isa::avx512;
  else if (name == "avx2") want = Isa::avx2;
  else if (name == "base") want = Isa::base;
  else throw std::invalid_argument("unknown instruction set '" + name + "' (avx512, avx2, base)");
  if (static_cast<int>(want) > static_cast<int>(best_isa()))
    throw std::invalid_argument("this CPU does not support '" + name + "' (supported: " + supported_isas() + ")");
  current_isa() = want;
}

template <typename T>
void egnn_forward_np(CArray<T> x, CArray<T> p, CArray<T> q, CArray<T> w_d, CArray<T> W2, CArray<T> b2,
                     CArray<T> W3, CArray<T> b3, CArray<T> w4, OptArray<T> edge_attr, OptArray<T> W_e,
                     OptArray<T> rel, OptArray<T> w_att, double b_att, OptArray<std::uint8_t> mask, int normalize,
                     bool use_tanh, bool mean_agg, double eps, CArray<T> m_out, CArray<T> dx_out, bool amx) {
  EgnnProblem<T> pr = make_problem(x, p, q, w_d, W2, b2, W3, b3, w4, edge_attr, W_e, rel, w_att, b_att, mask,
                                   normalize, use_tanh, mean_agg, eps);
  enable_amx(pr, amx);
  check_shape(m_out, "m_out", {pr.B, pr.N, pr.M});
  check_shape(dx_out, "dx_out", {pr.B, pr.N, 3});
  T* m = writable_data(m_out, "m_out");
  T* dx = writable_data(dx_out, "dx_out");
  py::gil_scoped_release no_gil;
  switch (current_isa()) {
#ifdef PROTDIFF_X86_ISAS
    case Isa::avx512: isa_avx512::egnn_forward(pr, m, dx); break;
    case Isa::avx2: isa_avx2::egnn_forward(pr, m, dx); break;
#endif
    default: isa_base::egnn_forward(pr, m, dx);
  }
}

template <typename T>
void egnn_backward_np(CArray<T> x, CArray<T> p, CArray<T> q, CArray<T> w_d, CArray<T> W2, CArray<T> b2,
                      CArray<T> W3, CArray<T> b3, CArray<T> w4, OptArray<T> edge_attr, OptArray<T> W_e,
                      OptArray<T> rel, OptArray<T> w_att, double b_att, OptArray<std::uint8_t> mask, int normalize,
                      bool use_tanh, bool mean_agg, double eps, CArray<T> grad_m, CArray<T> grad_dx,
                      CArray<T> d_x, CArray<T> d_p, CArray<T> d_q, CArray<T> d_w_d, CArray<T> d_W2,
                      CArray<T> d_b2, CArray<T> d_W3, CArray<T> d_b3, CArray<T> d_w4, OptArray<T> d_edge_attr,
                      OptArray<T> d_W_e, OptArray<T> d_rel, OptArray<T> d_w_att, OptArray<T> d_b_att, bool amx) {
  EgnnProblem<T> pr = make_problem(x, p, q, w_d, W2, b2, W3, b3, w4, edge_attr, W_e, rel, w_att, b_att, mask,
                                   normalize, use_tanh, mean_agg, eps);
  enable_amx(pr, amx);
  const auto B = pr.B, N = pr.N, He = pr.He, M = pr.M, Hx = pr.Hx;
  check_shape(grad_m, "grad_m", {B, N, M});
  check_shape(grad_dx, "grad_dx", {B, N, 3});
  check_shape(d_x, "d_x", {B, N, 3});
  check_shape(d_p, "d_p", {B, N, He});
  check_shape(d_q, "d_q", {B, N, He});
  check_shape(d_w_d, "d_w_d", {He});
  check_shape(d_b2, "d_b2", {M});
  check_shape(d_b3, "d_b3", {Hx});
  check_shape(d_w4, "d_w4", {Hx});
  check_shape(d_W2, "d_W2", {He, M});
  check_shape(d_W3, "d_W3", {M, Hx});
  if (d_edge_attr) check_shape(*d_edge_attr, "d_edge_attr", {B, N, N, pr.E});
  if (pr.E > 0 && !d_W_e) throw std::invalid_argument("d_W_e is required with a dense edge term");
  if (d_W_e) check_shape(*d_W_e, "d_W_e", {pr.E, He});
  if (pr.K >= 0 && !d_rel) throw std::invalid_argument("d_rel is required with an offset table");
  if (d_rel) check_shape(*d_rel, "d_rel", {2 * pr.K + 1, He});
  if (pr.w_att && (!d_w_att || !d_b_att)) throw std::invalid_argument("d_w_att and d_b_att are required with attention");
  if (d_w_att) check_shape(*d_w_att, "d_w_att", {M});
  if (d_b_att) check_shape(*d_b_att, "d_b_att", {1});
  EgnnGrads<T> g;
  g.x = writable_data(d_x, "d_x"), g.p = writable_data(d_p, "d_p"), g.q = writable_data(d_q, "d_q");
  g.w_d = writable_data(d_w_d, "d_w_d"), g.W2 = writable_data(d_W2, "d_W2"), g.b2 = writable_data(d_b2, "d_b2");
  g.W3 = writable_data(d_W3, "d_W3"), g.b3 = writable_data(d_b3, "d_b3"), g.w4 = writable_data(d_w4, "d_w4");
  g.edge_attr = opt_mut(d_edge_attr, "d_edge_attr"), g.W_e = opt_mut(d_W_e, "d_W_e");
  g.rel = opt_mut(d_rel, "d_rel"), g.w_att = opt_mut(d_w_att, "d_w_att"), g.b_att = opt_mut(d_b_att, "d_b_att");
  const T* gm = grad_m.data();
  const T* gdx = grad_dx.data();
  py::gil_scoped_release no_gil;
  switch (current_isa()) {
#ifdef PROTDIFF_X86_ISAS
    case Isa::avx512: isa_avx512::egnn_backward(pr, gm, gdx, g); break;
    case Isa::avx2: isa_avx2::egnn_backward(pr, gm, gdx, g); break;
#endif
    default: isa_base::egnn_backward(pr, gm, gdx, g);
  }
}

#define PROTDIFF_INSTANTIATE(T)                                                                                  \
  template void egnn_forward_np<T>(CArray<T>, CArray<T>, CArray<T>, CArray<T>, CArray<T>, CArray<T>, CArray<T>, \
                                   CArray<T>, CArray<T>, OptArray<T>, OptArray<T>, OptArray<T>, OptArray<T>,    \
                                   double, OptArray<std::uint8_t>, int, bool, bool, double, CArray<T>,          \
                                   CArray<T>, bool);                                                            \
  template void egnn_backward_np<T>(                                                                            \
      CArray<T>, CArray<T>, CArray<T>, CArray<T>, CArray<T>, CArray<T>, CArray<T>, CArray<T>, CArray<T>,       \
      OptArray<T>, OptArray<T>, OptArray<T>, OptArray<T>, double, OptArray<std::uint8_t>, int, bool, bool,       \
      double, CArray<T>, CArray<T>, CArray<T>, CArray<T>, CArray<T>, CArray<T>, CArray<T>, CArray<T>, CArray<T>, \
      CArray<T>, CArray<T>, OptArray<T>, OptArray<T>, OptArray<T>, OptArray<T>, OptArray<T>, bool);
PROTDIFF_INSTANTIATE(float)
PROTDIFF_INSTANTIATE(double)

}  // namespace protdiff
