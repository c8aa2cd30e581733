// CPU entry points of the block-norm masks: block_norm_mask, block_norm_mask_apply_, block_norm_mask_into_
// and nm_mask, and the flow they share (block_mask_kernel).
//
// Pipeline (docs/design.md "Algorithms"): one scoring pass writes one order key per block and pass 0 of
// the radix histogram, 11-bit digits (block_scores_cpu.h); a radix select finds the k-th smallest key
// (pass 1 over all keys gathers the survivors of pass 0 when they are at most half, pass 2 reads only
// those) and, when ties at the threshold are split, the last selected block (radix_select_cpu.h); one
// pass over the flat element range writes the mask and, for the _apply_ variant, zeroes the data in place
// (mask_pass_cpu.h). Extra memory: 4 bytes per block, +8 per block for the cuts of blocks that are not one
// row of <= 32 columns when zeros_per_block < block size.
//
// Large tables of one-row blocks of 4 or 8 columns first try a single pass instead (band_select_cpu.h):
// scores and mask in one read of the data, no per-block buffer.
//
// Strided input: a unit column stride and any row stride >= cols are read in place; other layouts
// are copied to a contiguous buffer first (and, for _apply_, the zeroed buffer is copied back).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "common/mask_math.h"
#include "common/op_args.h"
#include "cpu/band_select_cpu.h"
#include "cpu/block_scores_cpu.h"
#include "cpu/mask_pass_cpu.h"
#include "cpu/radix_select_cpu.h"

namespace sparsity_ext {
namespace cpu {
namespace {

template <typename T>
void block_mask_kernel(T* data, int64_t ld, const BlockGrid& grid, double sparsity_level, int64_t zeros_per_block,
                       int norm, bool packed, bool apply, at::Tensor& mask) {
  const int64_t num_blocks = grid.num_blocks();
  const int64_t k = num_selected_blocks(sparsity_level, num_blocks);
  if (k == 0 || zeros_per_block == 0) {
    fill_ones(mask, packed, grid.rows * grid.cols);
    return;
  }
  Plan<T> plan{data, ld, grid, zeros_per_block, norm, k == num_blocks};
  const ZeroMode mode = zero_mode(grid, zeros_per_block);
  if (try_band_mask(plan, mode, k, packed, mask)) {
    if (apply) zero_dropped(plan, mask, packed);
    return;
  }
  const at::Tensor keys = plan.all_selected ? at::Tensor() : per_block_buffer(mask, num_blocks, at::kInt);
  const at::Tensor cuts = mode == ZeroMode::kCut ? per_block_buffer(mask, num_blocks, at::kLong) : at::Tensor();
  if (keys.defined() || cuts.defined()) {
    const cpu::Chunking chunks = cpu::make_chunking(num_blocks, kScoreGrain);
    cpu::ChunkHistograms first_pass(chunks.count);
    uint32_t* key_data = keys.defined() ? reinterpret_cast<uint32_t*>(keys.data_ptr<int32_t>()) : nullptr;
    uint64_t* cut_data = cuts.defined() ? reinterpret_cast<uint64_t*>(cuts.data_ptr<int64_t>()) : nullptr;
    score_blocks(plan, chunks, key_data, &first_pass, cut_data);
    plan.cuts = cut_data;
    if (key_data) {
      const auto key_at = [key_data](int64_t i) { return key_data[i]; };
      const RadixState state = cpu::radix_select(chunks, key_at, k, &first_pass);
      plan.keys = key_data;
      plan.threshold_key = state.prefix;
      if (state.rank < state.equal) plan.last_tied_block = cpu::index_of_tied(chunks, key_at, state.prefix, state.rank);
    }
  }
  write_planned_mask(plan, mode, packed, apply, mask);
}

// The mask of data into `mask` (bool or packed, contiguous; see block_norm_mask_into_), data zeroed where
// it is 0 when `apply`.
void block_mask_into_cpu(const char* op, const at::Tensor& data, at::Tensor& mask, double sparsity_level,
                         at::IntArrayRef block_shape, int64_t zeros_per_block, int64_t norm, bool packed, bool apply) {
  TORCH_CHECK(data.device().is_cpu(), op, ": data must be a CPU tensor, got ", data.device());
  const BlockGrid grid = check_block_mask_args(op, data, sparsity_level, block_shape, zeros_per_block, norm);
  at::Tensor work = rows_readable_in_place(data) ? data : data.contiguous();
  SPX_DISPATCH_SCORED_TYPES(data.scalar_type(), "block_mask_cpu", [&] {
    using T = typename Storage<scalar_t>::type;
    block_mask_kernel<T>(reinterpret_cast<T*>(work.data_ptr<scalar_t>()), row_stride(work), grid, sparsity_level,
                         zeros_per_block, static_cast<int>(norm), packed, apply, mask);
  });
  if (apply && !work.is_same(data)) data.copy_(work);
}

at::Tensor block_mask_cpu(const char* op, const at::Tensor& data, double sparsity_level, at::IntArrayRef block_shape,
                          int64_t zeros_per_block, int64_t norm, bool packed, bool apply) {
  at::Tensor mask = empty_mask(data, packed);
  block_mask_into_cpu(op, data, mask, sparsity_level, block_shape, zeros_per_block, norm, packed, apply);
  return mask;
}

void block_norm_mask_into__cpu(const at::Tensor& data, at::Tensor& mask, double sparsity_level,
                               at::IntArrayRef block_shape, int64_t zeros_per_block, int64_t norm) {
  const char* op = "block_norm_mask_into_";
  TORCH_CHECK(mask.device().is_cpu(), op, ": mask must be a CPU tensor, got ", mask.device());
  const bool packed = check_mask_format_arg(op, data, mask);
  TORCH_CHECK(mask.is_contiguous(), op, ": mask must be contiguous");
  block_mask_into_cpu(op, data, mask, sparsity_level, block_shape, zeros_per_block, norm, packed, false);
}

at::Tensor block_norm_mask_cpu(const at::Tensor& data, double sparsity_level, at::IntArrayRef block_shape,
                               int64_t zeros_per_block, int64_t norm, bool packed) {
  return block_mask_cpu("block_norm_mask", data, sparsity_level, block_shape, zeros_per_block, norm, packed, false);
}

at::Tensor block_norm_mask_apply__cpu(at::Tensor& data, double sparsity_level, at::IntArrayRef block_shape,
                                      int64_t zeros_per_block, int64_t norm, bool packed) {
  return block_mask_cpu("block_norm_mask_apply_", data, sparsity_level, block_shape, zeros_per_block, norm, packed,
                        true);
}

at::Tensor nm_mask_cpu(const at::Tensor& data, int64_t n, int64_t m) {
  check_nm_args(n, m);
  // N:M is the block contract with s = 1, blocks (1, m), m - n zeros per block, ranked by |x|.
  const int64_t block_shape[2] = {1, m};
  return block_mask_cpu("nm_mask", data, 1.0, block_shape, m - n, 1, false, false);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(sparsity_ext, CPU, m) {
  m.impl("block_norm_mask", &cpu::block_norm_mask_cpu);
  m.impl("block_norm_mask_apply_", &cpu::block_norm_mask_apply__cpu);
  m.impl("nm_mask", &cpu::nm_mask_cpu);
  m.impl("block_norm_mask_into_", &cpu::block_norm_mask_into__cpu);
}

}  // namespace sparsity_ext
