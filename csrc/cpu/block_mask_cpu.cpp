// CPU kernels of the block-norm masks: block_norm_mask, block_norm_mask_apply_, nm_mask.
//
// Pipeline (DESIGN.md "Algorithms"): one scoring pass writes one order key per block (and pass 0 of
// the radix histogram); a radix select finds the k-th smallest key and the tie cut-off; one pass over
// the flat element range writes the mask (bool, or packed bits with each task owning whole bytes) and,
// for the _apply_ variant, zeroes the data in place. Extra memory: 4 bytes per block (+8 per block
// when blocks with zeros_per_block < block size are too large for in-register ranking).
//
// Strided input: a unit column stride and any row stride >= cols are read in place; other layouts
// are copied to a contiguous buffer first (and, for _apply_, the zeroed buffer is copied back).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "common/mask_math.h"
#include "common/op_args.h"
#include "cpu/radix_select_cpu.h"

namespace sparsity_ext {
namespace {

constexpr int64_t kScoreGrain = 1 << 14;  // blocks per scoring chunk
constexpr int64_t kMaskUnit = 64;         // mask tasks start at multiples of 64 elements (whole bytes)
constexpr int64_t kMaskGrain = 1 << 16;   // elements per mask task
constexpr int64_t kPackTile = 4096;       // elements staged as bools before packing

// How the elements of a selected block are chosen.
enum class ZeroMode {
  kWholeBlock,  // zeros_per_block >= block size: every valid element
  kRowRank,     // one-row blocks of <= 32 elements: ranked in registers while the mask is written
  kCut,         // any other block: a per-block cut computed beforehand (smallest_z_cut)
};

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

// Writes keep flags for the flat range [begin, end) to keep[0, end - begin), zeroing data where a
// flag is false when kApply.
template <ZeroMode kMode, int kGroup, bool kApply, typename T>
void keep_range(const Plan<T>& plan, int64_t begin, int64_t end, bool* keep) {
  const BlockGrid& g = plan.grid;
  for_each_block_run(begin, end, g.cols, g.block_cols, [&](int64_t row, int64_t block_col, int64_t c0, int64_t c1,
                                                          int64_t offset) {
    const int64_t block_row = g.block_rows == 1 ? row : row / g.block_rows;
    const int64_t block = block_row * g.grid_cols + block_col;
    bool* out = keep + offset;
    const int64_t len = c1 - c0;
    if (!plan.all_selected &&
        !block_selected(plan.keys[block], block, plan.threshold_key, plan.last_tied_block)) {
      std::memset(out, 1, len);
      return;
    }
    T* row_ptr = plan.data + row * plan.ld;
    const int64_t block_c0 = block_col * g.block_cols;
    if constexpr (kMode == ZeroMode::kWholeBlock) {
      std::memset(out, 0, len);
    } else if constexpr (kMode == ZeroMode::kRowRank) {
      const uint32_t zero_bits = row_group_zero_bits<kGroup>(row_ptr + block_c0, static_cast<int>(g.valid_cols(block_col)),
                                                             plan.zeros_per_block, plan.norm);
      for (int64_t c = c0; c < c1; ++c) out[c - c0] = !((zero_bits >> (c - block_c0)) & 1u);
    } else {
      const uint64_t cut = plan.cuts[block];
      const int64_t row_base = (row - block_row * g.block_rows) * g.valid_cols(block_col) - block_c0;
      for (int64_t c = c0; c < c1; ++c) out[c - c0] = cut_key(element_key(row_ptr[c], plan.norm), row_base + c) > cut;
    }
    if constexpr (kApply) {
      for (int64_t c = c0; c < c1; ++c) {
        if (!out[c - c0]) row_ptr[c] = T{};
      }
    }
  });
}

// Bits 0..7 of the result are the 8 bools (0/1 bytes) of `word`, lowest address first.
inline uint8_t pack8(const bool* flags) {
  uint64_t word;
  std::memcpy(&word, flags, 8);
  return static_cast<uint8_t>((word * 0x0102040810204080ull) >> 56);
}

template <ZeroMode kMode, int kGroup, bool kApply, typename T>
void write_mask(const Plan<T>& plan, at::Tensor& mask, bool packed) {
  const int64_t numel = plan.grid.rows * plan.grid.cols;
  const int64_t units = (numel + kMaskUnit - 1) / kMaskUnit;
  if (!packed) {
    bool* out = mask.data_ptr<bool>();
    at::parallel_for(0, units, kMaskGrain / kMaskUnit, [&](int64_t u0, int64_t u1) {
      const int64_t begin = u0 * kMaskUnit, end = std::min(u1 * kMaskUnit, numel);
      keep_range<kMode, kGroup, kApply>(plan, begin, end, out + begin);
    });
    return;
  }
  uint8_t* out = mask.data_ptr<uint8_t>();
  at::parallel_for(0, units, kMaskGrain / kMaskUnit, [&](int64_t u0, int64_t u1) {
    alignas(8) bool keep[kPackTile];
    for (int64_t begin = u0 * kMaskUnit; begin < std::min(u1 * kMaskUnit, numel); begin += kPackTile) {
      const int64_t end = std::min({begin + kPackTile, u1 * kMaskUnit, numel});
      keep_range<kMode, kGroup, kApply>(plan, begin, end, keep);
      const int64_t count = end - begin;
      const int64_t full_bytes = count / 8;
      uint8_t* dst = out + begin / 8;
      for (int64_t j = 0; j < full_bytes; ++j) dst[j] = pack8(keep + 8 * j);
      if (count % 8 != 0) {  // the last byte of the mask: bits past numel stay 0, as pack_mask writes them
        uint8_t byte = 0;
        for (int64_t i = 0; i < count % 8; ++i) byte |= static_cast<uint8_t>(keep[8 * full_bytes + i]) << i;
        dst[full_bytes] = byte;
      }
    }
  });
}

template <ZeroMode kMode, int kGroup, typename T>
void write_mask(const Plan<T>& plan, at::Tensor& mask, bool packed, bool apply) {
  if (apply) {
    write_mask<kMode, kGroup, true>(plan, mask, packed);
  } else {
    write_mask<kMode, kGroup, false>(plan, mask, packed);
  }
}

// Keys of every block (+ pass 0 of the histogram), and the cuts when kCut.
template <typename T>
void score_blocks(const Plan<T>& plan, const cpu::Chunking& chunks, uint32_t* keys, uint64_t* cuts,
                  std::vector<int64_t>* first_pass_hist) {
  const BlockGrid& g = plan.grid;
  std::vector<int64_t> per_chunk = keys ? cpu::chunk_histograms(chunks) : std::vector<int64_t>();
  at::parallel_for(0, chunks.count, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* hist = keys ? per_chunk.data() + c * kRadixBins : nullptr;
      const int64_t begin = chunks.begin(c), end = chunks.end(c);
      int64_t block_row = begin / g.grid_cols, block_col = begin - block_row * g.grid_cols;
      for (int64_t b = begin; b < end; ++b) {
        if (keys) {
          const uint32_t key = order_key(block_mean_norm(plan.data, plan.ld, g, block_row, block_col, plan.norm));
          keys[b] = key;
          ++hist[radix_digit(key, 0)];
        }
        if (cuts) cuts[b] = block_zero_cut(plan.data, plan.ld, g, block_row, block_col, plan.zeros_per_block, plan.norm);
        if (++block_col == g.grid_cols) {
          block_col = 0;
          ++block_row;
        }
      }
    }
  });
  if (keys) *first_pass_hist = cpu::merge_histograms(per_chunk, chunks.count);
}

