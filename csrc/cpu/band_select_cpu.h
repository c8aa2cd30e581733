// CPU one-pass band selection of the block-norm masks (see below), used by block_norm_mask /
// block_norm_mask_apply_ (band_mask) and block_norm_mask_update_ (its own tiling over the product).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/mask_math.h"
#include "cpu/block_scores_cpu.h"
#include "cpu/mask_pass_cpu.h"
#include "cpu/radix_select_cpu.h"

namespace sparsity_ext {
namespace cpu {

// Most blocks lie far from the selection threshold. A sample of block keys brackets the threshold key in
// a band [lo, hi]; one pass over the data then scores every block and writes its mask at once (key < lo:
// selected; otherwise kept for now), counts the blocks below lo and records the few inside the band. If
// the counts put the k-th smallest key inside the band, it is found among the recorded blocks, whose
// mask is then rewritten where they are selected: the keyed pipeline's mask, bit for bit, with the data
// read once and no per-block buffer. Otherwise (an unlucky sample, or a tie run too long to record) the
// keyed pipeline runs and rewrites the whole mask. Taken for one-row blocks of kWidth (4 or 8) columns
// tiling the rows exactly, where the scores and the mask come from the same tile of data.
inline constexpr int64_t kBandMinBlocks = int64_t{1} << 18;  // below this, the keyed pipeline is as fast (>= 256 runs)
inline constexpr int64_t kBandRun = 16;                      // sampled blocks are runs of consecutive blocks
inline constexpr int64_t kBandMaxRuns = 4096;
inline constexpr int64_t kBandTile = 512;                    // blocks scored before their mask is written
inline constexpr int64_t kBandGroup = 16;                    // keys tested for the band together

struct Band {
  uint32_t lo;
  uint32_t hi;
};

// What one mask task saw: blocks below the band, and the blocks in it (index order) with their keys.
struct BandTask {
  int64_t below = 0;
  int64_t cap = 0;  // most blocks recorded; beyond it the task overflows
  bool overflow = false;
  std::vector<int64_t> blocks;
  std::vector<uint32_t> keys;
};

// A band that holds the k-th smallest of the num_blocks block keys unless the sample is very unlucky:
// the sample's order statistics 5 standard deviations (plus a few ranks) either side of its k-th
// quantile, the lower one excluded. False when both are the same key (a long run of ties straddles the
// threshold: the keyed pipeline takes it).
// score_run(first, keys) writes the order keys of blocks [first, first + kBandRun) to keys[0, kBandRun).
template <class ScoreRun>
bool sample_band(int64_t num_blocks, int64_t k, const ScoreRun& score_run, Band& band) {
  const int64_t runs = std::min(kBandMaxRuns, num_blocks / (64 * kBandRun));
  const int64_t stride = num_blocks / runs;
  std::vector<uint32_t> sample(runs * kBandRun);
  at::parallel_for(0, runs, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      // runs start at a hashed offset inside their stretch, so that no period in the data aligns with them
      const uint64_t hash = static_cast<uint64_t>(r + 1) * 0x9E3779B97F4A7C15ull;
      const int64_t first = r * stride + static_cast<int64_t>((hash >> 33) % static_cast<uint64_t>(stride - kBandRun + 1));
      score_run(first, sample.data() + r * kBandRun);
    }
  });
  const double n = static_cast<double>(sample.size());
  const double p = static_cast<double>(k) / static_cast<double>(num_blocks);
  const double margin = 5.0 * std::sqrt(n * p * (1.0 - p)) + 8.0;
  const int64_t lo_rank = static_cast<int64_t>(std::floor(p * n - margin));
  const int64_t hi_rank = static_cast<int64_t>(std::ceil(p * n + margin));
  const auto nth = [&](int64_t rank) {
    std::nth_element(sample.begin(), sample.begin() + rank, sample.end());
    return sample[rank];
  };
  band.hi = hi_rank >= static_cast<int64_t>(sample.size()) ? UINT32_MAX : nth(hi_rank);
  if (lo_rank < 0) {
    band.lo = 0;
    return true;
  }
  // Blocks with the lo_rank-th sampled key are below the band, so that a run of ties there (the
  // zeroed blocks of an already masked weight) is counted rather than recorded.
  const uint32_t lo_key = nth(lo_rank);
  band.lo = lo_key + 1;
  return lo_key != band.hi;
}

