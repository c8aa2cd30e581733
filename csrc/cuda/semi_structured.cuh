// CUDA kernel of sparsify_24_pack, free of torch headers; launched by semi_structured_cuda.cu. The
// prune / pack / reorder math is common/semi_structured.h, shared with the CPU kernel.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/semi_structured.h"
#include "cuda/vector_io.cuh"

namespace sparsity_ext {
namespace cuda {

// One thread per metadata element: 4 (16-bit values) or 8 (int8) groups of 4 = 32 bytes of one row, read
// with two 16-byte loads; 16 bytes of values written with one store, and the metadata element at its
// reordered position. Consecutive threads take consecutive elements of a row, so reads and value writes
// coalesce. Needs `data` and `ld * sizeof(T)` 16-byte aligned (the launcher checks).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sparsify_24_pack_kernel(const T* __restrict__ data, int64_t ld, int64_t rows, int64_t cols,
                            T* __restrict__ values, typename MetaTraits<T>::meta_t* __restrict__ meta) {
  using meta_t = typename MetaTraits<T>::meta_t;
  constexpr int kGroups = MetaTraits<T>::kGroupsPerMeta;
  const int64_t meta_cols = cols / (4 * kGroups);
  const int64_t total = rows * meta_cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t r = divide(i, meta_cols), c = i - r * meta_cols;
    T x[4 * kGroups];
    load_vector(data + r * ld + c * (4 * kGroups), x);
    T packed[2 * kGroups];
    const meta_t element = prune_pack_meta_element(x, packed);
    store_vector(values + r * (cols / 2) + c * (2 * kGroups), packed);
    meta[meta_reordered_offset(r, c, rows, static_cast<int>(sizeof(meta_t)))] = element;
  }
}

}  // namespace cuda
}  // namespace sparsity_ext
