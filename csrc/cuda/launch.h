// Host-side launch helpers shared by the CUDA launchers (c10 only: no ATen/cuda headers, so the
// launchers also compile against a toolkit without the cuBLAS/cuSPARSE headers). The CPU emulation in
// tests/cuda_emulation provides the same functions.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/vector_io.cuh"

namespace sparsity_ext {
namespace cuda {

inline int64_t sm_count() {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return count;
}

// CTAs for a grid-stride kernel over `threads` threads' worth of work: at most ctas_per_sm per SM
// (the kernels loop over the rest), which also bounds the per-CTA histogram flushes.
inline unsigned grid_for(int64_t threads, int64_t ctas_per_sm = 8) {
  const int64_t wanted = (threads + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(wanted, sm_count() * ctas_per_sm)));
}

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// kernel<<<grid, kThreads, 0, stream>>>(args...), then the launch check.
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), unsigned grid, cudaStream_t stream, Args... args) {
  kernel<<<grid, kThreads, 0, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace sparsity_ext
