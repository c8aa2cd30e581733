// CPU mask pass of the block-norm masks: once the selection is settled (every block, or the order keys
// and the threshold), one pass over the flat element range writes the mask (bool, or packed bits with
// each task owning whole bytes) and, for the _apply_ variant, zeroes the data in place. One-row blocks
// ranked in the mask pass are zeroed in a second pass (see write_planned_mask). Zeroing writes x * 0
// (times_zero in common/mask_math.h), byte for byte what torch's data * mask writes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/mask_math.h"
#include "cpu/block_scores_cpu.h"
#include "cpu/radix_select_cpu.h"

namespace sparsity_ext {
namespace cpu {

inline constexpr int64_t kMaskUnit = 64;         // mask tasks start at multiples of 64 elements (whole bytes)
inline constexpr int64_t kMaskGrain = 1 << 16;   // elements per mask task
inline constexpr int64_t kPackTile = 4096;       // elements staged as bools before packing

// Keep flags of the elements [c0, c1) of `row`, all inside block column block_col, written to out.
template <ZeroMode kMode, int kWidth, typename T>
void keep_run(const Plan<T>& plan, int64_t row, int64_t block_col, int64_t c0, int64_t c1, bool* out) {
  const BlockGrid& g = plan.grid;
  const int64_t block_row = (kWidth > 0 || g.block_rows == 1) ? row : row / g.block_rows;
  const int64_t block = block_row * g.grid_cols + block_col;
  if (!plan.all_selected && !block_selected(plan.keys[block], block, plan.threshold_key, plan.last_tied_block)) {
    std::memset(out, 1, c1 - c0);
    return;
  }
  const T* row_ptr = plan.data + row * plan.ld;
  const int64_t block_c0 = block_col * g.block_cols;
  if constexpr (kMode == ZeroMode::kWholeBlock) {
    std::memset(out, 0, c1 - c0);
  } else if constexpr (kMode == ZeroMode::kRowRank) {
    constexpr int kGroup = kWidth > 0 ? kWidth : 32;
    const uint32_t zero_bits = row_group_zero_bits<kGroup>(
        row_ptr + block_c0, static_cast<int>(g.valid_cols(block_col)), plan.zeros_per_block, plan.norm);
    for (int64_t c = c0; c < c1; ++c) out[c - c0] = !((zero_bits >> (c - block_c0)) & 1u);
  } else {
    const uint64_t cut = plan.cuts[block];
    const int64_t row_base = (row - block_row * g.block_rows) * g.valid_cols(block_col) - block_c0;
    for (int64_t c = c0; c < c1; ++c) out[c - c0] = cut_key(element_key(row_ptr[c], plan.norm), row_base + c) > cut;
  }
}

// Rank keys for ranking the elements of one block on the CPU: signed integers in the order of
// element_key's keys (ties where they tie), cheaper to make and to compare in SIMD lanes than unsigned
// order keys. Norms 1 and 2 are >= 0 or NaN: their magnitude bits, with every NaN one key above +inf.
template <int kNorm, typename T>
inline int32_t rank_key(T x) {
  const float norm = element_norm(to_float(x), kNorm);
  if constexpr (kNorm == 0) return static_cast<int32_t>(order_key(norm) ^ 0x80000000u);
  const int32_t magnitude = static_cast<int32_t>(float_to_bits(norm) & 0x7fffffffu);
  return magnitude < 0x7f800001 ? magnitude : 0x7f800001;
}

// The kWidth keep flags (bytes) of each pattern of zero bits: byte c is 0 where bit c is set.
template <int kWidth>
struct KeepFlags {
  using Word = std::conditional_t<kWidth == 4, uint32_t, uint64_t>;
  Word of[1 << kWidth];
  constexpr KeepFlags() : of() {
    for (int bits = 0; bits < (1 << kWidth); ++bits) {
      for (int c = 0; c < kWidth; ++c) of[bits] |= static_cast<Word>(!((bits >> c) & 1)) << (8 * c);
    }
  }
};
template <int kWidth>
inline constexpr KeepFlags<kWidth> kKeepFlags{};

// Keep flags of `count` consecutive full blocks of kWidth columns of one row, starting at block
// index first_block whose elements start at `elements`: branch-free loops the compiler vectorizes.
// Blocks up to last_tied_block are selected when key <= threshold, later ones when key < threshold,
// so the loops compare 32-bit keys only.
template <ZeroMode kMode, int kWidth, int kNorm, typename T>
void keep_full_row_blocks(const Plan<T>& plan, const T* elements, int64_t first_block, int64_t count, bool* out) {
  static_assert(kMode != ZeroMode::kCut, "the full-block path covers one-row blocks of <= 32 columns");
  if (kMode == ZeroMode::kWholeBlock && plan.all_selected) {
    std::memset(out, 0, count * kWidth);
    return;
  }
  const uint32_t* keys = plan.keys;
  const uint32_t threshold = plan.threshold_key;
  const int zeros = clamp_zeros(plan.zeros_per_block, kWidth);
  // kRowRank ranks a tile of blocks at a time, in loops over the tile that vectorize across blocks: the
  // element keys, transposed (element_keys[c][i]: element c of block i); each block's zero bits, as
  // rank counting does (smallest_z_bits: ranks by key, ties by position); the flags of those bits.
  constexpr bool kRanks = kMode == ZeroMode::kRowRank && (kWidth == 4 || kWidth == 8);
  constexpr int64_t kTile = kRanks ? 256 : std::numeric_limits<int64_t>::max();
  alignas(64) int32_t element_keys[kRanks ? kWidth : 1][kRanks ? kTile : 1];
  alignas(64) int32_t zero_bits[kRanks ? kTile : 1];
  // blocks [i0, i1); kRule: 0 every block selected, 1 key <= threshold, 2 key < threshold
  const auto blocks = [&](int64_t i0, int64_t i1, auto rule) {
    constexpr int kRule = decltype(rule)::value;
    const auto selected = [&](int64_t i) {
      return kRule == 0 || (kRule == 1 ? keys[first_block + i] <= threshold : keys[first_block + i] < threshold);
    };
    if constexpr (!kRanks) {
      for (int64_t i = i0; i < i1; ++i) {
        const bool keep = !selected(i);
        for (int c = 0; c < kWidth; ++c) out[i * kWidth + c] = keep;
      }
    } else {
      for (int64_t t0 = i0; t0 < i1; t0 += kTile) {
        const int64_t n = std::min(kTile, i1 - t0);
        const T* tile = elements + t0 * kWidth;
        for (int64_t i = 0; i < n; ++i) {
          SPX_UNROLL
          for (int c = 0; c < kWidth; ++c) element_keys[c][i] = rank_key<kNorm>(tile[i * kWidth + c]);
        }
        for (int64_t i = 0; i < n; ++i) {
          int32_t rank[kWidth] = {};
          SPX_UNROLL
          for (int p = 0; p < kWidth; ++p) {
            SPX_UNROLL
            for (int q = p + 1; q < kWidth; ++q) {  // p ranks below q unless key q < key p
              const int32_t p_first = element_keys[p][i] <= element_keys[q][i];
              rank[q] += p_first;
              rank[p] += 1 - p_first;
            }
          }
          int32_t bits = 0;
          SPX_UNROLL
          for (int p = 0; p < kWidth; ++p) bits |= static_cast<int32_t>(rank[p] < zeros) << p;
          zero_bits[i] = bits & -static_cast<int32_t>(selected(t0 + i));
        }
        for (int64_t i = 0; i < n; ++i) {
          std::memcpy(out + (t0 + i) * kWidth, &kKeepFlags<kWidth>.of[zero_bits[i]], kWidth);
        }
      }
    }
  };
  if (plan.all_selected) return blocks(0, count, std::integral_constant<int, 0>());
  const int64_t tied_end = plan.last_tied_block >= first_block + count ? count
                           : std::max<int64_t>(0, plan.last_tied_block - first_block + 1);
  blocks(0, tied_end, std::integral_constant<int, 1>());
  blocks(tied_end, count, std::integral_constant<int, 2>());
}

template <ZeroMode kMode, int kWidth, typename T>
void keep_full_row_blocks(const Plan<T>& plan, const T* elements, int64_t first_block, int64_t count, bool* out) {
  switch (plan.norm) {
    case 0: return keep_full_row_blocks<kMode, kWidth, 0>(plan, elements, first_block, count, out);
    case 1: return keep_full_row_blocks<kMode, kWidth, 1>(plan, elements, first_block, count, out);
    default: return keep_full_row_blocks<kMode, kWidth, 2>(plan, elements, first_block, count, out);
  }
}

// Calls visit(row, col_begin, col_end, offset) for each row's part of the flat range [begin, end).
template <class Visit>
void for_each_row_segment(int64_t begin, int64_t end, int64_t cols, const Visit& visit) {
  int64_t row = begin / cols, col = begin - row * cols;
  for (int64_t e = begin; e < end; ++row, col = 0) {
    const int64_t stop = std::min(cols, col + (end - e));
    visit(row, col, stop, e - begin);
    e += stop - col;
  }
}

// elements[i] = elements[i] * 0 (times_zero: -0.0 for a negative x, as torch's data * mask) where keep[i] is false.
template <typename T>
void zero_where_dropped(T* elements, const bool* keep, int64_t count) {
  for (int64_t i = 0; i < count; ++i) elements[i] = keep[i] ? elements[i] : times_zero(elements[i]);
}

// Writes keep flags for the flat range [begin, end) to keep[0, end - begin), zeroing data where a
// flag is false when kApply. kWidth > 0: blocks are one row of exactly kWidth columns, and the full
// blocks of each row segment take the vectorized path.
template <ZeroMode kMode, int kWidth, bool kApply, typename T>
void keep_range(const Plan<T>& plan, int64_t begin, int64_t end, bool* keep) {
  const BlockGrid& g = plan.grid;
  if constexpr (kWidth == 0) {
    for_each_block_run(begin, end, g.cols, g.block_cols,
                       [&](int64_t row, int64_t block_col, int64_t c0, int64_t c1, int64_t offset) {
                         keep_run<kMode, 0>(plan, row, block_col, c0, c1, keep + offset);
                       });
  } else {
    for_each_row_segment(begin, end, g.cols, [&](int64_t row, int64_t c0, int64_t c1, int64_t offset) {
      bool* out = keep + offset - c0;  // out[c] is column c's flag
      const int64_t first_full = (c0 + kWidth - 1) / kWidth, end_full = c1 / kWidth;
      if (first_full >= end_full) {  // no full block: at most two partial runs
        for_each_block_run(c0, c1, g.cols, kWidth, [&](int64_t, int64_t block_col, int64_t r0, int64_t r1, int64_t) {
          keep_run<kMode, kWidth>(plan, row, block_col, r0, r1, out + r0);
        });
      } else {
        if (c0 < first_full * kWidth) keep_run<kMode, kWidth>(plan, row, first_full - 1, c0, first_full * kWidth, out + c0);
        keep_full_row_blocks<kMode, kWidth>(plan, plan.data + row * plan.ld + first_full * kWidth,
                                            row * g.grid_cols + first_full, end_full - first_full,
                                            out + first_full * kWidth);
        if (end_full * kWidth < c1) keep_run<kMode, kWidth>(plan, row, end_full, end_full * kWidth, c1, out + end_full * kWidth);
      }
    });
  }
  if constexpr (kApply) {
    for_each_row_segment(begin, end, g.cols, [&](int64_t row, int64_t c0, int64_t c1, int64_t offset) {
      zero_where_dropped(plan.data + row * plan.ld + c0, keep + offset, c1 - c0);
    });
  }
}

// Bits 0..7 of the result are the 8 bools (0/1 bytes) at `flags`, lowest address first.
inline uint8_t pack8(const bool* flags) {
  uint64_t word;
  std::memcpy(&word, flags, 8);
  return static_cast<uint8_t>((word * 0x0102040810204080ull) >> 56);
}

// Mask tasks: the flat element range in chunks of whole kMaskUnit units (so each task owns whole bytes
// of a packed mask), a few per thread.
inline cpu::Chunking mask_tasks(int64_t numel) {
  return cpu::make_chunking((numel + kMaskUnit - 1) / kMaskUnit, kMaskGrain / kMaskUnit);
}

// Writes the mask of `numel` elements (bool, or packed bits) from keep flags: fill(begin, end, keep,
// task) writes the flags of the flat range [begin, end), which lies in mask task `task`, to keep[0, end - begin).
template <class Fill>
void fill_mask(int64_t numel, at::Tensor& mask, bool packed, const Fill& fill) {
  const cpu::Chunking tasks = mask_tasks(numel);
  bool* flags = packed ? nullptr : mask.data_ptr<bool>();
  uint8_t* bits = packed ? mask.data_ptr<uint8_t>() : nullptr;
  at::parallel_for(0, tasks.count, 1, [&](int64_t t0, int64_t t1) {
    alignas(8) bool keep[kPackTile];
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t task_begin = tasks.begin(task) * kMaskUnit, task_end = std::min(tasks.end(task) * kMaskUnit, numel);
      if (!packed) {
        fill(task_begin, task_end, flags + task_begin, task);
        continue;
      }
      for (int64_t begin = task_begin; begin < task_end; begin += kPackTile) {
        const int64_t end = std::min(begin + kPackTile, task_end);
        fill(begin, end, keep, task);
        const int64_t count = end - begin;
        const int64_t full_bytes = count / 8;
        uint8_t* dst = bits + begin / 8;
        for (int64_t j = 0; j < full_bytes; ++j) dst[j] = pack8(keep + 8 * j);
        if (count % 8 != 0) {  // the mask's last byte: bits past numel stay 0, as pack_mask writes them
          uint8_t byte = 0;
          for (int64_t i = 0; i < count % 8; ++i) byte |= static_cast<uint8_t>(keep[8 * full_bytes + i]) << i;
          dst[full_bytes] = byte;
        }
      }
    }
  });
}

template <ZeroMode kMode, int kWidth, bool kApply, typename T>
void write_mask(const Plan<T>& plan, at::Tensor& mask, bool packed) {
  fill_mask(plan.grid.rows * plan.grid.cols, mask, packed, [&](int64_t begin, int64_t end, bool* keep, int64_t) {
    keep_range<kMode, kWidth, kApply>(plan, begin, end, keep);
  });
}

template <ZeroMode kMode, int kWidth, typename T>
void write_mask(const Plan<T>& plan, at::Tensor& mask, bool packed, bool apply) {
  if (apply) {
    write_mask<kMode, kWidth, true>(plan, mask, packed);
  } else {
    write_mask<kMode, kWidth, false>(plan, mask, packed);
  }
}

template <ZeroMode kMode, typename T>
void write_mask(const Plan<T>& plan, at::Tensor& mask, bool packed, bool apply) {
  const BlockGrid& g = plan.grid;
  if constexpr (kMode != ZeroMode::kCut) {  // kCut never has one-row blocks of <= 32 columns
    if (g.block_rows == 1 && g.block_cols == 4) return write_mask<kMode, 4>(plan, mask, packed, apply);
    if (g.block_rows == 1 && g.block_cols == 8) return write_mask<kMode, 8>(plan, mask, packed, apply);
  }
  write_mask<kMode, 0>(plan, mask, packed, apply);
}

// data = data * 0 (times_zero) where the finished mask (bool, or packed bits) is 0.
template <typename T>
void zero_dropped(const Plan<T>& plan, const at::Tensor& mask, bool packed) {
  const int64_t numel = plan.grid.rows * plan.grid.cols;
  const bool* flags = packed ? nullptr : mask.data_ptr<bool>();
  const uint8_t* bits = packed ? mask.data_ptr<uint8_t>() : nullptr;
  at::parallel_for(0, numel, kMaskGrain, [&](int64_t begin, int64_t end) {
    for_each_row_segment(begin, end, plan.grid.cols, [&](int64_t row, int64_t c0, int64_t c1, int64_t offset) {
      T* row_ptr = plan.data + row * plan.ld;
      for (int64_t c = c0, e = begin + offset; c < c1; ++c, ++e) {
        const bool keep = packed ? (bits[e >> 3] >> (e & 7)) & 1 : flags[e];
        if (!keep) row_ptr[c] = times_zero(row_ptr[c]);
      }
    });
  });
}

// Writes the mask of a plan whose selection (all_selected, or keys + threshold) and, for kCut, cuts are settled.
template <typename T>
void write_planned_mask(const Plan<T>& plan, ZeroMode mode, bool packed, bool apply, at::Tensor& mask) {
  switch (mode) {
    case ZeroMode::kWholeBlock:
      return write_mask<ZeroMode::kWholeBlock>(plan, mask, packed, apply);
    case ZeroMode::kRowRank:
      // A block's ranking reads its neighbours, which another task (or a later tile) may be zeroing:
      // write the whole mask first, then zero.
      write_mask<ZeroMode::kRowRank>(plan, mask, packed, false);
      if (apply) zero_dropped(plan, mask, packed);
      return;
    case ZeroMode::kCut:
      return write_mask<ZeroMode::kCut>(plan, mask, packed, apply);
  }
}

}  // namespace cpu
}  // namespace sparsity_ext
