// CUDA kernels of the block-norm masks and of select_threshold, free of torch headers (launched by
// block_mask_cuda.cu).
// The per-element and per-block math is csrc/common/mask_math.h, shared with the CPU kernels.
//
// Block-norm mask pipeline (docs/design.md "Algorithms"), all on the current stream, no host sync:
//   block_keys_kernel   one thread per block: order key of its score (-> keys) and/or its cut
//                       (-> cuts), and pass 0 of the radix histogram (shared, then global atomics)
//   radix_step_kernel   one CTA: picks the pass's digit from the histogram (RadixState in memory)
//   radix_hist_kernel   passes 1 and 2: histogram of the keys that still match the prefix
//   tie_count_kernel    when only some blocks equal to the threshold are selected: equal keys per tile,
//   tie_find_kernel     then the index of the last selected one (one CTA)
//   mask_kernel         ranked blocks (kRowRank, kCut): one thread per 32 flat elements: keep bits ->
//                       bool bytes or packed bits (each thread owns whole bytes), data zeroed in place
//                       for the _apply_ variant (x * 0: times_zero in common/mask_math.h, byte for byte
//                       torch's data * mask)
//   whole_block_mask_kernel  whole blocks (kWholeBlock): one warp per 1024 flat elements, a lane per
//                       element (coalesced zeroing), the mask words built by __ballot_sync
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/mask_math.h"
#include "cuda/vector_io.cuh"

