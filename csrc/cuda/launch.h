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
#include <map>
#include <mutex>
#include <utility>

#include "cuda/vector_io.cuh"

namespace sparsity_ext {
namespace cuda {

inline int64_t sm_count() {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return count;
}

// CTAs of `kernel` (kThreads threads, no dynamic shared memory) that the current device runs at once: its
// SMs times what the occupancy calculator allows per SM for the kernel's registers and shared memory.
// Cached per (device, kernel): the query is made once.
inline int64_t resident_ctas(const void* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, int64_t> cache;
  const std::pair<int, const void*> key{c10::cuda::current_device(), kernel};
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  const int64_t ctas = sm_count() * std::max(per_sm, 1);
  cache.emplace(key, ctas);
  return ctas;
}

// CTAs for `kernel`, a grid-stride kernel over `threads` threads' worth of work: one wave of resident CTAs
// at most (the kernels loop over the rest; a second, part-empty wave would only add a tail), which also
// bounds the per-CTA histogram flushes.
template <class... Params>
unsigned grid_for(void (*kernel)(Params...), int64_t threads) {
  const int64_t wanted = (threads + kThreads - 1) / kThreads;
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>(wanted, resident_ctas(reinterpret_cast<const void*>(kernel)))));
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
