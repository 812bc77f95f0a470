#pragma once
// How many channels the CPU scan runs per pack: one SIMD vector of lanes per step, 16 floats (one 512-bit
// register) where the build has AVX-512, 8 (one AVX2 register) otherwise. On Zen4, 16 lanes made the
// forward 5-15 % and the backward 5-12 % faster than 8 (docs/KERNELS.md): half the instructions per step
// and state, with the same 32 vector registers. -DGMAMBA_CPU_LANES=8 (setup.py passes its environment
// variable of that name) forces the 8-lane form on AVX-512 machines, which is how CI tests it there.
#ifndef GMAMBA_CPU_LANES
#if defined(__AVX512F__)
#define GMAMBA_CPU_LANES 16
#else
#define GMAMBA_CPU_LANES 8
#endif
#endif

namespace gmamba::cpu {

constexpr int kLanes = GMAMBA_CPU_LANES;
static_assert(kLanes == 8 || kLanes == 16, "GMAMBA_CPU_LANES must be 8 or 16");

}  // namespace gmamba::cpu
