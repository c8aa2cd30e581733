// CPU entry point of block_norm_mask_update_: the mask of mask * data written over the old mask.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/mask_math.h"
#include "common/op_args.h"
#include "cpu/band_select_cpu.h"
#include "cpu/block_scores_cpu.h"
#include "cpu/mask_pass_cpu.h"
#include "cpu/radix_select_cpu.h"

namespace sparsity_ext {
namespace cpu {
namespace {

// The masked weight mask * data is scored and ranked one tile of rows at a time: each tile's product
// is computed into a buffer that stays in cache (in the dtype torch's `mask * data` would give it), and
// the per-tile plans reuse the one-shot kernel's scoring and mask functions on it. The new mask is
// written over the old one tile by tile, after that tile's product was read. Traffic: data and mask
// read once for the scores, again only where the mask pass ranks elements (zeros_per_block < block
// size), and the mask written once; no tensor of data's size is allocated. Whole blocks of one row of 4 or
// 8 columns take the band selection instead (update_band): the mask written in the scoring pass.
// A weight already masked at the same level has its zeroed blocks tied at the lowest key; the band counts
// them below itself (see sample_band).
constexpr int64_t kUpdateTileBytes = 128 << 10;  // product bytes per tile

template <typename P>
Plan<P> tile_plan(const Plan<P>& whole, P* tile, int64_t first_row, int64_t rows) {
  Plan<P> plan = whole;
  plan.data = tile;
  plan.ld = whole.grid.cols;
  plan.grid = make_block_grid(rows, whole.grid.cols, whole.grid.block_rows, whole.grid.block_cols);
  const int64_t first_block = first_row / whole.grid.block_rows * whole.grid.grid_cols;
  if (whole.keys) plan.keys = whole.keys + first_block;
  if (plan.last_tied_block != INT64_MAX) plan.last_tied_block -= first_block;
  return plan;
}

// keep_range over a whole tile plan, dispatched on the zero mode and the block width like write_mask.
template <typename P>
void tile_keep(const Plan<P>& plan, ZeroMode mode, bool* keep) {
  const int64_t n = plan.grid.rows * plan.grid.cols;
  const bool row4 = plan.grid.block_rows == 1 && plan.grid.block_cols == 4;
  const bool row8 = plan.grid.block_rows == 1 && plan.grid.block_cols == 8;
  switch (mode) {
    case ZeroMode::kWholeBlock:
      if (row4) return keep_range<ZeroMode::kWholeBlock, 4, false>(plan, 0, n, keep);
      if (row8) return keep_range<ZeroMode::kWholeBlock, 8, false>(plan, 0, n, keep);
      return keep_range<ZeroMode::kWholeBlock, 0, false>(plan, 0, n, keep);
    case ZeroMode::kRowRank:
      if (row4) return keep_range<ZeroMode::kRowRank, 4, false>(plan, 0, n, keep);
      if (row8) return keep_range<ZeroMode::kRowRank, 8, false>(plan, 0, n, keep);
      return keep_range<ZeroMode::kRowRank, 0, false>(plan, 0, n, keep);
    case ZeroMode::kCut:
      return keep_range<ZeroMode::kCut, 0, false>(plan, 0, n, keep);
  }
}

// out[c] = flags[c] as an M (bool, or a float type: 1 or 0). Integer arithmetic on the flags' bytes, as the
// loop vectorizes that way (loads of bool and conversions to c10::Half do not).
template <typename M>
void write_flags_as(const bool* flags, M* out, int64_t n) {
  if constexpr (std::is_same_v<M, bool>) {
    std::memcpy(out, flags, n);
  } else {
    using Bits = std::conditional_t<sizeof(M) == 4, uint32_t, uint16_t>;
    static_assert(sizeof(M) == sizeof(Bits), "write_flags_as: unsupported mask element size");
    const M one_value(1.0f);
    Bits one;
    std::memcpy(&one, &one_value, sizeof(Bits));
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(flags);
    for (int64_t c = 0; c < n; ++c) {
      const Bits value = static_cast<Bits>(bytes[c] * one);
      std::memcpy(out + c, &value, sizeof(Bits));
    }
  }
}

enum class UpdateBand { kNotTaken, kDone, kKeysWritten };

// band_mask's one-pass selection for update_mask_kernel's whole-block masks of one-row blocks of kWidth
// columns: the product is scored tile by tile and the new mask written over the old one straight away,
// with every block's key also stored to `keys`. kDone: the mask is finished. kKeysWritten: the band
// missed; the mask is partly written and `keys` holds every block's key, from which a whole-block mask
// can be written without the (overwritten) old mask. kNotTaken: nothing was written.
// product_row(row, col, n, out) writes the product of the row's elements [col, col + n) to out.
template <int kWidth, typename S, typename M, class ProductRow>
UpdateBand update_band(const Plan<S>& whole, int64_t k, int64_t tile_rows, const ProductRow& product_row, M* mask,
                       int64_t mask_ld, uint32_t* keys) {
  const BlockGrid& g = whole.grid;
  const auto sample_run = [&](int64_t first, uint32_t* run_keys) {
    S run[kBandRun * kWidth];
    for (int64_t j = 0; j < kBandRun; ++j) {
      const int64_t row = (first + j) / g.grid_cols;
      product_row(row, (first + j - row * g.grid_cols) * kWidth, kWidth, run + j * kWidth);
    }
    Plan<S> plan = whole;
    plan.data = run;
    plan.ld = kBandRun * kWidth;
    plan.grid = make_block_grid(1, kBandRun * kWidth, 1, kWidth);
    score_run(plan, 0, run_keys);
  };
  Band band;
  if (!sample_band(g.num_blocks(), k, sample_run, band)) return UpdateBand::kNotTaken;
  const int64_t num_tiles = (g.rows + tile_rows - 1) / tile_rows;
  std::vector<BandTask> tasks(num_tiles);
  for (BandTask& task : tasks) task.cap = tile_rows * g.grid_cols / 8 + 64;
  at::parallel_for(0, num_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<S> buffer(tile_rows * g.cols);
    std::unique_ptr<bool[]> keep(new bool[tile_rows * g.cols]);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * tile_rows, rows = std::min(tile_rows, g.rows - r0);
      for (int64_t r = 0; r < rows; ++r) product_row(r0 + r, 0, g.cols, buffer.data() + r * g.cols);
      const Plan<S> plan = tile_plan(whole, buffer.data(), r0, rows);
      band_blocks<ZeroMode::kWholeBlock, kWidth>(plan, band, 0, plan.grid.num_blocks(), buffer.data(), keep.get(),
                                                 r0 * g.grid_cols, keys, tasks[t]);
      for (int64_t r = 0; r < rows; ++r) write_flags_as(keep.get() + r * g.cols, mask + (r0 + r) * mask_ld, g.cols);
    }
  });
  std::vector<uint32_t> band_keys;
  std::vector<uint8_t> selected;
  if (!select_in_band(tasks, k, band_keys, selected)) return UpdateBand::kKeysWritten;
  for_each_selected_record(tasks, selected, [&](int64_t block) {
    const int64_t row = block / g.grid_cols;
    std::fill_n(mask + row * mask_ld + (block - row * g.grid_cols) * kWidth, kWidth, M(0));
  });
  return UpdateBand::kDone;
}

// T data, M mask, P = the dtype of mask * data (M is bool, T or float).
template <typename T, typename M, typename P>
void update_mask_kernel(const T* data, int64_t ld, M* mask, int64_t mask_ld, const BlockGrid& grid,
                        double sparsity_level, int64_t zeros_per_block, int norm) {
  const int64_t num_blocks = grid.num_blocks();
  const int64_t k = num_selected_blocks(sparsity_level, num_blocks);
  const ZeroMode mode = zero_mode(grid, zeros_per_block);
  const auto fill = [&](M value) {
    at::parallel_for(0, grid.rows, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) std::fill(mask + r * mask_ld, mask + r * mask_ld + grid.cols, value);
    });
  };
  if (k == 0 || zeros_per_block == 0) return fill(M(1));
  const bool all_selected = k == num_blocks;
  if (all_selected && mode == ZeroMode::kWholeBlock) return fill(M(0));

  const int64_t row_bytes = std::max<int64_t>(1, grid.cols * static_cast<int64_t>(sizeof(P)));
  const int64_t tile_rows = std::max<int64_t>(1, kUpdateTileBytes / row_bytes / grid.block_rows) * grid.block_rows;
  const int64_t num_tiles = (grid.rows + tile_rows - 1) / tile_rows;
  using S = typename Storage<P>::type;
  const auto product_row = [&](int64_t row, int64_t col, int64_t n, S* out_storage) {
    const T* x = data + row * ld + col;
    const M* m = mask + row * mask_ld + col;
    P* out = reinterpret_cast<P*>(out_storage);
    for (int64_t c = 0; c < n; ++c) out[c] = static_cast<P>(static_cast<float>(m[c]) * static_cast<float>(x[c]));
  };
  const auto product = [&](int64_t r0, int64_t rows, P* out) {
    for (int64_t r = 0; r < rows; ++r) product_row(r0 + r, 0, grid.cols, reinterpret_cast<S*>(out + r * grid.cols));
  };
  Plan<S> whole{nullptr, grid.cols, grid, zeros_per_block, norm, all_selected};
  const at::Tensor keys = all_selected ? at::Tensor() : at::empty({num_blocks}, at::TensorOptions().dtype(at::kInt));
  if (!all_selected) {
    uint32_t* key_data = reinterpret_cast<uint32_t*>(keys.data_ptr<int32_t>());
    UpdateBand band = UpdateBand::kNotTaken;
    if (mode == ZeroMode::kWholeBlock && grid.block_rows == 1 && num_blocks >= kBandMinBlocks) {
      if (grid.block_cols == 4 && grid.cols % 4 == 0) {
        band = update_band<4>(whole, k, tile_rows, product_row, mask, mask_ld, key_data);
      } else if (grid.block_cols == 8 && grid.cols % 8 == 0) {
        band = update_band<8>(whole, k, tile_rows, product_row, mask, mask_ld, key_data);
      }
    }
    if (band == UpdateBand::kDone) return;
    if (band == UpdateBand::kNotTaken) {
      at::parallel_for(0, num_tiles, 1, [&](int64_t t0, int64_t t1) {
        std::vector<P> buffer(tile_rows * grid.cols);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t r0 = t * tile_rows, rows = std::min(tile_rows, grid.rows - r0);
          product(r0, rows, buffer.data());
          Plan<S> plan = tile_plan(whole, reinterpret_cast<S*>(buffer.data()), r0, rows);
          uint32_t* tile_keys = key_data + r0 / grid.block_rows * grid.grid_cols;
          block_scores(plan, 0, plan.grid.num_blocks(), [tile_keys](int64_t i, float mean) { tile_keys[i] = order_key(mean); });
        }
      });
    }
    const cpu::Chunking chunks = cpu::make_chunking(num_blocks, kScoreGrain);
    const auto key_at = [key_data](int64_t i) { return key_data[i]; };
    const RadixState state = cpu::radix_select(chunks, key_at, k, nullptr);
    whole.keys = key_data;
    whole.threshold_key = state.prefix;
    if (state.rank < state.equal) whole.last_tied_block = cpu::index_of_tied(chunks, key_at, state.prefix, state.rank);
  }
  const bool ranks_elements = mode != ZeroMode::kWholeBlock;
  at::parallel_for(0, num_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<P> buffer(ranks_elements ? tile_rows * grid.cols : 0);
    std::vector<uint64_t> cuts(mode == ZeroMode::kCut ? tile_rows / grid.block_rows * grid.grid_cols : 0);
    std::vector<uint64_t> scratch;
    std::unique_ptr<bool[]> keep(new bool[tile_rows * grid.cols]);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * tile_rows, rows = std::min(tile_rows, grid.rows - r0);
      if (ranks_elements) product(r0, rows, buffer.data());
      Plan<S> plan = tile_plan(whole, reinterpret_cast<S*>(buffer.data()), r0, rows);
      if (mode == ZeroMode::kCut) {
        for (int64_t b = 0; b < plan.grid.num_blocks(); ++b) {
          cuts[b] = block_cut_cpu(plan, b / plan.grid.grid_cols, b % plan.grid.grid_cols, scratch);
        }
        plan.cuts = cuts.data();
      }
      tile_keep(plan, mode, keep.get());
      for (int64_t r = 0; r < rows; ++r) write_flags_as(keep.get() + r * grid.cols, mask + (r0 + r) * mask_ld, grid.cols);
    }
  });
}