void fill_ones(at::Tensor& mask, bool packed, int64_t numel) {
  if (!packed) {
    mask.fill_(true);
    return;
  }
  mask.fill_(0xFF);
  if (numel % 8 != 0) mask[-1] = static_cast<uint8_t>((1u << (numel % 8)) - 1u);
}

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
  const ZeroMode mode = zeros_per_block >= grid.block_size() ? ZeroMode::kWholeBlock
                        : (grid.block_rows == 1 && grid.block_cols <= 32) ? ZeroMode::kRowRank
                                                                          : ZeroMode::kCut;
  std::vector<uint32_t> keys;
  std::vector<uint64_t> cuts;
  if (!plan.all_selected || mode == ZeroMode::kCut) {
    const cpu::Chunking chunks = cpu::make_chunking(num_blocks, kScoreGrain);
    if (!plan.all_selected) keys.resize(num_blocks);
    if (mode == ZeroMode::kCut) cuts.resize(num_blocks);
    std::vector<int64_t> first_pass_hist;
    score_blocks(plan, chunks, keys.empty() ? nullptr : keys.data(), cuts.empty() ? nullptr : cuts.data(),
                 &first_pass_hist);
    plan.cuts = cuts.empty() ? nullptr : cuts.data();
    if (!plan.all_selected) {
      const uint32_t* key_data = keys.data();
      const auto key_at = [key_data](int64_t i) { return key_data[i]; };
      const RadixState state = cpu::radix_select(chunks, key_at, k, &first_pass_hist);
      plan.keys = key_data;
      plan.threshold_key = state.prefix;
      if (state.rank < state.equal) plan.last_tied_block = cpu::index_of_tied(chunks, key_at, state.prefix, state.rank);
    }
  }
  switch (mode) {
    case ZeroMode::kWholeBlock:
      write_mask<ZeroMode::kWholeBlock, 1>(plan, mask, packed, apply);
      break;
    case ZeroMode::kCut:
      write_mask<ZeroMode::kCut, 1>(plan, mask, packed, apply);
      break;
    case ZeroMode::kRowRank:
      if (grid.block_cols <= 4) {
        write_mask<ZeroMode::kRowRank, 4>(plan, mask, packed, apply);
      } else if (grid.block_cols <= 8) {
        write_mask<ZeroMode::kRowRank, 8>(plan, mask, packed, apply);
      } else if (grid.block_cols <= 16) {
        write_mask<ZeroMode::kRowRank, 16>(plan, mask, packed, apply);
      } else {
        write_mask<ZeroMode::kRowRank, 32>(plan, mask, packed, apply);
      }
      break;
  }
}

