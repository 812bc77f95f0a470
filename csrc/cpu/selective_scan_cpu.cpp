// CPU selective scan: a task per (batch, group, block of packs of kLanes channels), sequential over chunks
// with each pack's state carried in a small local array; cpu/scan_cpu_chunk.h vectorises over a pack's lanes.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/scan_cpu_chunk.h"
#include "ops/scan_ops.h"

namespace gmamba {
namespace {

using cpu::kLanes;

// A task covers a block of consecutive packs of one (batch, group) and walks the chunks once, every pack
// of the block per chunk: in the channels-last layout a chunk's token rows are then read whole while in
// cache (one pack per task read 32 bytes of each row and left the rest to be fetched again by other tasks:
// at B = 8, d = 48, L = 16384 the forward took 303 ms, now 214 ms). Blocks are as large as keeping every
// thread busy allows.
struct CpuTasks {
  int64_t tiles, per_block, blocks, count;
  CpuTasks(const ScanShape& s, bool backward) : tiles((s.dim_per_group + kLanes - 1) / kLanes) {
    const int64_t bg = s.batch * s.groups;
    // Blocks per (batch, group): enough for two tasks per thread, at most one per pack. The channels-first
    // forward keeps one pack per task: a pack then streams along L (measured faster than interleaving
    // packs: 11 % at (8, 1536, 196, 16)). Its backward takes blocks too: fewer variable dB / dC partial
    // rows to write and reduce (5-7 % at L <= 256, 1 thread, alternating builds).
    const int64_t split = s.channels_last || backward
                              ? std::clamp<int64_t>(bg > 0 ? (2 * at::get_num_threads() + bg - 1) / bg : 1, 1,
                                                    std::max<int64_t>(tiles, 1))
                              : std::max<int64_t>(tiles, 1);
    per_block = std::max<int64_t>((tiles + split - 1) / split, 1);
    blocks = (tiles + per_block - 1) / per_block;
    count = bg * blocks;
  }
  // Flat pack indices [first, last) of a task; a pack index is (b * groups + g) * tiles + tile.
  std::pair<int64_t, int64_t> packs(int64_t task) const {
    const int64_t bg = task / blocks, first = bg * tiles + (task % blocks) * per_block;
    return {first, std::min(first + per_block, (bg + 1) * tiles)};
  }
  // Pack index `pack` at chunk k. Its variable dB / dC partial row is its block's: the packs of a task sum
  // into one row in pack order, so a channels-last backward writes and the host reduces `blocks` rows per
  // (batch, group), not one per pack (at B = 8, d = 48, L = 16384: 8 MB instead of 50 MB).
  cpu::PackChunk pack(const ScanShape& s, int64_t pack, int64_t k) const {
    const int64_t tile = pack % tiles, g = (pack / tiles) % s.groups, b = pack / (tiles * s.groups);
    const int64_t first = tile * kLanes;
    return cpu::PackChunk{b, g, g * s.dim_per_group + first, tile / per_block, k, k * kChunk,
                          static_cast<int>(std::min<int64_t>(kLanes, s.dim_per_group - first)),
                          static_cast<int>(std::min<int64_t>(kChunk, s.len - k * kChunk)), tile % per_block == 0};
  }
  // The rows (pack, k) fetches while it computes (cpu::NextRows): channels-first, those of the pack-chunk
  // the task runs next, walking the chunks in direction dk with every pack of [first, last) per chunk;
  // channels-last, those of the same pack's next chunk.
  template <typename Args>
  cpu::NextRows next_rows(const Args& a, const ScanShape& s, int64_t first, int64_t last, int64_t p, int64_t k,
                          int64_t dk) const {
    cpu::NextRows next;
    if (s.channels_last) {
      if (k + dk >= 0 && k + dk < s.nchunks) next.add_inputs(a, pack(s, p, k + dk));
    } else if (p + 1 < last) {
      next.add_inputs(a, pack(s, p + 1, k));
    } else if (k + dk >= 0 && k + dk < s.nchunks) {
      next.add_inputs(a, pack(s, first, k + dk));
    }
    return next;
  }
  // Packs [first, last)'s states between a (B, d, N) tensor and the task's slabs (N x kLanes per pack,
  // lanes past the pack's channels zero).
  template <typename acc_t>
  void gather(const ScanShape& s, int64_t first, int64_t last, const acc_t* from, acc_t* slabs) const {
    for (int64_t p = first; p < last; ++p) {
      const cpu::PackChunk ls = pack(s, p, 0);
      acc_t* slab = slabs + (p - first) * s.dstate * kLanes;
      for (int64_t n = 0; n < s.dstate; ++n)
        for (int w = 0; w < kLanes; ++w)
          slab[n * kLanes + w] = w < ls.active ? from[s.state_index(ls.b, ls.c0 + w, n)] : acc_t(0);
    }
  }
  // A as each pack's [n][lane] slab, for packs [first, last).
  template <typename acc_t>
  void load_a_slabs(const ScanShape& s, int64_t first, int64_t last, const acc_t* A, acc_t* slabs) const {
    for (int64_t p = first; p < last; ++p)
      cpu::load_a_slab(A, s.dstate, pack(s, p, 0), slabs + (p - first) * s.dstate * kLanes);
  }
  template <typename acc_t>
  void scatter(const ScanShape& s, int64_t first, int64_t last, const acc_t* slabs, acc_t* to) const {
    for (int64_t p = first; p < last; ++p) {
      const cpu::PackChunk ls = pack(s, p, 0);
      const acc_t* slab = slabs + (p - first) * s.dstate * kLanes;
      for (int64_t n = 0; n < s.dstate; ++n)
        for (int w = 0; w < ls.active; ++w) to[s.state_index(ls.b, ls.c0 + w, n)] = slab[n * kLanes + w];
    }
  }
};

template <typename in_t, typename acc_t>
void forward_kernel(const ScanFwdArgs<in_t, acc_t>& a) {
  const ScanShape& s = a.s;
  const CpuTasks tasks(s, /*backward=*/false);
  const int64_t slab = s.dstate * kLanes;  // one pack's state (or A) as [n][lane]
  at::parallel_for(0, tasks.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> states(tasks.per_block * slab), a_slabs(tasks.per_block * slab);
    for (int64_t task = begin; task < end; ++task) {
      const auto [first, last] = tasks.packs(task);
      // last_state holds initial_state (or zeros) on entry: the scan starts from it.
      tasks.gather(s, first, last, a.last_state, states.data());
      tasks.load_a_slabs(s, first, last, a.A, a_slabs.data());
      for (int64_t k = 0; k < s.nchunks; ++k)
        for (int64_t p = first; p < last; ++p) {
          cpu::forward_chunk(a, tasks.pack(s, p, k), a_slabs.data() + (p - first) * slab,
                             states.data() + (p - first) * slab, tasks.next_rows(a, s, first, last, p, k, 1));
        }
      tasks.scatter(s, first, last, states.data(), a.last_state);
    }
  });
}

template <typename in_t, typename acc_t>
void backward_kernel(const ScanBwdArgs<in_t, acc_t>& a) {
  const ScanShape& s = a.f.s;
  const CpuTasks tasks(s, /*backward=*/true);
  const int64_t slab = s.dstate * kLanes;
  at::parallel_for(0, tasks.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> carries(tasks.per_block * slab), a_slabs(tasks.per_block * slab);
    for (int64_t task = begin; task < end; ++task) {
      const auto [first, last] = tasks.packs(task);
      // dinitial_state holds dlast_state (or zeros) on entry: the adjoint of the final state.
      tasks.gather(s, first, last, a.dinitial_state, carries.data());
      tasks.load_a_slabs(s, first, last, a.f.A, a_slabs.data());
      for (int64_t k = s.nchunks - 1; k >= 0; --k)
        for (int64_t p = first; p < last; ++p) {
          cpu::backward_chunk(a, tasks.pack(s, p, k), a_slabs.data() + (p - first) * slab,
                              carries.data() + (p - first) * slab, tasks.next_rows(a, s, first, last, p, k, -1));
        }
      tasks.scatter(s, first, last, carries.data(), a.dinitial_state);
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
    // Every task writes every element of its partial rows for every chunk (cpu/scan_cpu_chunk.h).
    static const ScanBackend backend{forward_cpu, backward_cpu, kLanes,
                                     [](const ScanShape& s) { return CpuTasks(s, /*backward=*/true).blocks; },
                                     /*writes_every_partial=*/true};
    return backend;
  }
};

}  // namespace
}  // namespace gmamba

TORCH_LIBRARY_IMPL(gmamba_ext, CPU, m) {
  m.impl("selective_scan_fwd", &gmamba::ScanOps<gmamba::CpuBackend>::forward);
  m.impl("selective_scan_bwd", &gmamba::ScanOps<gmamba::CpuBackend>::backward);
}
