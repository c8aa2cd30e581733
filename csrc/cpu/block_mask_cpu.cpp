// CPU kernels of the block-norm masks: block_norm_mask, block_norm_mask_apply_, nm_mask, and the two
// halves of the pipeline below as ops of their own for callers that select across several tensors or
// chunks (block_scores: the scoring pass; block_norm_mask_select: the mask pass, given a threshold).
//
// Pipeline (DESIGN.md "Algorithms"): one scoring pass writes one order key per block (and pass 0 of
// the radix histogram, 11-bit digits); a radix select finds the k-th smallest key (pass 1 over all keys
// gathers the survivors of pass 0 when they are at most half, pass 2 reads only those) and, when ties
// at the threshold are split, the last selected block; one pass over the flat element range writes the
// mask (bool, or packed bits with each task owning whole bytes) and, for the _apply_ variant, zeroes
// the data in place (one-row blocks ranked in the mask pass: zeroed in a second pass, see
// zero_dropped). Extra memory: 4 bytes per block, +8 per block for the cuts of blocks that are not one
// row of <= 32 columns when zeros_per_block < block size.
//
// Large tables of one-row blocks of 4 or 8 columns first try a single pass instead (see "one-pass band
// selection"): scores and mask in one read of the data, no per-block buffer.
//
// Strided input: a unit column stride and any row stride >= cols are read in place; other layouts
// are copied to a contiguous buffer first (and, for _apply_, the zeroed buffer is copied back).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/mask_math.h"
#include "common/op_args.h"
#include "cpu/radix_select_cpu.h"

namespace sparsity_ext {
namespace {

constexpr int64_t kScoreGrain = 1 << 14;  // blocks per scoring chunk
constexpr int64_t kScoreTile = 2048;      // blocks scored before their keys are counted (stay in L1)
constexpr int64_t kMaskUnit = 64;         // mask tasks start at multiples of 64 elements (whole bytes)
constexpr int64_t kMaskGrain = 1 << 16;   // elements per mask task
constexpr int64_t kPackTile = 4096;       // elements staged as bools before packing

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

// ------------------------------------------------------------------------------ scoring pass
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

// --------------------------------------------------------------------------------- mask pass
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
constexpr KeepFlags<kWidth> kKeepFlags{};

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

template <typename T>
void zero_where_dropped(T* elements, const bool* keep, int64_t count) {
  for (int64_t i = 0; i < count; ++i) elements[i] = keep[i] ? elements[i] : T{};
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

// data = 0 where the finished mask (bool, or packed bits) is 0.
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
        if (!keep) row_ptr[c] = T{};
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

// Uninitialized per-block buffers (every entry is written by the scoring pass): order keys (int32)
// or cuts (int64, kCut only).
inline at::Tensor per_block_buffer(const at::Tensor& like, int64_t num_blocks, at::ScalarType dtype) {
  return at::empty({num_blocks}, like.options().dtype(dtype));
}

// ------------------------------------------------------------------- one-pass band selection
// Most blocks lie far from the selection threshold. A sample of block keys brackets the threshold key in
// a band [lo, hi]; one pass over the data then scores every block and writes its mask at once (key < lo:
// selected; otherwise kept for now), counts the blocks below lo and records the few inside the band. If
// the counts put the k-th smallest key inside the band, it is found among the recorded blocks, whose
// mask is then rewritten where they are selected: the keyed pipeline's mask, bit for bit, with the data
// read once and no per-block buffer. Otherwise (an unlucky sample, or a tie run too long to record) the
// keyed pipeline runs and rewrites the whole mask. Taken for one-row blocks of kWidth (4 or 8) columns
// tiling the rows exactly, where the scores and the mask come from the same tile of data.
constexpr int64_t kBandMinBlocks = int64_t{1} << 18;  // below this, the keyed pipeline is as fast (>= 256 runs)
constexpr int64_t kBandRun = 16;                      // sampled blocks are runs of consecutive blocks
constexpr int64_t kBandMaxRuns = 4096;
constexpr int64_t kBandTile = 512;                    // blocks scored before their mask is written
constexpr int64_t kBandGroup = 16;                    // keys tested for the band together

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

// ---------------------------------------------------------------------- block_norm_mask_update_
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

TORCH_LIBRARY_IMPL(sparsity_ext, CPU, m) {
  m.impl("block_norm_mask", &block_norm_mask_cpu);
  m.impl("block_norm_mask_apply_", &block_norm_mask_apply__cpu);
  m.impl("nm_mask", &nm_mask_cpu);
  m.impl("block_scores", &block_scores_cpu);
  m.impl("block_norm_mask_select", &block_norm_mask_select_cpu);
  m.impl("block_norm_mask_update_", &block_norm_mask_update__cpu);
  m.impl("block_norm_mask_into_", &block_norm_mask_into__cpu);
}

}  // namespace sparsity_ext