namespace sparsity_ext {
namespace cuda {

constexpr int kChunk = 32;      // flat elements per thread in the mask kernels: one 32-bit word of bits
constexpr int kTieTile = 8192;  // keys per CTA when counting ties

// ------------------------------------------------------------------------------ small helpers
// Adds 1 to hist[bin] for every lane with `valid`; lanes with the same bin add once together.
// Every lane of the warp must call it (loops keep warps converged; `valid` masks the tail).
__device__ __forceinline__ void warp_histogram_add(unsigned* hist, uint32_t bin, bool valid) {
  const uint32_t tag = valid ? bin : 0xFFFFFFFFu;
  const unsigned peers = __match_any_sync(0xFFFFFFFFu, tag);
  if (valid && (threadIdx.x & 31) == static_cast<unsigned>(__ffs(peers) - 1)) atomicAdd(&hist[bin], __popc(peers));
}

__device__ __forceinline__ void clear_shared_histogram(unsigned* hist) {
  for (int i = threadIdx.x; i < kRadixBins; i += blockDim.x) hist[i] = 0;
  __syncthreads();
}

__device__ __forceinline__ void flush_shared_histogram(const unsigned* hist, unsigned long long* global_hist) {
  __syncthreads();
  for (int i = threadIdx.x; i < kRadixBins; i += blockDim.x) {
    if (hist[i] != 0) atomicAdd(&global_hist[i], static_cast<unsigned long long>(hist[i]));
  }
}

// Exclusive prefix sum over the CTA (blockDim.x == kThreads); *total gets the sum of all values.
__device__ __forceinline__ long long block_exclusive_sum(long long value, long long* total) {
  __shared__ long long warp_sums[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  long long inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const long long other = __shfl_up_sync(0xFFFFFFFFu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    long long sum = lane < kThreads / 32 ? warp_sums[lane] : 0;
    long long scan = sum;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const long long other = __shfl_up_sync(0xFFFFFFFFu, scan, offset);
      if (lane >= offset) scan += other;
    }
    if (lane < kThreads / 32) warp_sums[lane] = scan - sum;  // exclusive offset of each warp
    const long long all = __shfl_sync(0xFFFFFFFFu, scan, kThreads / 32 - 1);
    if (lane == 0) *total = all;
  }
  __syncthreads();
  const long long result = warp_sums[warp] + inclusive - value;
  __syncthreads();  // warp_sums and *total may be reused right after
  return result;
}

// ----------------------------------------------------------------------------- block scores
// Score of a full one-row block of kWidth elements read with vector loads (same operation order as
// block_mean_norm).
template <int kWidth, typename T>
__device__ __forceinline__ float row_block_mean_norm(const T* first, int norm) {
  T v[kWidth];
  load_vector(first, v);
  float sum = 0.0f;
#pragma unroll
  for (int c = 0; c < kWidth; ++c) sum = fp32_add(sum, element_norm(to_float(v[c]), norm));
  return __fdiv_rn(sum, static_cast<float>(kWidth));
}

struct KeysArgs {
  int64_t ld;
  BlockGrid grid;
  int norm;
  int64_t zeros_per_block;
  bool vector_rows;                // kWidth > 0 and rows aligned for vector loads
  uint32_t* keys;                  // per-block order keys, or null
  uint64_t* cuts;                  // per-block cuts, or null
  unsigned long long* first_pass;  // pass-0 histogram (kRadixBins), with keys
};

// kWidth 4 / 8: one-row blocks of that width (vector loads for the full ones when vector_rows).
template <typename T, int kWidth>
__global__ void __launch_bounds__(kThreads) block_keys_kernel(const T* __restrict__ data, KeysArgs args) {
  __shared__ unsigned hist[kRadixBins];
  const bool want_keys = args.keys != nullptr;
  if (want_keys) clear_shared_histogram(hist);
  const BlockGrid& g = args.grid;
  const int64_t num_blocks = g.num_blocks();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < num_blocks; base += stride) {
    const int64_t b = base + threadIdx.x;
    const bool valid = b < num_blocks;
    uint32_t key = 0;
    if (valid) {
      const int64_t block_row = divide(b, g.grid_cols), block_col = b - block_row * g.grid_cols;
      if (want_keys) {
        float score;
        if (kWidth > 0 && args.vector_rows && (block_col + 1) * kWidth <= g.cols) {
          score = row_block_mean_norm<(kWidth > 0 ? kWidth : 1)>(data + block_row * args.ld + block_col * kWidth, args.norm);
        } else {
          score = block_mean_norm(data, args.ld, g, block_row, block_col, args.norm);
        }
        key = order_key(score);
        args.keys[b] = key;
      }
      if (args.cuts != nullptr) {
        args.cuts[b] = block_zero_cut(data, args.ld, g, block_row, block_col, args.zeros_per_block, args.norm);
      }
    }
    if (want_keys) warp_histogram_add(hist, radix_digit(key, 0), valid);
  }
  if (want_keys) flush_shared_histogram(hist, args.first_pass);
}

// ------------------------------------------------------------------------------ radix select
struct KeyArray {
  const uint32_t* keys;
  __device__ __forceinline__ uint32_t operator()(int64_t i) const { return keys[i]; }
};

template <typename T>
struct ValueKeys {
  const T* values;
  __device__ __forceinline__ uint32_t operator()(int64_t i) const { return order_key(to_float(values[i])); }
};

// Histogram of pass `pass` (1 or 2; 0 with state == nullptr) over the keys matching the prefix.
template <class Keys>
__global__ void __launch_bounds__(kThreads)
    radix_hist_kernel(Keys keys, int64_t n, const RadixState* state, int pass, unsigned long long* global_hist) {
  __shared__ unsigned hist[kRadixBins];
  clear_shared_histogram(hist);
  const uint32_t prefix = state != nullptr ? state->prefix : 0u;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < n; base += stride) {
    const int64_t i = base + threadIdx.x;
    const uint32_t key = i < n ? keys(i) : 0u;
    warp_histogram_add(hist, radix_digit(key, pass), i < n && (pass == 0 || radix_candidate(key, prefix, pass)));
  }
  flush_shared_histogram(hist, global_hist);
}

