// CPU entry points of the two halves of the block-norm mask pipeline, as ops of their own for callers that
// select across several tensors or chunks: block_scores (the scoring pass) and block_norm_mask_select (the
// mask pass, given a threshold and how many blocks tied at it are selected).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "common/mask_math.h"
#include "common/op_args.h"
#include "cpu/block_scores_cpu.h"
#include "cpu/mask_pass_cpu.h"
#include "cpu/radix_select_cpu.h"

namespace sparsity_ext {
namespace cpu {
namespace {

// The mask of blocks selected by a given threshold: every block whose score is below it, and the
// first `ties` blocks (by index) whose score equals it (NaN ranks above every number, and equals NaN).
template <typename T>
void selected_mask_kernel(T* data, int64_t ld, const BlockGrid& grid, const float* scores, float threshold,
                          int64_t ties, int64_t zeros_per_block, int norm, bool packed, at::Tensor& mask) {
  const int64_t num_blocks = grid.num_blocks();
  if (num_blocks == 0 || zeros_per_block == 0) {
    fill_ones(mask, packed, grid.rows * grid.cols);
    return;
  }
  Plan<T> plan{data, ld, grid, zeros_per_block, norm, false};
  const ZeroMode mode = zero_mode(grid, zeros_per_block);
  const at::Tensor keys = per_block_buffer(mask, num_blocks, at::kInt);
  uint32_t* key_data = reinterpret_cast<uint32_t*>(keys.data_ptr<int32_t>());
  const uint32_t threshold_key = order_key(threshold);
  const cpu::Chunking chunks = cpu::make_chunking(num_blocks, kScoreGrain);
  // the keys, and equal_per_chunk's counts in the same pass (index_of_tied takes them)
  std::vector<int64_t> equal(chunks.count, 0);
  at::parallel_for(0, chunks.count, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t count = 0;
      for (int64_t i = chunks.begin(c), end = chunks.end(c); i < end; ++i) {
        key_data[i] = order_key(scores[i]);
        count += key_data[i] == threshold_key;
      }
      equal[c] = count;
    }
  });
  const auto key_at = [key_data](int64_t i) { return key_data[i]; };
  int64_t num_equal = 0;
  for (const int64_t count : equal) num_equal += count;
  plan.keys = key_data;
  plan.threshold_key = threshold_key;
  if (ties == 0) {
    plan.last_tied_block = -1;
  } else if (ties < num_equal) {
    plan.last_tied_block = cpu::index_of_tied(chunks, key_at, threshold_key, ties, equal);
  }
  const at::Tensor cuts = mode == ZeroMode::kCut ? per_block_buffer(mask, num_blocks, at::kLong) : at::Tensor();
  if (cuts.defined()) {
    uint64_t* cut_data = reinterpret_cast<uint64_t*>(cuts.data_ptr<int64_t>());
    score_blocks(plan, chunks, nullptr, nullptr, cut_data);
    plan.cuts = cut_data;
  }
  write_planned_mask(plan, mode, packed, false, mask);
}

at::Tensor block_scores_cpu(const at::Tensor& data, at::IntArrayRef block_shape, int64_t norm) {
  TORCH_CHECK(data.device().is_cpu(), "block_scores: data must be a CPU tensor, got ", data.device());
  const BlockGrid grid = check_block_mask_args("block_scores", data, 1.0, block_shape, 0, norm);
  const at::Tensor work = rows_readable_in_place(data) ? data : data.contiguous();
  at::Tensor scores = at::empty({grid.num_blocks()}, data.options().dtype(at::kFloat));
  float* out = scores.data_ptr<float>();
  SPX_DISPATCH_SCORED_TYPES(data.scalar_type(), "block_scores_cpu", [&] {
    using T = typename Storage<scalar_t>::type;
    Plan<T> plan{reinterpret_cast<T*>(work.data_ptr<scalar_t>()), row_stride(work), grid, 0, static_cast<int>(norm), false};
    at::parallel_for(0, grid.num_blocks(), kScoreGrain, [&](int64_t begin, int64_t end) {
      block_scores(plan, begin, end, [out](int64_t i, float mean) { out[i] = mean; });
    });
  });
  return scores;
}

at::Tensor block_norm_mask_select_cpu(const at::Tensor& data, const at::Tensor& scores, double threshold, int64_t ties,
                                      at::IntArrayRef block_shape, int64_t zeros_per_block, int64_t norm, bool packed) {
  const char* op = "block_norm_mask_select";
  TORCH_CHECK(data.device().is_cpu() && scores.device().is_cpu(), op, ": data and scores must be CPU tensors, got ",
              data.device(), " and ", scores.device());
  const BlockGrid grid = check_block_mask_args(op, data, 1.0, block_shape, zeros_per_block, norm);
  check_block_scores_arg(op, scores, grid);
  TORCH_CHECK(ties >= 0, op, ": ties must be >= 0, got ", ties);
  const at::Tensor work = rows_readable_in_place(data) ? data : data.contiguous();
  const at::Tensor contiguous_scores = scores.contiguous();
  at::Tensor mask = empty_mask(data, packed);
  SPX_DISPATCH_SCORED_TYPES(data.scalar_type(), "block_norm_mask_select_cpu", [&] {
    using T = typename Storage<scalar_t>::type;
    selected_mask_kernel<T>(reinterpret_cast<T*>(work.data_ptr<scalar_t>()), row_stride(work), grid,
                            contiguous_scores.data_ptr<float>(), static_cast<float>(threshold), ties, zeros_per_block,
                            static_cast<int>(norm), packed, mask);
  });
  return mask;
}
}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(sparsity_ext, CPU, m) {
  m.impl("block_scores", &cpu::block_scores_cpu);
  m.impl("block_norm_mask_select", &cpu::block_norm_mask_select_cpu);
}

}  // namespace sparsity_ext
