// Small torch-free device helpers shared by the CUDA kernel headers.
#pragma once

#include <cuda_runtime.h>

namespace sparsity_ext {
namespace cuda {

constexpr int kThreads = 256;  // threads per CTA for every kernel of the extension

// `N` consecutive elements starting at p, read with 16-byte (or smaller) vector loads; p must be
// aligned to min(16, N * sizeof(T)) bytes.
template <typename T, int N>
__device__ __forceinline__ void load_vector(const T* p, T (&out)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T)) < 16 ? N * static_cast<int>(sizeof(T)) : 16;
  constexpr int kPer = kBytes / static_cast<int>(sizeof(T));
  struct alignas(kBytes) Piece {
    T v[kPer];
  };
#pragma unroll
  for (int i = 0; i < N / kPer; ++i) {
    const Piece piece = reinterpret_cast<const Piece*>(p)[i];
#pragma unroll
    for (int j = 0; j < kPer; ++j) out[i * kPer + j] = piece.v[j];
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_vector(T* p, const T (&in)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T)) < 16 ? N * static_cast<int>(sizeof(T)) : 16;
  constexpr int kPer = kBytes / static_cast<int>(sizeof(T));
  struct alignas(kBytes) Piece {
    T v[kPer];
  };
#pragma unroll
  for (int i = 0; i < N / kPer; ++i) {
    Piece piece;
#pragma unroll
    for (int j = 0; j < kPer; ++j) piece.v[j] = in[i * kPer + j];
    reinterpret_cast<Piece*>(p)[i] = piece;
  }
}

}  // namespace cuda
}  // namespace sparsity_ext