// One CTA of kThreads: the digit of pass `pass` from its histogram (radix_step's rule, by a block-wide
// scan). Pass 0 starts the state from k.
__global__ void __launch_bounds__(kThreads)
    radix_step_kernel(const unsigned long long* hist, RadixState* state, int pass, int64_t k) {
  __shared__ long long total;
  const RadixState start = pass == 0 ? radix_start(k) : *state;
  const int bins = radix_bins(pass);
  const int per_thread = bins / kThreads;  // 8 or 4
  const int first = threadIdx.x * per_thread;
  long long mine = 0;
  for (int d = first; d < first + per_thread; ++d) mine += static_cast<long long>(hist[d]);
  long long before = block_exclusive_sum(mine, &total);
  // exactly one thread holds the bin where the cumulative count reaches start.rank
  if (before < start.rank && start.rank <= before + mine) {
    for (int d = first; d < first + per_thread; ++d) {
      const long long count = static_cast<long long>(hist[d]);
      if (start.rank <= before + count) {
        RadixState next = start;
        next.prefix |= static_cast<uint32_t>(d) << radix_shift(pass);
        next.rank -= before;
        next.less += before;
        next.equal = count;
        *state = next;
        break;
      }
      before += count;
    }
  }
}

// Equal keys per tile of kTieTile, only when the threshold's ties are split (rank < equal).
__global__ void __launch_bounds__(kThreads)
    tie_count_kernel(const uint32_t* keys, int64_t n, const RadixState* state, unsigned* tile_counts) {
  const RadixState s = *state;
  if (s.rank >= s.equal) return;
  __shared__ unsigned count;
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kTieTile;
  const int64_t end = begin + kTieTile < n ? begin + kTieTile : n;
  unsigned mine = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) mine += keys[i] == s.prefix;
  atomicAdd(&count, mine);
  __syncthreads();
  if (threadIdx.x == 0) tile_counts[blockIdx.x] = count;
}

// One CTA: state->last_tied_index = index of the rank-th key equal to the threshold.
__global__ void __launch_bounds__(kThreads) tie_find_kernel(const uint32_t* keys, int64_t n, RadixState* state,
                                                            const unsigned* tile_counts, int64_t num_tiles) {
  const RadixState s = *state;
  if (s.rank >= s.equal) return;
  __shared__ long long total;
  long long remaining = s.rank;
  // the tile holding it: scan the tile counts kThreads at a time
  int64_t tile = -1;
  for (int64_t t0 = 0; t0 < num_tiles && tile < 0; t0 += kThreads) {
    const int64_t t = t0 + threadIdx.x;
    const long long count = t < num_tiles ? tile_counts[t] : 0;
    const long long before = block_exclusive_sum(count, &total);
    __shared__ long long found_tile, found_before;
    if (threadIdx.x == 0) found_tile = -1;
    __syncthreads();
    if (before < remaining && remaining <= before + count) {
      found_tile = t;
      found_before = before;
    }
    __syncthreads();
    if (found_tile >= 0) {
      tile = found_tile;
      remaining -= found_before;
    } else {
      remaining -= total;
    }
    __syncthreads();
  }
  // inside the tile: scan the keys kThreads at a time
  const int64_t begin = tile * kTieTile, end = begin + kTieTile < n ? begin + kTieTile : n;
  for (int64_t i0 = begin; i0 < end; i0 += kThreads) {
    const int64_t i = i0 + threadIdx.x;
    const long long equal = i < end && keys[i] == s.prefix;
    const long long before = block_exclusive_sum(equal, &total);
    if (equal && before + 1 == remaining) state->last_tied_index = i;
    if (remaining <= total) return;
    remaining -= total;
  }
}

// Writes the selection result of select_threshold: the k-th smallest value and its tie rank.
__global__ void select_finish_kernel(const RadixState* state, float* value, int64_t* tie_rank) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  *value = key_to_float(state->prefix);
  *tie_rank = state->rank;
}

// --------------------------------------------------------------------------------- mask pass
struct MaskArgs {
  int64_t ld;
  BlockGrid grid;
  int64_t zeros_per_block;
  int norm;
  const uint32_t* keys;      // null: every block selected
  const RadixState* state;   // threshold key and last tied block (with keys)
  const uint64_t* cuts;      // kCut
  void* out;                 // bool[numel] or packed uint8[ceil(numel / 8)]
  bool packed;
  bool apply;                // zero data where the mask is 0
  bool vector_rows;          // kRowRank fast path (kGroup 4 or 8): blocks of exactly kGroup columns,
                             // cols % kChunk == 0, rows aligned to 16 bytes
};

