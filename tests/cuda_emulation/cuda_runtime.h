// A CPU emulation of the CUDA execution model, just enough to run sparsity_ext's kernels
// (csrc/cuda/*.cuh) on the CPU in tests: each CTA runs as kThreads std::threads (one CTA after
// another), __syncthreads is a barrier, warp intrinsics exchange values through per-warp slots,
// __shared__ variables are statics (one CTA at a time), device memory is host memory. A kernel that
// diverges around a barrier or a warp collective deadlocks here, as it would misbehave on a GPU.
// It checks the kernels' logic, not timing, memory coalescing or the hardware memory model.
#pragma once

#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
using cudaStream_t = void*;

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace emu {
struct Warp {
  std::barrier<> barrier{32};
  uint64_t slot[32];
};
struct Cta {
  std::unique_ptr<std::barrier<>> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
};
inline Cta* current_cta = nullptr;
inline Warp& my_warp() { return *current_cta->warps[threadIdx.x / 32]; }

// Every lane publishes `value`; returns the slot of lane `source(lane)` (or its own value when the
// source is out of range).
template <class T, class Source>
T exchange(T value, Source source) {
  Warp& warp = my_warp();
  const int lane = threadIdx.x % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  warp.slot[lane] = bits;
  warp.barrier.arrive_and_wait();
  const int from = source(lane);
  T result = value;
  if (from >= 0 && from < 32) std::memcpy(&result, &warp.slot[from], sizeof(T));
  warp.barrier.arrive_and_wait();
  return result;
}

// Runs `grid` CTAs of `block` threads, one CTA after another.
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), unsigned grid, unsigned block, Args... args) {
  gridDim = dim3{grid};
  blockDim = dim3{block};
  for (unsigned b = 0; b < grid; ++b) {
    Cta cta;
    cta.barrier = std::make_unique<std::barrier<>>(block);
    for (unsigned w = 0; w < (block + 31) / 32; ++w) cta.warps.push_back(std::make_unique<Warp>());
    current_cta = &cta;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&, t] {
        threadIdx = dim3{t};
        blockIdx = dim3{b};
        kernel(args...);
      });
    }
    for (std::thread& thread : threads) thread.join();
  }
}
}  // namespace emu

inline void __syncthreads() { emu::current_cta->barrier->arrive_and_wait(); }

template <class T>
T __shfl_up_sync(unsigned, T value, int offset) {
  return emu::exchange(value, [offset](int lane) { return lane >= offset ? lane - offset : -1; });
}
template <class T>
T __shfl_sync(unsigned, T value, int source) {
  return emu::exchange(value, [source](int) { return source; });
}
inline unsigned __match_any_sync(unsigned, uint32_t value) {
  emu::Warp& warp = emu::my_warp();
  warp.slot[threadIdx.x % 32] = value;
  warp.barrier.arrive_and_wait();
  unsigned peers = 0;
  for (int i = 0; i < 32; ++i) peers |= static_cast<unsigned>(warp.slot[i] == value) << i;
  warp.barrier.arrive_and_wait();
  return peers;
}
inline unsigned __ballot_sync(unsigned, bool predicate) {
  emu::Warp& warp = emu::my_warp();
  warp.slot[threadIdx.x % 32] = predicate;
  warp.barrier.arrive_and_wait();
  unsigned bits = 0;
  for (int i = 0; i < 32; ++i) bits |= static_cast<unsigned>(warp.slot[i] != 0) << i;
  warp.barrier.arrive_and_wait();
  return bits;
}
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline float __fdiv_rn(float a, float b) { return a / b; }
