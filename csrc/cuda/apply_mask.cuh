// The apply_mask_ kernel, free of torch headers, in a header of its own because two translation units
// launch it: mask_ops_cuda.cu (apply_mask_) and block_mask_cuda.cu (the zeroing pass of
// block_norm_mask_apply_, through block_mask_flow.h). It holds no non-template kernel, so including it
// twice defines nothing twice.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/mask_math.h"
#include "cuda/vector_io.cuh"

namespace sparsity_ext {
namespace cuda {

// Whether flat element e is kept by a mask given as bool[numel] (packed == nullptr) or as packed bits.
__device__ __forceinline__ bool mask_keeps(const bool* mask, const uint8_t* packed, int64_t e) {
  return packed != nullptr ? (packed[e >> 3] >> (e & 7)) & 1u : mask[e];
}

// data = 0 where the mask (bool, or packed bits) is 0, for numel elements in rows of `cols` with row
// stride ld (ld == cols: contiguous). Used by apply_mask_ and by the zeroing pass of
// block_norm_mask_apply_. One element per thread and grid-stride step, so a warp's accesses are
// consecutive (coalesced); kept elements are neither read nor written, and only a dropped element of
// strided rows pays for the division. (One thread per 32 consecutive elements put a warp's 32 accesses
// 32 elements apart: 6.5x the floor on an H100.)
template <typename T>
__global__ void __launch_bounds__(kThreads) apply_mask_kernel(T* data, int64_t numel, int64_t cols, int64_t ld,
                                                              const bool* mask, const uint8_t* packed) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel; e += stride) {
    if (!mask_keeps(mask, packed, e)) data[ld == cols ? e : e + divide(e, cols) * (ld - cols)] = T{};
  }
}

}  // namespace cuda
}  // namespace sparsity_ext
