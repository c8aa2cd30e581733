// Emulation stand-in for csrc/cuda/launch.h (same functions), found first on the include path of the
// emulated build: launches run on the CPU (cuda_runtime.h here), with a small grid so that every
// grid-stride loop takes several turns.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cuda/vector_io.cuh"

namespace sparsity_ext {
namespace cuda {

inline int64_t emulated_max_ctas = 3;

// At most emulated_max_ctas CTAs, whatever the kernel (no occupancy to ask here).
template <class... Params>
unsigned grid_for(void (*)(Params...), int64_t threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((threads + kThreads - 1) / kThreads, emulated_max_ctas)));
}

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

inline cudaStream_t current_stream() { return nullptr; }

template <class... Params, class... Args>
void launch(void (*kernel)(Params...), unsigned grid, cudaStream_t, Args... args) {
  emu::launch(kernel, grid, kThreads, args...);
}

}  // namespace cuda
}  // namespace sparsity_ext