// Blocks [first_block, first_block + count) of `plan`, stored contiguously from `elements`: scores them,
// writes their keep flags to `out` with the blocks below band.lo selected and the others kept, and
// counts and records them into `task` as blocks index_offset + i (and stores their keys to
// keys_out[index_offset + i] when keys_out is given).
template <ZeroMode kMode, int kWidth, typename T>
void band_blocks(const Plan<T>& plan, const Band& band, int64_t first_block, int64_t count, const T* elements,
                 bool* out, int64_t index_offset, uint32_t* keys_out, BandTask& task) {
  uint32_t tile_keys[kBandTile];
  for (int64_t first = first_block; first < first_block + count; first += kBandTile) {
    const int64_t n = std::min(kBandTile, first_block + count - first);
    uint32_t* keys = tile_keys - first;
    block_scores(plan, first, first + n, [keys](int64_t i, float mean) { keys[i] = order_key(mean); });
    if (keys_out) std::memcpy(keys_out + index_offset + first, tile_keys, n * sizeof(uint32_t));
    const uint32_t lo = band.lo, width = band.hi - band.lo;
    int64_t below = 0;
    for (int64_t i = 0; i < n; ++i) below += tile_keys[i] < lo;  // a loop of its own: it vectorizes
    task.below += below;
    for (int64_t g0 = 0; g0 < n; g0 += kBandGroup) {
      const int64_t g1 = std::min(n, g0 + kBandGroup);
      uint32_t in_band = 0;  // most groups have no key in the band
      for (int64_t i = g0; i < g1; ++i) in_band += tile_keys[i] - lo <= width;
      if (in_band == 0) continue;
      for (int64_t i = g0; i < g1; ++i) {
        if (tile_keys[i] - lo > width) continue;
        if (static_cast<int64_t>(task.blocks.size()) == task.cap) {
          task.overflow = true;
          break;
        }
        task.blocks.push_back(index_offset + first + i);
        task.keys.push_back(tile_keys[i]);
      }
    }
    Plan<T> tile = plan;
    tile.keys = keys;
    tile.threshold_key = band.lo;
    tile.last_tied_block = -1;  // key < lo only
    const int64_t skip = (first - first_block) * kWidth;
    keep_full_row_blocks<kMode, kWidth>(tile, elements + skip, first, n, out + skip);
  }
}

// Keep flags of the flat range [begin, end) (whole blocks of whole rows' kWidth-column tiling): band_blocks
// over the blocks it covers.
template <ZeroMode kMode, int kWidth, typename T>
void band_keep_range(const Plan<T>& plan, const Band& band, int64_t begin, int64_t end, bool* keep, BandTask& task) {
  const BlockGrid& g = plan.grid;
  if (plan.ld == g.cols) {  // rows back to back: flat element e is element e % kWidth of block e / kWidth
    return band_blocks<kMode, kWidth>(plan, band, begin / kWidth, (end - begin) / kWidth, plan.data + begin, keep, 0,
                                      nullptr, task);
  }
  for_each_row_segment(begin, end, g.cols, [&](int64_t row, int64_t c0, int64_t c1, int64_t offset) {
    band_blocks<kMode, kWidth>(plan, band, row * g.grid_cols + c0 / kWidth, (c1 - c0) / kWidth,
                               plan.data + row * plan.ld + c0, keep + offset, 0, nullptr, task);
  });
}

// The blocks of `tasks` selected as the k-th smallest of all keys dictates (the rest of the k lie below
// the band), as flags in the tasks' record order; false when the counts put the k-th key outside the band.
inline bool select_in_band(const std::vector<BandTask>& tasks, int64_t k, std::vector<uint32_t>& keys,
                           std::vector<uint8_t>& selected) {
  int64_t below = 0, recorded = 0;
  for (const BandTask& task : tasks) {
    if (task.overflow) return false;
    below += task.below;
    recorded += static_cast<int64_t>(task.keys.size());
  }
  if (k < below || k > below + recorded) return false;
  selected.assign(recorded, 0);
  if (k == below) return true;
  keys.clear();
  for (const BandTask& task : tasks) keys.insert(keys.end(), task.keys.begin(), task.keys.end());
  const cpu::Chunking chunks = cpu::make_chunking(recorded, kScoreGrain);
  const uint32_t* data = keys.data();
  const auto key_at = [data](int64_t i) { return data[i]; };
  const RadixState state = cpu::radix_select(chunks, key_at, k - below, nullptr);
  const int64_t last_tied = state.rank < state.equal ? cpu::index_of_tied(chunks, key_at, state.prefix, state.rank)
                                                     : INT64_MAX;
  for (int64_t i = 0; i < recorded; ++i) selected[i] = block_selected(keys[i], i, state.prefix, last_tied);
  return true;
}