at::Tensor block_mask_cpu(const char* op, const at::Tensor& data, double sparsity_level, at::IntArrayRef block_shape,
                          int64_t zeros_per_block, int64_t norm, bool packed, bool apply) {
  TORCH_CHECK(data.device().is_cpu(), op, ": data must be a CPU tensor, got ", data.device());
  const BlockGrid grid = check_block_mask_args(op, data, sparsity_level, block_shape, zeros_per_block, norm);
  at::Tensor work = rows_readable_in_place(data) ? data : data.contiguous();
  at::Tensor mask = empty_mask(data, packed);
  SPX_DISPATCH_SCORED_TYPES(data.scalar_type(), "block_mask_cpu", [&] {
    using T = typename Storage<scalar_t>::type;
    block_mask_kernel<T>(reinterpret_cast<T*>(work.data_ptr<scalar_t>()), row_stride(work), grid, sparsity_level,
                         zeros_per_block, static_cast<int>(norm), packed, apply, mask);
  });
  if (apply && !work.is_same(data)) data.copy_(work);
  return mask;
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

TORCH_LIBRARY_IMPL(sparsity_ext, CPU, m) {
  m.impl("block_norm_mask", &block_norm_mask_cpu);
  m.impl("block_norm_mask_apply_", &block_norm_mask_apply__cpu);
  m.impl("nm_mask", &nm_mask_cpu);
}

}  // namespace sparsity_ext
