// CUDA kernels of the mask-format ops (pack_mask, unpack_mask, apply_mask_), free of torch headers;
// launched by mask_ops_cuda.cu. pack/unpack: each thread owns 32 flags = one 32-bit word of packed bits;
// apply_mask_: one element per thread (cuda/apply_mask.cuh).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/apply_mask.cuh"
#include "cuda/vector_io.cuh"

namespace sparsity_ext {
namespace cuda {

// bool[numel] -> bits, one thread per 32 flags (one 32-bit output word).
__global__ void __launch_bounds__(kThreads) pack_kernel(const bool* mask, int64_t numel, uint8_t* packed) {
  const int64_t num_words = (numel + 31) / 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < num_words; w += stride) {
    const int64_t e0 = w * 32;
    const int count = numel - e0 < 32 ? static_cast<int>(numel - e0) : 32;
    uint32_t bits = 0;
    if (count == 32) {
      uint32_t words[8];
      load_vector(reinterpret_cast<const uint32_t*>(mask + e0), words);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const uint32_t x = words[i];
        bits |= ((x & 1u) | ((x >> 7) & 2u) | ((x >> 14) & 4u) | ((x >> 21) & 8u)) << (4 * i);
      }
      reinterpret_cast<uint32_t*>(packed)[w] = bits;
    } else {
      for (int i = 0; i < count; ++i) bits |= static_cast<uint32_t>(mask[e0 + i]) << i;
      for (int i = 0; i < (count + 7) / 8; ++i) packed[e0 / 8 + i] = static_cast<uint8_t>(bits >> (8 * i));
    }
  }
}

// bits -> bool[numel], one thread per 32 flags.
__global__ void __launch_bounds__(kThreads) unpack_kernel(const uint8_t* packed, int64_t numel, bool* mask) {
  const int64_t num_words = (numel + 31) / 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < num_words; w += stride) {
    const int64_t e0 = w * 32;
    const int count = numel - e0 < 32 ? static_cast<int>(numel - e0) : 32;
    if (count == 32) {
      const uint32_t bits = reinterpret_cast<const uint32_t*>(packed)[w];
      uint32_t words[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const uint32_t nibble = (bits >> (4 * i)) & 0xFu;
        words[i] = (nibble & 1u) | ((nibble & 2u) << 7) | ((nibble & 4u) << 14) | ((nibble & 8u) << 21);
      }
      store_vector(reinterpret_cast<uint32_t*>(mask + e0), words);
    } else {
      for (int i = 0; i < count; ++i) mask[e0 + i] = (packed[(e0 + i) / 8] >> ((e0 + i) % 8)) & 1u;
    }
  }
}

}  // namespace cuda
}  // namespace sparsity_ext