// Keep bits of the kChunk elements starting at row_chunk (kRowRank fast path): the chunk lies in one
// row and holds kChunk / kGroup whole groups, read (and, for _apply_, written back) with vector loads,
// half a chunk at a time to keep register pressure low.
template <typename T, int kGroup>
__device__ __forceinline__ uint32_t row_chunk_keep_bits(T* row_chunk, int64_t first_block, const MaskArgs& args,
                                                        uint32_t threshold, int64_t last_tied) {
  constexpr int kHalf = kChunk / 2;
  static_assert(kHalf % kGroup == 0, "groups must not straddle the half chunks");
  const int zeros = clamp_zeros(args.zeros_per_block, kGroup);
  uint32_t keep = 0;
#pragma unroll
  for (int h = 0; h < kChunk; h += kHalf) {
    T v[kHalf];
    load_vector(row_chunk + h, v);
    uint32_t half_keep = 0;
#pragma unroll
    for (int g0 = 0; g0 < kHalf; g0 += kGroup) {
      const int64_t block = first_block + (h + g0) / kGroup;
      const bool selected = args.keys == nullptr || block_selected(args.keys[block], block, threshold, last_tied);
      uint32_t group[kGroup];
#pragma unroll
      for (int c = 0; c < kGroup; ++c) group[c] = element_key(v[g0 + c], args.norm);
#pragma unroll
      for (int c = 0; c < kGroup; ++c) {
        half_keep |= static_cast<uint32_t>(!(selected && in_smallest_z<kGroup>(group, c, zeros))) << (g0 + c);
      }
    }
    if (args.apply && half_keep != (1u << kHalf) - 1u) {
#pragma unroll
      for (int i = 0; i < kHalf; ++i) {
        if (!((half_keep >> i) & 1u)) v[i] = times_zero(v[i]);
      }
      store_vector(row_chunk + h, v);
    }
    keep |= half_keep << h;
  }
  return keep;
}

// Keep bits of the flat range [e0, e1) (at most kChunk elements) of ranked blocks (kRowRank, kCut), any
// layout of blocks.
template <typename T, ZeroMode kMode, int kGroup>
__device__ __forceinline__ uint32_t range_keep_bits(T* data, int64_t e0, int64_t e1, const MaskArgs& args,
                                                    uint32_t threshold, int64_t last_tied) {
  const BlockGrid& g = args.grid;
  uint32_t keep = 0;
  for_each_block_run(e0, e1, g.cols, g.block_cols, [&](int64_t row, int64_t block_col, int64_t c0, int64_t c1,
                                                       int64_t offset) {
    const int64_t block_row = g.block_rows == 1 ? row : divide(row, g.block_rows);
    const int64_t block = block_row * g.grid_cols + block_col;
    const int len = static_cast<int>(c1 - c0);
    const uint32_t run = len >= 32 ? 0xFFFFFFFFu : ((1u << len) - 1u);
    const bool selected = args.keys == nullptr || block_selected(args.keys[block], block, threshold, last_tied);
    T* row_ptr = data + row * args.ld;
    const int64_t block_c0 = block_col * g.block_cols;
    uint32_t run_keep = run;  // bit i: column c0 + i
    if (selected) {
      if constexpr (kMode == ZeroMode::kRowRank) {
        const uint32_t zero_bits = row_group_zero_bits<kGroup>(row_ptr + block_c0, static_cast<int>(g.valid_cols(block_col)),
                                                               args.zeros_per_block, args.norm);
        run_keep = ~(zero_bits >> (c0 - block_c0)) & run;
      } else {
        static_assert(kMode == ZeroMode::kCut, "whole blocks go through whole_block_mask_kernel");
        const uint64_t cut = args.cuts[block];
        const int64_t row_base = (row - block_row * g.block_rows) * g.valid_cols(block_col) - block_c0;
        run_keep = 0;
        for (int64_t c = c0; c < c1; ++c) {
          run_keep |= static_cast<uint32_t>(cut_key(element_key(row_ptr[c], args.norm), row_base + c) > cut) << (c - c0);
        }
      }
      if (args.apply) {
        for (int64_t c = c0; c < c1; ++c) {
          if (!((run_keep >> (c - c0)) & 1u)) row_ptr[c] = times_zero(row_ptr[c]);
        }
      }
    }
    keep |= run_keep << offset;
  });
  return keep;
}

