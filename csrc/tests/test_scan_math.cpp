// C++ unit test of the scan's shared scalar math (gmamba/scan_math.h, gmamba/fast_exp.h), of the CPU lane
// sums (cpu/lane_transpose.h) and of the
// registered op gmamba_ext::selective_scan_fwd, called through the dispatcher as any C++ user would, against
// a naive sequential scan in double precision. Plain checks (no gtest); exits non-zero on any failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/lane_transpose.h"
#include "cpu/scan_cpu_chunk.h"  // softplus_and_grad
#include "cuda/scan_segments.cuh"  // plain C++: the CUDA forwards' segment plan
#include "gmamba/fast_exp.h"
#include "gmamba/scan_math.h"

namespace {

int failures = 0;

// Not assert(): Release builds define NDEBUG. (CHECK is taken by c10's logging.)
#define EXPECT(cond, ...)                                     \
  do {                                                       \
    if (!(cond)) {                                           \
      ++failures;                                            \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                     \
      std::fprintf(stderr, "\n");                            \
    }                                                        \
  } while (0)

// Central difference of f at v; step chosen for double precision.
template <typename F>
double numeric_grad(F f, double v) {
  const double h = 1e-6;
  return (f(v + h) - f(v - h)) / (2 * h);
}

void test_softplus_silu() {
  double worst_sp = 0, worst_silu = 0;
  for (double v = -30; v <= 30; v += 0.01) {
    // softplus switches to the identity at 20 (as torch does): skip the difference across the switch.
    if (std::abs(v - 20) > 1e-3) {
      const double fd = numeric_grad([](double x) { return gmamba::softplus(x); }, v);
      worst_sp = std::max(worst_sp, std::abs(fd - gmamba::softplus_grad(v)));
    }
    const double fd = numeric_grad([](double x) { return gmamba::silu(x); }, v);
    worst_silu = std::max(worst_silu, std::abs(fd - gmamba::silu_grad(v)));
  }
  EXPECT(worst_sp < 1e-7, "softplus_grad vs finite differences: max abs error %.3g", worst_sp);
  EXPECT(worst_silu < 1e-7, "silu_grad vs finite differences: max abs error %.3g", worst_silu);
  // softplus against its definition, and its float instantiation against double.
  for (double v : {-50.0, -5.0, -1e-3, 0.0, 0.7, 5.0, 19.9, 20.1, 60.0}) {
    const double want = v > 20 ? v : std::log1p(std::exp(v));
    EXPECT(std::abs(gmamba::softplus(v) - want) <= 1e-15 * std::max(1.0, std::abs(want)),
          "softplus(%g) = %.17g, want %.17g", v, gmamba::softplus(v), want);
    const float f = gmamba::softplus(static_cast<float>(v));
    EXPECT(std::abs(f - want) <= 2e-7 * std::max(1.0, std::abs(want)), "softplus<float>(%g) = %.9g, want %.9g",
          v, f, want);
  }
  EXPECT(gmamba::softplus_grad(25.0) == 1.0, "softplus_grad above the threshold must be 1");
  EXPECT(gmamba::discretize_delta(0.5, 0.25, false) == 0.75, "discretize_delta without softplus adds the bias");
  EXPECT(gmamba::discretize_delta_grad(0.5, 0.25, true, 2.0) == 2.0 * gmamba::sigmoid(0.75),
        "discretize_delta_grad with softplus");
  EXPECT(gmamba::scan_step(0.5, 2.0, 3.0) == 4.0, "scan_step(decay, state, dBu) = decay * state + dBu");
}

// Dense sweep of [lo, hi] (20M + 1 points) of approx against the correctly rounded double exact: the
// largest relative error, printed, checked below 2e-7.
template <typename Approx, typename Exact>
void check_sweep(const char* name, Approx approx, Exact exact, double lo, double hi) {
  double worst = 0;
  float worst_x = 0;
  const int steps = 20'000'000;
  for (int i = 0; i <= steps; ++i) {
    const float x = static_cast<float>(lo + (hi - lo) * i / steps);
    const double want = exact(static_cast<double>(x));
    const double rel = std::abs(approx(x) - want) / want;
    if (rel > worst) worst = rel, worst_x = x;
  }
  std::printf("%s: max relative error %.3g (at x = %.9g) over [%g, %g]\n", name, worst, worst_x, lo, hi);
  EXPECT(worst < 2e-7, "%s max relative error %.3g at x = %.9g (want < 2e-7)", name, worst, worst_x);
}

void test_host_exp() {
  check_sweep("host_exp_approx", gmamba::host_exp_approx, [](double x) { return std::exp(x); }, -87.0, 88.0);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT(std::isnan(gmamba::host_exp_approx(nan)), "host_exp_approx(NaN) must be NaN");
  EXPECT(std::isnan(gmamba::fast_exp(nan)), "fast_exp(float NaN) must be NaN");
  EXPECT(std::isnan(gmamba::fast_exp(std::numeric_limits<double>::quiet_NaN())), "fast_exp(double NaN)");
  EXPECT(gmamba::host_exp_approx(0.0f) == 1.0f, "host_exp_approx(0) = %.9g", gmamba::host_exp_approx(0.0f));
}

void test_host_exp2() {
  // Finite below 127.5 (see fast_exp.h), then the saturated ends.
  check_sweep("host_exp2_approx", gmamba::host_exp2_approx, [](double x) { return std::exp2(x); }, -126.0, 127.49);
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT(std::isnan(gmamba::host_exp2_approx(std::numeric_limits<float>::quiet_NaN())), "host_exp2_approx(NaN)");
  EXPECT(gmamba::host_exp2_approx(0.0f) == 1.0f, "host_exp2_approx(0) = %.9g", gmamba::host_exp2_approx(0.0f));
  for (float x : {-126.5f, -1e4f, -1e30f, -inf})
    EXPECT(gmamba::host_exp2_approx(x) == 0.0f, "host_exp2_approx(%g) = %.9g, want 0", x, gmamba::host_exp2_approx(x));
  for (float x : {127.51f, 128.0f, 1e4f, inf})
    EXPECT(gmamba::host_exp2_approx(x) == inf, "host_exp2_approx(%g) = %.9g, want inf", x, gmamba::host_exp2_approx(x));
}

// The CPU softplus (forward) and softplus_and_grad (backward): relative error over the whole float range
// where softplus is not denormal, exactly v and 1 above 20 (torch's linear branch), NaN and inf.
void test_host_softplus() {
  const auto exact = [](double v) { return v > 20 ? v : std::log1p(std::exp(v)); };
  check_sweep("host_exp_nonpositive", gmamba::host_exp_nonpositive, [](double x) { return std::exp(x); }, -87.0, 0.0);
  check_sweep("host_softplus_approx", gmamba::host_softplus_approx, exact, -87.0, 60.0);
  check_sweep("softplus_and_grad value", [](float v) { return gmamba::cpu::softplus_and_grad(v).value; }, exact,
              -87.0, 60.0);
  check_sweep("softplus_and_grad grad", [](float v) { return gmamba::cpu::softplus_and_grad(v).grad; },
              [](double v) { return 1 / (1 + std::exp(-v)); }, -87.0, 60.0);
  for (float v : {20.0f, 20.5f, 37.25f, 1e4f, 3e38f}) {
    EXPECT(gmamba::host_softplus_approx(v) == v, "host_softplus_approx(%g) = %.9g, want v", v,
           gmamba::host_softplus_approx(v));
    EXPECT(gmamba::cpu::softplus_and_grad(v).grad == 1.0f, "softplus_and_grad(%g).grad = %.9g, want 1", v,
           gmamba::cpu::softplus_and_grad(v).grad);
  }
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT(gmamba::host_softplus_approx(inf) == inf, "host_softplus_approx(inf) = %.9g", gmamba::host_softplus_approx(inf));
  // Below -87.3 softplus and its derivative are 0 exactly (a 1.2e-38 floor there, times a large u, showed).
  for (float v : {-87.5f, -100.0f, -1e4f, -inf}) {
    EXPECT(gmamba::host_softplus_approx(v) == 0.0f, "host_softplus_approx(%g) = %.9g, want 0", v,
           gmamba::host_softplus_approx(v));
    EXPECT(gmamba::cpu::softplus_and_grad(v).grad == 0.0f, "softplus_and_grad(%g).grad = %.9g, want 0", v,
           gmamba::cpu::softplus_and_grad(v).grad);
  }
  // The decay rate stays finite, so a dt = 0 (padding) step decays by exactly 1 even for A = -inf.
  for (float a : {-3e38f, -inf}) {
    const float rate = gmamba::cpu::decay_rate(a);
    EXPECT(std::isfinite(rate) && gmamba::cpu::decay_from_rate(0.0f * rate) == 1.0f &&
           gmamba::cpu::decay_from_rate(0.5f * rate) == 0.0f, "decay_rate(%g) = %g", a, rate);
  }
  EXPECT(std::isinf(gmamba::cpu::decay_rate(-std::numeric_limits<double>::infinity())) == false,
         "decay_rate(-inf) in double must be finite");
  EXPECT(std::isnan(gmamba::cpu::decay_rate(nan)), "decay_rate(NaN) must be NaN");
  EXPECT(std::isnan(gmamba::host_softplus_approx(nan)), "host_softplus_approx(NaN) must be NaN");
  EXPECT(std::isnan(gmamba::cpu::softplus_and_grad(nan).value), "softplus_and_grad(NaN) must be NaN");
}

// Naive scan in double: u, delta, z (B, d, L); A (d, N); B, C (B, N, L); D, delta_bias (d).
// s = exp(delta A) s + delta B u; out = (sum_n C s + D u) * silu(z). Returns out and the last state.
std::tuple<at::Tensor, at::Tensor> naive_scan(at::Tensor u, at::Tensor delta, at::Tensor A, at::Tensor Bm,
                                             at::Tensor Cm, at::Tensor D, at::Tensor z, at::Tensor bias,
                                             bool softplus) {
  auto u_ = u.to(at::kDouble).contiguous(), dt_ = delta.to(at::kDouble).contiguous();
  auto A_ = A.to(at::kDouble).contiguous(), B_ = Bm.to(at::kDouble).contiguous();
  auto C_ = Cm.to(at::kDouble).contiguous(), D_ = D.to(at::kDouble).contiguous();
  auto z_ = z.to(at::kDouble).contiguous(), bias_ = bias.to(at::kDouble).contiguous();
  const int64_t batch = u.size(0), d = u.size(1), L = u.size(2), N = A.size(1);
  auto out = at::zeros({batch, d, L}, at::kDouble), last = at::zeros({batch, d, N}, at::kDouble);
  auto uu = u_.accessor<double, 3>(), dd = dt_.accessor<double, 3>(), zz = z_.accessor<double, 3>();
  auto aa = A_.accessor<double, 2>();
  auto bb = B_.accessor<double, 3>(), cc = C_.accessor<double, 3>();
  auto DD = D_.accessor<double, 1>(), bi = bias_.accessor<double, 1>();
  auto oo = out.accessor<double, 3>(), ls = last.accessor<double, 3>();
  std::vector<double> s(N);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < d; ++c) {
      std::fill(s.begin(), s.end(), 0.0);
      for (int64_t l = 0; l < L; ++l) {
        double dt = dd[b][c][l] + bi[c];
        if (softplus) dt = dt > 20 ? dt : std::log1p(std::exp(dt));
        double y = 0;
        for (int64_t n = 0; n < N; ++n) {
          s[n] = std::exp(dt * aa[c][n]) * s[n] + dt * bb[b][n][l] * uu[b][c][l];
          y += cc[b][n][l] * s[n];
        }
        const double zv = zz[b][c][l];
        oo[b][c][l] = (y + DD[c] * uu[b][c][l]) * zv / (1 + std::exp(-zv));
      }
      for (int64_t n = 0; n < N; ++n) ls[b][c][n] = s[n];
    }
  return {out, last};
}

using FwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, bool, bool);

double max_rel_diff(const at::Tensor& got, const at::Tensor& want) {
  const double scale = std::max(1.0, want.abs().max().item<double>());
  return (got.to(at::kDouble) - want).abs().max().item<double>() / scale;
}

void test_op(bool channels_last, bool softplus) {
  const char* name = "gmamba_ext::selective_scan_fwd";
  std::optional<c10::OperatorHandle> op;
  try {
    op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  } catch (const std::exception& e) {
    EXPECT(false, "%s is not registered (was libgmamba_ops dropped by the linker?): %s", name, e.what());
    return;
  }
  auto fwd = op->typed<FwdSig>();
  at::manual_seed(channels_last * 2 + softplus);
  const int64_t batch = 2, d = 20, L = 45, N = 5;  // d not a multiple of 8, L not of the chunk (16)
  auto u = at::randn({batch, d, L}), z = at::randn({batch, d, L});
  auto delta = softplus ? at::randn({batch, d, L}) * 0.5 : at::rand({batch, d, L}) * 0.2 + 0.01;
  auto A = -at::rand({d, N}) * 2 - 0.1;
  auto Bm = at::randn({batch, N, L}), Cm = at::randn({batch, N, L});
  auto D = at::randn({d}), bias = softplus ? at::randn({d}) * 0.3 : at::zeros({d});
  auto [want_out, want_last] = naive_scan(u, delta, A, Bm, Cm, D, z, bias, softplus);
  std::optional<at::Tensor> bias_arg;
  if (softplus) bias_arg = bias;
  at::Tensor out, last, checkpoints;
  try {
    if (channels_last) {  // (B, L, d) tokens and (B, L, N) B/C, read in place
      auto cl = [](const at::Tensor& t) { return t.transpose(1, 2).contiguous(); };
      std::tie(out, last, checkpoints) =
          fwd.call(cl(u), cl(delta), A, cl(Bm), cl(Cm), D, cl(z), bias_arg, std::nullopt, softplus, true);
      out = out.transpose(1, 2);
    } else {
      std::tie(out, last, checkpoints) =
          fwd.call(u, delta, A, Bm, Cm, D, z, bias_arg, std::nullopt, softplus, false);
    }
  } catch (const std::exception& e) {
    EXPECT(false, "selective_scan_fwd(channels_last=%d, softplus=%d) threw: %s", channels_last, softplus, e.what());
    return;
  }
  EXPECT(out.sizes() == want_out.sizes(), "out has the wrong shape");
  EXPECT(last.sizes() == want_last.sizes(), "last_state has the wrong shape");
  if (out.sizes() != want_out.sizes() || last.sizes() != want_last.sizes()) return;
  const double e_out = max_rel_diff(out, want_out), e_last = max_rel_diff(last, want_last);
  std::printf("selective_scan_fwd(channels_last=%d, softplus=%d): max error out %.3g, last_state %.3g\n",
              channels_last, softplus, e_out, e_last);
  EXPECT(e_out < 1e-4, "out differs from the naive scan by %.3g (channels_last=%d)", e_out, channels_last);
  EXPECT(e_last < 1e-4, "last_state differs from the naive scan by %.3g (channels_last=%d)", e_last, channels_last);
  EXPECT(checkpoints.dim() == 4 && checkpoints.size(0) == batch && checkpoints.size(1) == (L + 15) / 16,
        "checkpoints must be (B, ceil(L/16), N, d)");
}

}  // namespace

