#pragma once
// Qualifiers that let the same inline math compile for the host (CPU kernels, C++ tests) and the device.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define GMAMBA_HD __host__ __device__ __forceinline__
#else
#define GMAMBA_HD inline
#endif
