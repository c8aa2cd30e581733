// CPU scoring pass of the block-norm masks: each block's mean norm (as an order key for the radix select,
// or as the float itself for block_scores), pass 0 of the keys' radix histogram in the same pass, and the
// per-block cuts that rank the elements of blocks that are not one row of <= 32 columns. `Plan` is the
// state every pass of the CPU pipeline reads: the data, its block grid, and the selection once settled.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/mask_math.h"
#include "common/op_args.h"
#include "cpu/radix_select_cpu.h"

namespace sparsity_ext {
namespace cpu {

inline constexpr int64_t kScoreGrain = 1 << 14;  // blocks per scoring chunk
inline constexpr int64_t kScoreTile = 2048;      // blocks scored before their keys are counted (stay in L1)

template <typename T>
struct Plan {
  T* data;
  int64_t ld;
  BlockGrid grid;
  int64_t zeros_per_block;
  int norm;
  bool all_selected;                 // k == number of blocks: no scores needed
  const uint32_t* keys = nullptr;    // per-block order keys (when !all_selected)
  uint32_t threshold_key = 0;
  int64_t last_tied_block = INT64_MAX;
  const uint64_t* cuts = nullptr;    // per-block cuts (kCut)
};
// The scoring functions hand each block's mean norm to store(block, mean): the mask ops store its order
// key, block_scores the float itself, so both compute every score with the same arithmetic.
//
// Blocks [begin, end) of one-row blocks of exactly kWidth columns: the full blocks of each row in a
// tight loop the compiler can vectorize, a row's partial last block by block_mean_norm.
template <int kWidth, int kNorm, typename T, class Store>
void row_block_scores(const Plan<T>& plan, int64_t begin, int64_t end, const Store& store) {
  const BlockGrid& g = plan.grid;
  const int64_t full_per_row = g.cols / kWidth;
  for (int64_t b = begin; b < end;) {
    const int64_t row = b / g.grid_cols, row_first = row * g.grid_cols;
    const int64_t stop = std::min(end, row_first + g.grid_cols);
    const int64_t full_stop = std::min(stop, row_first + full_per_row);
    const T* row_ptr = plan.data + row * plan.ld - row_first * kWidth;
    for (int64_t i = b; i < full_stop; ++i) {
      const T* block = row_ptr + i * kWidth;
      float sum = 0.0f;
      for (int c = 0; c < kWidth; ++c) sum = fp32_add(sum, element_norm(to_float(block[c]), kNorm));
      store(i, sum / static_cast<float>(kWidth));
    }
    for (int64_t i = std::max(b, full_stop); i < stop; ++i) {
      store(i, block_mean_norm(plan.data, plan.ld, g, row, i - row_first, kNorm));
    }
    b = stop;
  }
}

template <typename T, class Store>
void any_block_scores(const Plan<T>& plan, int64_t begin, int64_t end, const Store& store) {
  const BlockGrid& g = plan.grid;
  int64_t block_row = begin / g.grid_cols, block_col = begin - block_row * g.grid_cols;
  for (int64_t b = begin; b < end; ++b) {
    store(b, block_mean_norm(plan.data, plan.ld, g, block_row, block_col, plan.norm));
    if (++block_col == g.grid_cols) {
      block_col = 0;
      ++block_row;
    }
  }
}

template <typename T, class Store>
void block_scores(const Plan<T>& plan, int64_t begin, int64_t end, const Store& store) {
  const BlockGrid& g = plan.grid;
  const auto by_norm = [&](auto width) {
    constexpr int kWidth = decltype(width)::value;
    switch (plan.norm) {
      case 0: return row_block_scores<kWidth, 0>(plan, begin, end, store);
      case 1: return row_block_scores<kWidth, 1>(plan, begin, end, store);
      default: return row_block_scores<kWidth, 2>(plan, begin, end, store);
    }
  };
  if (g.block_rows == 1 && g.block_cols == 4) return by_norm(std::integral_constant<int, 4>());
  if (g.block_rows == 1 && g.block_cols == 8) return by_norm(std::integral_constant<int, 8>());
  any_block_scores(plan, begin, end, store);
}

// block_zero_cut, with a linear-time selection for blocks of more than 32 valid elements (the shared
// bisection reads such a block 34 times; here its (key, position) pairs are gathered once into
// `scratch` and the z-th smallest is found with nth_element). Same result.
template <typename T>
uint64_t block_cut_cpu(const Plan<T>& plan, int64_t block_row, int64_t block_col, std::vector<uint64_t>& scratch) {
  const BlockGrid& g = plan.grid;
  const int64_t ncols = g.valid_cols(block_col), nrows = g.valid_rows(block_row);
  const int64_t n = nrows * ncols;
  if (n <= 32 || plan.zeros_per_block >= n) {
    return block_zero_cut(plan.data, plan.ld, g, block_row, block_col, plan.zeros_per_block, plan.norm);
  }
  scratch.resize(n);
  const T* first = plan.data + block_row * g.block_rows * plan.ld + block_col * g.block_cols;
  for (int64_t r = 0; r < nrows; ++r) {
    for (int64_t c = 0; c < ncols; ++c) scratch[r * ncols + c] = cut_key(element_key(first[r * plan.ld + c], plan.norm), r * ncols + c);
  }
  std::nth_element(scratch.begin(), scratch.begin() + (plan.zeros_per_block - 1), scratch.end());
  return scratch[plan.zeros_per_block - 1];
}

// Per-block keys (with pass 0 of their histogram, per chunk) and/or per-block cuts.
template <typename T>
void score_blocks(const Plan<T>& plan, const cpu::Chunking& chunks, uint32_t* keys, cpu::ChunkHistograms* first_pass,
                  uint64_t* cuts) {
  const BlockGrid& g = plan.grid;
  at::parallel_for(0, chunks.count, 1, [&](int64_t c0, int64_t c1) {
    std::vector<uint64_t> scratch;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t chunk_end = chunks.end(c);
      for (int64_t begin = chunks.begin(c); begin < chunk_end; begin += kScoreTile) {
        const int64_t end = std::min(begin + kScoreTile, chunk_end);
        if (keys) {
          block_scores(plan, begin, end, [keys](int64_t i, float mean) { keys[i] = order_key(mean); });
          cpu::add_to_histogram([keys](int64_t i) { return keys[i]; }, begin, end, 0u, 0, first_pass->of(c));
        }
        if (cuts) {
          int64_t block_row = begin / g.grid_cols, block_col = begin - block_row * g.grid_cols;
          for (int64_t b = begin; b < end; ++b) {
            cuts[b] = block_cut_cpu(plan, block_row, block_col, scratch);
            if (++block_col == g.grid_cols) {
              block_col = 0;
              ++block_row;
            }
          }
        }
      }
    }
  });
}

// Uninitialized per-block buffers (every entry is written by the scoring pass): order keys (int32)
// or cuts (int64, kCut only).
inline at::Tensor per_block_buffer(const at::Tensor& like, int64_t num_blocks, at::ScalarType dtype) {
  return at::empty({num_blocks}, like.options().dtype(dtype));
}

}  // namespace cpu
}  // namespace sparsity_ext
