#pragma once
// Qualifiers that let the same inline math compile for the host (CPU kernels, C++ tests) and the device.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define GMAMBA_HD __host__ __device__ __forceinline__
#define GMAMBA_HD_SMALL __host__ __device__ __forceinline__
#else
#define GMAMBA_HD inline
// Scalar math called inside SIMD loops: forced inline on the host too (GCC sometimes keeps a template such
// as sigmoid<float> out of line, and a call in a loop body stops vectorisation).
#define GMAMBA_HD_SMALL inline __attribute__((always_inline))
#endif

// Host-only helpers called inside SIMD loops: forced inline (a call left out of line, GCC's choice in some
// callers, cannot be vectorised).
#define GMAMBA_HOST_INLINE inline __attribute__((always_inline))

// Loops over a chunk's steps are fully unrolled on the device (register arrays need compile-time
// indices); loops over channel lanes are marked SIMD on the host (GCC does not vectorise them on its
// own: the lane count is small and the bodies inline exp). Host builds pass -fopenmp-simd.
#if defined(__CUDA_ARCH__)
#define GMAMBA_UNROLL _Pragma("unroll")
#define GMAMBA_LANES _Pragma("unroll")
#else
#define GMAMBA_UNROLL _Pragma("GCC unroll 16")
#define GMAMBA_LANES _Pragma("omp simd")
#endif