// Calls visit(block) for each recorded block of `tasks` that select_in_band selected, in parallel over the
// tasks.
template <class Visit>
void for_each_selected_record(const std::vector<BandTask>& tasks, const std::vector<uint8_t>& selected,
                              const Visit& visit) {
  std::vector<int64_t> first_record(tasks.size() + 1, 0);
  for (size_t t = 0; t < tasks.size(); ++t) first_record[t + 1] = first_record[t] + static_cast<int64_t>(tasks[t].blocks.size());
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (size_t j = 0; j < tasks[t].blocks.size(); ++j) {
        if (selected[first_record[t] + j]) visit(tasks[t].blocks[j]);
      }
    }
  });
}

// The order keys of blocks [first, first + kBandRun) of `plan`, for sample_band.
template <typename T>
void score_run(const Plan<T>& plan, int64_t first, uint32_t* keys) {
  uint32_t* out = keys - first;
  block_scores(plan, first, first + kBandRun, [out](int64_t i, float mean) { out[i] = order_key(mean); });
}

// The one-pass mask (see above); false, with the mask partly written, when the keyed pipeline must run.
template <ZeroMode kMode, int kWidth, typename T>
bool band_mask(const Plan<T>& plan, int64_t k, bool packed, at::Tensor& mask) {
  Band band;
  if (!sample_band(plan.grid.num_blocks(), k, [&](int64_t first, uint32_t* keys) { score_run(plan, first, keys); }, band)) {
    return false;
  }
  const BlockGrid& g = plan.grid;
  const int64_t numel = g.rows * g.cols;
  const cpu::Chunking mask_chunks = mask_tasks(numel);
  std::vector<BandTask> tasks(mask_chunks.count);
  for (BandTask& task : tasks) task.cap = g.num_blocks() / mask_chunks.count / 8 + 64;
  fill_mask(numel, mask, packed, [&](int64_t begin, int64_t end, bool* keep, int64_t t) {
    band_keep_range<kMode, kWidth>(plan, band, begin, end, keep, tasks[t]);
  });
  std::vector<uint32_t> keys;
  std::vector<uint8_t> selected;
  if (!select_in_band(tasks, k, keys, selected)) return false;
  // The selected recorded blocks, written as selected; each task's blocks lie in its own whole bytes.
  Plan<T> selecting = plan;
  selecting.all_selected = true;  // keep_run then writes a block's selected pattern
  bool* flags = packed ? nullptr : mask.data_ptr<bool>();
  uint8_t* bits = packed ? mask.data_ptr<uint8_t>() : nullptr;
  for_each_selected_record(tasks, selected, [&](int64_t block) {
    const int64_t row = block / g.grid_cols, col = (block - row * g.grid_cols) * kWidth;
    const int64_t element = row * g.cols + col;
    bool keep[kWidth];
    bool* out = packed ? keep : flags + element;
    keep_run<kMode, kWidth>(selecting, row, col / kWidth, col, col + kWidth, out);
    if (packed) {
      for (int c = 0; c < kWidth; ++c) bits[(element + c) >> 3] &= static_cast<uint8_t>(~((!keep[c]) << ((element + c) & 7)));
    }
  });
  return true;
}

// The one-pass mask where it applies (one-row blocks of 4 or 8 columns tiling the rows, not every block
// selected, enough blocks to sample); false where the keyed pipeline must write the mask.
template <typename T>
bool try_band_mask(const Plan<T>& plan, ZeroMode mode, int64_t k, bool packed, at::Tensor& mask) {
  const BlockGrid& g = plan.grid;
  if (plan.all_selected || g.num_blocks() < kBandMinBlocks || g.block_rows != 1 || mode == ZeroMode::kCut) return false;
  const auto by_mode = [&](auto width) {
    constexpr int kWidth = decltype(width)::value;
    if (g.cols % kWidth != 0) return false;
    return mode == ZeroMode::kWholeBlock ? band_mask<ZeroMode::kWholeBlock, kWidth>(plan, k, packed, mask)
                                         : band_mask<ZeroMode::kRowRank, kWidth>(plan, k, packed, mask);
  };
  if (g.block_cols == 4) return by_mode(std::integral_constant<int, 4>());
  if (g.block_cols == 8) return by_mode(std::integral_constant<int, 8>());
  return false;
}

}  // namespace cpu
}  // namespace sparsity_ext
