// CPU selective scan: one task per (batch, group, pack of kLanes channels), sequential over chunks with the
// state carried in a small local array; the shared chunk code vectorises over the pack's lanes.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "gmamba/scan_chunk.h"
#include "ops/scan_ops.h"

namespace gmamba {
namespace {

constexpr int kLanes = 8;

struct CpuTasks {
  int64_t tiles, count;
  explicit CpuTasks(const ScanShape& s)
      : tiles((s.dim_per_group + kLanes - 1) / kLanes), count(s.batch * s.groups * tiles) {}
  LaneSet lanes(const ScanShape& s, int64_t task) const {
    const int64_t tile = task % tiles, g = (task / tiles) % s.groups, b = task / (tiles * s.groups);
    const int64_t first = tile * kLanes;
    return LaneSet{b, g, g * s.dim_per_group + first, 0,
                   static_cast<int>(std::min<int64_t>(kLanes, s.dim_per_group - first))};
  }
};

template <typename in_t, typename acc_t>
void forward_kernel(const ScanFwdArgs<in_t, acc_t>& a) {
  const ScanShape& s = a.s;
  const CpuTasks tasks(s);
  at::parallel_for(0, tasks.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> state(s.dstate * kLanes);
    for (int64_t task = begin; task < end; ++task) {
      LaneSet ls = tasks.lanes(s, task);
      // last_state holds initial_state (or zeros) on entry: the scan starts from it.
      for (int64_t n = 0; n < s.dstate; ++n)
        for (int w = 0; w < kLanes; ++w)
          state[n * kLanes + w] = w < ls.active ? a.last_state[s.state_index(ls.b, ls.c0 + w, n)] : 0;
      auto read = [&](int64_t n, int w) { return state[n * kLanes + w]; };
      auto write = [&](int64_t n, int w, acc_t v) { state[n * kLanes + w] = v; };
      for (ls.k = 0; ls.k < s.nchunks; ++ls.k) {
        for (int64_t n = 0; n < s.dstate; ++n)
          for (int w = 0; w < ls.active; ++w)
            a.checkpoints[s.chunk_state_index(ls.b, ls.k, n, ls.c0 + w)] = state[n * kLanes + w];
        ChunkInputs<kLanes, in_t, acc_t> x;
        x.load(a, ls);
        chunk_forward<true>(a, ls, x, read, write);
      }
      for (int64_t n = 0; n < s.dstate; ++n)
        for (int w = 0; w < ls.active; ++w)
          a.last_state[s.state_index(ls.b, ls.c0 + w, n)] = state[n * kLanes + w];
    }
  });
}

template <typename in_t, typename acc_t>
void backward_kernel(const ScanBwdArgs<in_t, acc_t>& a) {
  const ScanShape& s = a.f.s;
  const CpuTasks tasks(s);
  at::parallel_for(0, tasks.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> carry(s.dstate * kLanes);
    for (int64_t task = begin; task < end; ++task) {
      LaneSet ls = tasks.lanes(s, task);
      // dinitial_state holds dlast_state (or zeros) on entry: the adjoint of the final state.
      for (int64_t n = 0; n < s.dstate; ++n)
        for (int w = 0; w < kLanes; ++w)
          carry[n * kLanes + w] = w < ls.active ? a.dinitial_state[s.state_index(ls.b, ls.c0 + w, n)] : 0;
      auto ckpt = [&](int64_t n, int w) {
        return w < ls.active ? a.f.checkpoints[s.chunk_state_index(ls.b, ls.k, n, ls.c0 + w)] : acc_t(0);
      };
      auto carry_in = [&](int64_t n, int w) { return carry[n * kLanes + w]; };
      auto carry_out = [&](int64_t n, int w, acc_t v) { carry[n * kLanes + w] = v; };
      const int64_t tile = task % tasks.tiles;
      // Per-step dB / dC of one state: summed over the pack's channels in a fixed order into this task's
      // own slice (variable), or over the chunk's steps per channel (constant).
      auto emit_one = [&](const BCView<acc_t>& view, acc_t* part, int64_t n, const acc_t(&vals)[kChunk][kLanes]) {
        if (view.variable) {
          acc_t* row = part + (((ls.b * s.groups + ls.g) * tasks.tiles + tile) * s.dstate + n) * s.len;
          for (int t = 0; t < kChunk && ls.k * kChunk + t < s.len; ++t) {
            acc_t sum = 0;
            for (int w = 0; w < kLanes; ++w) sum += vals[t][w];
            row[ls.k * kChunk + t] = sum;
          }
          return;
        }
        for (int w = 0; w < ls.active; ++w) {
          acc_t sum = 0;
          for (int t = 0; t < kChunk; ++t) sum += vals[t][w];
          part[s.chunk_state_index(ls.b, ls.k, n, ls.c0 + w)] = sum;
        }
      };
      auto emit = [&](int64_t n, const acc_t(&dB)[kChunk][kLanes], const acc_t(&dC)[kChunk][kLanes]) {
        emit_one(a.f.B, a.dB_part, n, dB);
        emit_one(a.f.C, a.dC_part, n, dC);
      };
      for (ls.k = s.nchunks - 1; ls.k >= 0; --ls.k) {
        ChunkInputs<kLanes, in_t, acc_t> x;
        x.load(a.f, ls);
        chunk_backward(a, ls, x, ckpt, carry_in, carry_out, emit);
      }
      for (int64_t n = 0; n < s.dstate; ++n)
        for (int w = 0; w < ls.active; ++w) a.dinitial_state[s.state_index(ls.b, ls.c0 + w, n)] = carry[n * kLanes + w];
    }
  });
}

void forward_cpu(const ScanInputs& in, const ScanShape& s, const at::Tensor& out, const at::Tensor& checkpoints,
                 const at::Tensor& last_state) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.u.scalar_type(), "selective_scan_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_kernel(make_fwd_args<scalar_t, acc_t>(in, s, out, checkpoints, last_state));
  });
}

void backward_cpu(const ScanInputs& in, const ScanShape& s, const at::Tensor& dout,
                  const std::optional<at::Tensor>& dlast, const at::Tensor& checkpoints,
                  std::vector<at::Tensor>& buffers, int64_t tiles) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.u.scalar_type(), "selective_scan_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_kernel(make_bwd_args<scalar_t, acc_t>(in, s, dout, dlast, checkpoints, buffers, tiles));
  });
}

struct CpuBackend {
  static const ScanBackend& get() {
    static const ScanBackend backend{forward_cpu, backward_cpu, kLanes};
    return backend;
  }
};

}  // namespace
}  // namespace gmamba

TORCH_LIBRARY_IMPL(gmamba_ext, CPU, m) {
  m.impl("selective_scan_fwd", &gmamba::ScanOps<gmamba::CpuBackend>::forward);
  m.impl("selective_scan_bwd", &gmamba::ScanOps<gmamba::CpuBackend>::backward);
}