// The vector lane sums (AVX builds) add in the documented order: bitwise equal to the scalar formula, for
// packs of 8 and of 16 lanes (16: lane w + 8 added to lane w first).
template <int L>
void check_row_sums() {
  float in[16][L], sums[16];
  for (int i = 0; i < 16; ++i)
    for (int w = 0; w < L; ++w) in[i][w] = std::ldexp(static_cast<float>((i * 37 + w * 11) % 29) - 14.3f, (i + w) % 9 - 4);
  gmamba::cpu::row_sums(in, sums);
  for (int i = 0; i < 16; ++i) {
    float r[8];
    for (int w = 0; w < 8; ++w) {
      r[w] = in[i][w];
      if constexpr (L == 16) r[w] += in[i][w + 8];
    }
    const float want = ((r[0] + r[2]) + (r[1] + r[3])) + ((r[4] + r[6]) + (r[5] + r[7]));
    EXPECT(sums[i] == want, "row_sums over %d lanes, row %d: %.9g, want %.9g", L, i, sums[i], want);
  }
}
void test_row_sums() {
  check_row_sums<8>();
  check_row_sums<16>();
}

// The CUDA forwards' segment plan: segments are whole units, cover the row exactly once (the last one may
// run past its end), fit gridDim.y, a row with enough rows already is one segment, and a plan never
// spills a small tail into a second wave.
void test_segment_plan() {
  const int64_t cases[][5] = {{12288, 2048, 256, 2112, 2640},    {384, 16384, 256, 2112, 2640},
                              {384, 16384, 16, 84480, 101376},    {1, 1 << 24, 16, 84480, 67584},
                              {3, 49, 16, 84480, 101376},         {2, 1, 256, 2112, 2640},
                              {1, 5000000, 16, 84480, 101376},    {12288, 2048, 16, 84480, 67584},
                              {1536, 1024, 256, 2112, 2640}};
  for (const auto& c : cases) {
    const int64_t rows = c[0], len = c[1], unit = c[2], aim = c[3], capacity = c[4];
    const gmamba::SegmentPlan p = gmamba::plan_segments(rows, len, unit, aim, capacity);
    EXPECT(p.count >= 1 && p.count <= gmamba::kMaxSegments, "count %lld", (long long)p.count);
    EXPECT(p.len % unit == 0, "len %lld not a multiple of %lld", (long long)p.len, (long long)unit);
    EXPECT(p.count * p.len >= len && (p.count - 1) * p.len < len, "plan %lld x %lld does not cover %lld once",
           (long long)p.count, (long long)p.len, (long long)len);
    if (rows >= aim) EXPECT(p.count == 1, "enough rows but %lld segments", (long long)p.count);
    if (p.count > 1) EXPECT(rows * p.count <= capacity, "%lld segments overrun a wave", (long long)p.count);
  }
  // channels_forward<16> at (8, 1536, 2048, 16), 4 blocks of 128 per SM on 132 SMs: 5 segments (one
  // wave), not the 7 (1.27 waves) that the aim of 640 threads per SM gave.
  gmamba::SegmentPlan p = gmamba::plan_segments(12288, 2048, 16, 84480, 67584);
  EXPECT(p.count == 5 && p.len == 416, "plan %lld x %lld, want 5 x 416", (long long)p.count, (long long)p.len);
  // Where the aim fits in a wave the plan is the aim's: (8, 48, 16384, 8) channels-last, 205 x 80 steps.
  p = gmamba::plan_segments(384, 16384, 16, 84480, 101376);
  EXPECT(p.count == 205 && p.len == 80, "plan %lld x %lld, want 205 x 80", (long long)p.count, (long long)p.len);
}

int main() {
  test_segment_plan();
  test_softplus_silu();
  test_host_exp();
  test_host_exp2();
  test_host_softplus();
  test_row_sums();
  test_op(false, false);
  test_op(true, true);
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