// The bool flags (bytes 0 / 1) of the low 4 * N bits of `bits`, 4 per word, lowest address first.
template <int N>
__device__ __forceinline__ void bits_to_flags(uint32_t bits, uint32_t (&words)[N]) {
#pragma unroll
  for (int w = 0; w < N; ++w) {
    const uint32_t nibble = (bits >> (4 * w)) & 0xFu;
    words[w] = (nibble & 1u) | ((nibble & 2u) << 7) | ((nibble & 4u) << 14) | ((nibble & 8u) << 21);
  }
}

// One thread per kChunk flat elements, ranked blocks only (kRowRank, kCut). kGroup: the compile-time group
// bound of kRowRank (else 1).
template <typename T, ZeroMode kMode, int kGroup>
__global__ void __launch_bounds__(kThreads) mask_kernel(T* data, MaskArgs args) {
  const BlockGrid& g = args.grid;
  const int64_t numel = g.rows * g.cols;
  const int64_t num_chunks = (numel + kChunk - 1) / kChunk;
  const uint32_t threshold = args.keys != nullptr ? args.state->prefix : 0u;
  const int64_t last_tied = args.keys != nullptr ? args.state->last_tied_index : 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t chunk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; chunk < num_chunks;
       chunk += stride) {
    const int64_t e0 = chunk * kChunk;
    const int64_t e1 = e0 + kChunk < numel ? e0 + kChunk : numel;
    uint32_t keep = 0;
    bool done = false;
    if constexpr (kMode == ZeroMode::kRowRank && kGroup <= 8) {
      if (args.vector_rows) {
        const int64_t row = divide(e0, g.cols), col = e0 - row * g.cols;
        keep = row_chunk_keep_bits<T, kGroup>(data + row * args.ld + col, row * g.grid_cols + col / kGroup, args,
                                              threshold, last_tied);
        done = true;
      }
    }
    if (!done) keep = range_keep_bits<T, kMode, kGroup>(data, e0, e1, args, threshold, last_tied);
    const int count = static_cast<int>(e1 - e0);
    if (args.packed) {
      uint8_t* out = static_cast<uint8_t*>(args.out);
      if (count == kChunk) {
        reinterpret_cast<uint32_t*>(out)[chunk] = keep;
      } else {
        for (int i = 0; i < (count + 7) / 8; ++i) out[e0 / 8 + i] = static_cast<uint8_t>(keep >> (8 * i));
      }
    } else {
      bool* out = static_cast<bool*>(args.out) + e0;
      if (count == kChunk) {
        uint32_t words[kChunk / 4];
        bits_to_flags(keep, words);
        store_vector(reinterpret_cast<uint32_t*>(out), words);
      } else {
        for (int i = 0; i < count; ++i) out[i] = (keep >> i) & 1u;
      }
    }
  }
}

// ------------------------------------------------------------------- whole-block mask pass
constexpr int kSpan = 32 * kChunk;  // flat elements per warp turn of whole_block_mask_kernel: 32 mask words

// Where one flat element lies in the grid of blocks, stepped kChunk elements at a time (a lane's next
// element in its warp's span). Divides at seek() and when a row ends; otherwise adds.
struct ChunkStepper {
  int64_t row, col, block_row, row_in_block, block_col, col_in_block;
  int64_t step_blocks, step_rest;  // kChunk = step_blocks * block_cols + step_rest

  __device__ __forceinline__ ChunkStepper(const BlockGrid& g, int64_t e) {
    step_blocks = divide(kChunk, g.block_cols);
    step_rest = kChunk - step_blocks * g.block_cols;
    row = divide(e, g.cols);
    col = e - row * g.cols;
    block_row = divide(row, g.block_rows);
    row_in_block = row - block_row * g.block_rows;
    block_col = divide(col, g.block_cols);
    col_in_block = col - block_col * g.block_cols;
  }