void block_norm_mask_update__cpu(const at::Tensor& data, at::Tensor& mask, double sparsity_level,
                                 at::IntArrayRef block_shape, int64_t zeros_per_block, int64_t norm) {
  const char* op = "block_norm_mask_update_";
  TORCH_CHECK(data.device().is_cpu() && mask.device().is_cpu(), op, ": data and mask must be CPU tensors, got ",
              data.device(), " and ", mask.device());
  const BlockGrid grid = check_block_mask_args(op, data, sparsity_level, block_shape, zeros_per_block, norm);
  check_update_mask_arg(op, data, mask);
  TORCH_CHECK(rows_readable_in_place(mask), op, ": mask rows must be contiguous (unit column stride)");
  const at::Tensor work = rows_readable_in_place(data) ? data : data.contiguous();
  SPX_DISPATCH_SCORED_TYPES(data.scalar_type(), "block_norm_mask_update__cpu", [&] {
    using T = scalar_t;
    const auto run = [&](auto mask_tag, auto product_tag) {
      using M = decltype(mask_tag);
      using P = decltype(product_tag);
      update_mask_kernel<T, M, P>(work.data_ptr<T>(), row_stride(work), mask.data_ptr<M>(), row_stride(mask), grid,
                                  sparsity_level, zeros_per_block, static_cast<int>(norm));
    };
    if (mask.scalar_type() == at::kBool) return run(bool{}, T{});
    if (mask.scalar_type() == data.scalar_type()) return run(T{}, T{});
    return run(float{}, float{});
  });
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(sparsity_ext, CPU, m) {
  m.impl("block_norm_mask_update_", &cpu::block_norm_mask_update__cpu);
}

}  // namespace sparsity_ext
