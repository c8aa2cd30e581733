// The apply_mask_ kernels, free of torch headers, in a header of their own because two translation units
// launch them: mask_ops_cuda.cu (apply_mask_) and block_mask_cuda.cu (the zeroing pass of
// block_norm_mask_apply_, through block_mask_flow.h). They hold no non-template kernel, so including this
// twice defines nothing twice.
//
// A dropped element x becomes x * 0 (times_zero, common/mask_math.h): byte for byte what torch's
// data * mask writes, -0.0 for a negative x.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/mask_math.h"
#include "cuda/launch.h"
#include "cuda/vector_io.cuh"

namespace sparsity_ext {
namespace cuda {

constexpr int kApplyGroup = 8;  // elements per thread in apply_mask_groups_kernel: one packed byte

// Whether flat element e is kept by a mask given as bool[numel] (packed == nullptr) or as packed bits.
__device__ __forceinline__ bool mask_keeps(const bool* mask, const uint8_t* packed, int64_t e) {
  return packed != nullptr ? (packed[e >> 3] >> (e & 7)) & 1u : mask[e];
}

// Any layout: numel elements in rows of `cols` with row stride ld (ld == cols: contiguous). One element
// per thread and grid-stride step, so a warp's accesses are consecutive (coalesced); kept elements are
// neither read nor written, and only a dropped element of strided rows pays for the division.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    apply_mask_kernel(T* __restrict__ data, int64_t numel, int64_t cols, int64_t ld, const bool* __restrict__ mask,
                      const uint8_t* __restrict__ packed) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel; e += stride) {
    if (!mask_keeps(mask, packed, e)) {
      T& x = data[ld == cols ? e : e + divide(e, cols) * (ld - cols)];
      x = times_zero(x);
    }
  }
}

// Contiguous data aligned to 16 bytes, a bool mask aligned to 8 bytes (or packed): one thread per
// kApplyGroup consecutive elements, their mask read with one load (8 bool bytes, or one packed byte) and
// the elements with 16-byte vector loads, only where some of them are dropped. The last numel % 8
// elements go one per thread of the first CTA.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    apply_mask_groups_kernel(T* __restrict__ data, int64_t numel, const bool* __restrict__ mask,
                             const uint8_t* __restrict__ packed) {
  const int64_t groups = numel / kApplyGroup;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    unsigned keep;
    if (packed != nullptr) {
      keep = packed[g];
    } else {  // 8 bytes of 0 / 1: byte i lands in bit i (as pack8 on the CPU)
      const unsigned long long flags = reinterpret_cast<const unsigned long long*>(mask)[g];
      keep = static_cast<unsigned>((flags * 0x0102040810204080ull) >> 56);
    }
    if (keep == 0xFFu) continue;
    T v[kApplyGroup];
    load_vector(data + g * kApplyGroup, v);
#pragma unroll
    for (int i = 0; i < kApplyGroup; ++i) {
      if (!((keep >> i) & 1u)) v[i] = times_zero(v[i]);
    }
    store_vector(data + g * kApplyGroup, v);
  }
  const int64_t e = groups * kApplyGroup + threadIdx.x;
  if (blockIdx.x == 0 && e < numel && !mask_keeps(mask, packed, e)) data[e] = times_zero(data[e]);
}

// Zeroes data where the mask (bool[numel], or packed bits when mask == nullptr) is 0: the group kernel where
// the layout and alignment allow it, else the element kernel.
template <typename T>
void launch_apply_mask(T* data, int64_t numel, int64_t cols, int64_t ld, const bool* mask, const uint8_t* packed,
                       cudaStream_t stream) {
  if (ld == cols && aligned(data, 16) && (mask == nullptr || aligned(mask, 8))) {
    launch(apply_mask_groups_kernel<T>, grid_for(apply_mask_groups_kernel<T>, numel / kApplyGroup + 1), stream, data,
           numel, mask, packed);
  } else {
    launch(apply_mask_kernel<T>, grid_for(apply_mask_kernel<T>, numel), stream, data, numel, cols, ld, mask, packed);
  }
}

}  // namespace cuda
}  // namespace sparsity_ext