  __device__ __forceinline__ void step(const BlockGrid& g) {
    col += kChunk;
    if (col < g.cols) {
      block_col += step_blocks;
      col_in_block += step_rest;
      if (col_in_block >= g.block_cols) {
        col_in_block -= g.block_cols;
        ++block_col;
      }
      return;
    }
    const int64_t rows_ended = divide(col, g.cols);  // more than one when cols < kChunk
    row += rows_ended;
    col -= rows_ended * g.cols;
    row_in_block += rows_ended;
    if (row_in_block >= g.block_rows) {
      const int64_t blocks_ended = divide(row_in_block, g.block_rows);
      block_row += blocks_ended;
      row_in_block -= blocks_ended * g.block_rows;
    }
    block_col = divide(col, g.block_cols);
    col_in_block = col - block_col * g.block_cols;
  }
};

// kWholeBlock: every valid element of a selected block is dropped, so an element's keep bit is its
// block's selection alone. A warp takes kSpan flat elements per turn, lane l the elements l, l + 32, ...:
// loads and stores of data (the zeroing) and the mask writes are coalesced. Mask word w of the span is
// the __ballot_sync of turn w (bit i: element 32 w + i), held by lane w, then written by all lanes at once.
template <typename T>
__global__ void __launch_bounds__(kThreads) whole_block_mask_kernel(T* data, MaskArgs args) {
  const BlockGrid& g = args.grid;
  const int64_t numel = g.rows * g.cols;
  const int64_t num_spans = (numel + kSpan - 1) / kSpan;
  const uint32_t threshold = args.keys != nullptr ? args.state->prefix : 0u;
  const int64_t last_tied = args.keys != nullptr ? args.state->last_tied_index : 0;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t span = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; span < num_spans;
       span += warps) {
    const int64_t e0 = span * kSpan;
    const int count = numel - e0 < kSpan ? static_cast<int>(numel - e0) : kSpan;  // warp-uniform
    ChunkStepper at(g, e0 + lane);
    uint32_t word = 0;  // lane w: mask word w of the span
    for (int w = 0; w * kChunk < count; ++w) {
      bool keep = false;  // bits past numel stay 0
      if (w * kChunk + lane < count) {
        const int64_t block = at.block_row * g.grid_cols + at.block_col;
        keep = args.keys != nullptr && !block_selected(args.keys[block], block, threshold, last_tied);
        if (args.apply && !keep) {
          T* x = data + at.row * args.ld + at.col;
          *x = times_zero(*x);
        }
      }
      const uint32_t bits = __ballot_sync(0xFFFFFFFFu, keep);
      if (lane == w) word = bits;
      at.step(g);
    }
    const int words = (count + kChunk - 1) / kChunk;
    if (args.packed) {
      uint8_t* out = static_cast<uint8_t*>(args.out) + e0 / 8;
      if ((lane + 1) * kChunk <= count) {
        reinterpret_cast<uint32_t*>(out)[lane] = word;
      } else if (lane < words) {  // the last, partial word: only the bytes inside the mask
        const int bytes = (count - lane * kChunk + 7) / 8;
        for (int b = 0; b < bytes; ++b) out[lane * 4 + b] = static_cast<uint8_t>(word >> (8 * b));
      }
    } else {
      bool* out = static_cast<bool*>(args.out) + e0;
      if (count == kSpan) {
        // lane l: the 16 flags at 16 l (half l % 2 of word l / 2), then those at kSpan / 2 + 16 l
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const uint32_t source = __shfl_sync(0xFFFFFFFFu, word, half * 16 + lane / 2);
          uint32_t flags[4];
          bits_to_flags(source >> (16 * (lane & 1)), flags);
          store_vector(reinterpret_cast<uint32_t*>(out + half * (kSpan / 2) + 16 * lane), flags);
        }
      } else {
        for (int w = 0; w < words; ++w) {
          const uint32_t bits = __shfl_sync(0xFFFFFFFFu, word, w);
          if (w * kChunk + lane < count) out[w * kChunk + lane] = (bits >> lane) & 1u;
        }
      }
    }
  }
}

}  // namespace cuda
}  // namespace sparsity_ext
