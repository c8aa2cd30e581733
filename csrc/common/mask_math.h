// Torch-free math shared by the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda): both call
// these functions, so they round identically and the CPU tests exercise the code the GPU runs.
// The contract is docs/design.md's "Mask semantics"; sparsity_ext/reference.py is its oracle.
//
// Exactness: scores are fp32 for fp32/fp16/bf16 input. Build with -ffp-contract=off (host) and
// -fmad=false (nvcc): a fused multiply-add in sum += x * x would round differently from the
// reference, which computes x * x and the block sums (avg_pool2d) as separate fp32 operations.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define SPX_HD __host__ __device__ __forceinline__
#define SPX_UNROLL _Pragma("unroll")
#else
#define SPX_HD inline
#define SPX_UNROLL _Pragma("GCC unroll 32")
#endif

namespace sparsity_ext {

// 16-bit float storage, layout-compatible with c10::Half / __half and c10::BFloat16 / __nv_bfloat16,
// so kernels can read torch tensors without torch headers.
struct half_storage {
  uint16_t bits;
};
struct bf16_storage {
  uint16_t bits;
};

SPX_HD uint32_t float_to_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  return __builtin_bit_cast(uint32_t, x);
#endif
}

SPX_HD float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  return __builtin_bit_cast(float, bits);
#endif
}

// ------------------------------------------------------------------ element values and norms
SPX_HD float to_float(float x) { return x; }

SPX_HD float to_float(bf16_storage x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }

SPX_HD float to_float(half_storage x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.bits));
#else
  // IEEE binary16 -> binary32, exact for every input (including subnormals, inf and NaN). All three cases
  // are computed and one picked with bit masks (not selects, which trapping-math keeps as branches), so
  // that CPU loops over elements vectorize; subnormals as mantissa * 2^-24 from a normal float, which
  // flush-to-zero modes leave alone.
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1fu;
  const uint32_t mantissa = x.bits & 0x3ffu;
  const uint32_t special = 0x7f800000u | (mantissa << 13);
  const uint32_t normal = ((exponent + 112u) << 23) | (mantissa << 13);
  const uint32_t subnormal = float_to_bits(static_cast<float>(static_cast<int32_t>(mantissa)) * 5.9604644775390625e-08f);
  const uint32_t is_special = 0u - static_cast<uint32_t>(exponent == 0x1fu);
  const uint32_t is_subnormal = 0u - static_cast<uint32_t>(exponent == 0u);
  return bits_to_float(sign | (special & is_special) | (subnormal & is_subnormal) |
                       (normal & ~(is_special | is_subnormal)));
#endif
}

// ------------------------------------------------------------------------------ zeroing
// What the zeroing ops write over a dropped element x: x * 0, as torch's `data * mask` computes it where the
// mask is 0 (torch.ao.pruning zeroes that way): a zero with x's sign where x is finite, so that a zeroed
// negative weight is -0.0; NaN where x is inf or NaN. fp16/bf16 are multiplied in fp32, as torch does,
// and narrowed by truncation (the sign; for a NaN also its quiet bit and top payload bits), which is what
// the GPU's conversions and the CPU's fp16 conversion instruction give. A real multiply, not bit tricks,
// so that the NaN of inf * 0 is the device's own (0xFFC00000 on x86, 0x7FFFFFFF on a GPU).
SPX_HD float times_zero(float x) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(x, 0.0f);
#else
  return x * 0.0f;
#endif
}

SPX_HD double times_zero(double x) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(x, 0.0);
#else
  return x * 0.0;
#endif
}

// 16-bit types: a finite x * 0 is the zero of x's sign, taken from the bits; only inf and NaN (exponent all
// ones) go through the fp32 multiply, for the device's NaN. Cheap and predictable where almost every x is finite.
// On a GPU the fp32 product of inf or NaN with 0 is the canonical NaN 0x7FFFFFFF, whatever the operand, so
// there the whole function is a select on the bits (0x7FFF: that NaN cut to 16 bits), no conversion at all.
SPX_HD bf16_storage times_zero(bf16_storage x) {
#if defined(__CUDA_ARCH__)
  return bf16_storage{static_cast<uint16_t>((x.bits & 0x7f80u) == 0x7f80u ? 0x7fffu : (x.bits & 0x8000u))};
#else
  if ((x.bits & 0x7f80u) != 0x7f80u) return bf16_storage{static_cast<uint16_t>(x.bits & 0x8000u)};
  return bf16_storage{static_cast<uint16_t>(float_to_bits(times_zero(to_float(x))) >> 16)};
#endif
}

SPX_HD half_storage times_zero(half_storage x) {
#if defined(__CUDA_ARCH__)
  return half_storage{static_cast<uint16_t>((x.bits & 0x7c00u) == 0x7c00u ? 0x7fffu : (x.bits & 0x8000u))};
#else
  if ((x.bits & 0x7c00u) != 0x7c00u) return half_storage{static_cast<uint16_t>(x.bits & 0x8000u)};
  const uint32_t product = float_to_bits(times_zero(to_float(x)));
  const uint32_t nan = 0u - static_cast<uint32_t>((product & 0x7fffffffu) > 0x7f800000u);
  return half_storage{static_cast<uint16_t>(((product >> 16) & 0x8000u) | (nan & (0x7c00u | ((product >> 13) & 0x3ffu))))};
#endif
}

SPX_HD float fp32_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);  // never contracted into an FMA, whatever the flags
#else
  return a + b;
#endif
}

// norm: 0 identity, 1 |x|, 2 x*x (all in fp32).
SPX_HD float element_norm(float x, int norm) {
  if (norm == 0) return x;
  if (norm == 1) return fabsf(x);
#if defined(__CUDA_ARCH__)
  return __fmul_rn(x, x);
#else
  return x * x;
#endif
}

// a / b for a >= 0, b > 0: a 32-bit division when both fit, several times cheaper on GPUs.
SPX_HD int64_t divide(int64_t a, int64_t b) {
  if (((a | b) >> 32) == 0) return static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b));
  return a / b;
}

// ------------------------------------------------------------------------------ order keys
// Unsigned order of keys == float order, with -0.0 == +0.0 and every NaN equal and largest
// (0xFFFFFFFF; +inf is 0xFF800000). Ties between equal keys are broken by index elsewhere.
constexpr uint32_t kNanKey = 0xFFFFFFFFu;

SPX_HD uint32_t order_key(float x) {
  // Integer arithmetic only, no selects, so that CPU loops over keys vectorize.
  uint32_t bits = float_to_bits(x);
  bits &= 0u - static_cast<uint32_t>(bits != 0x80000000u);  // -0.0 ranks as +0.0
  // negative: flip every bit; non-negative: set the sign bit
  const uint32_t flip = static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31) | 0x80000000u;
  return (bits ^ flip) | (0u - static_cast<uint32_t>(x != x));  // every NaN -> kNanKey
}

// Inverse of order_key on its image (kNanKey -> a quiet NaN, 0x7FFFFFFF).
SPX_HD float key_to_float(uint32_t key) {
  return bits_to_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

template <typename T>
SPX_HD uint32_t element_key(T x, int norm) {
  return order_key(element_norm(to_float(x), norm));
}

// ------------------------------------------------------------------------------- selection
// Number of selected blocks: none for s <= 0, all for s >= 1, else round-half-even(s * n) in double
// (Python's round(), as torch.ao.pruning computes it) clamped to [0, n - 1].
SPX_HD int64_t num_selected_blocks(double sparsity_level, int64_t num_blocks) {
  if (num_blocks <= 0 || sparsity_level <= 0.0) return 0;
  if (sparsity_level >= 1.0) return num_blocks;
  const double rounded = nearbyint(sparsity_level * static_cast<double>(num_blocks));
  if (rounded <= 0.0) return 0;
  const int64_t k = static_cast<int64_t>(rounded);
  return k > num_blocks - 1 ? num_blocks - 1 : k;
}

// Block b (row-major over the grid of blocks) is selected when its key is below the threshold key,
// or equal to it and b is at most last_tied_block (ties go to lower block indices).
SPX_HD bool block_selected(uint32_t key, int64_t block, uint32_t threshold_key, int64_t last_tied_block) {
  return (key < threshold_key) | ((key == threshold_key) & (block <= last_tied_block));  // branch-free
}

// ---------------------------------------------------------------------------- block geometry
// Blocks of block_rows x block_cols tile a rows x cols matrix from the top-left; edge blocks are
// partial. The matrix is read as row-major with a row stride `ld` (unit column stride).
struct BlockGrid {
  int64_t rows, cols;
  int64_t block_rows, block_cols;
  int64_t grid_rows, grid_cols;  // number of blocks down / across

  SPX_HD int64_t num_blocks() const { return grid_rows * grid_cols; }
  SPX_HD int64_t block_size() const { return block_rows * block_cols; }
  SPX_HD int64_t valid_rows(int64_t block_row) const {
    const int64_t left = rows - block_row * block_rows;
    return left < block_rows ? left : block_rows;
  }
  SPX_HD int64_t valid_cols(int64_t block_col) const {
    const int64_t left = cols - block_col * block_cols;
    return left < block_cols ? left : block_cols;
  }
};

SPX_HD BlockGrid make_block_grid(int64_t rows, int64_t cols, int64_t block_rows, int64_t block_cols) {
  return BlockGrid{rows, cols, block_rows, block_cols, (rows + block_rows - 1) / block_rows,
                   (cols + block_cols - 1) / block_cols};
}

// Score of one block: (fp32 sum of the valid elements' norms, row-major) / (valid count), the exact
// operation order of avg_pool2d(ceil_mode=True, count_include_pad=True) with zero padding.
template <typename T>
SPX_HD float block_mean_norm(const T* data, int64_t ld, const BlockGrid& grid, int64_t block_row,
                             int64_t block_col, int norm) {
  const int64_t nrows = grid.valid_rows(block_row), ncols = grid.valid_cols(block_col);
  const T* first = data + block_row * grid.block_rows * ld + block_col * grid.block_cols;
  float sum = 0.0f;
  for (int64_t r = 0; r < nrows; ++r) {
    const T* row = first + r * ld;
    for (int64_t c = 0; c < ncols; ++c) sum = fp32_add(sum, element_norm(to_float(row[c]), norm));
  }
  return sum / static_cast<float>(nrows * ncols);
}

// How the elements of a selected block are chosen, the same on the CPU and the GPU.
enum class ZeroMode : int {
  kWholeBlock = 0,  // zeros_per_block >= block size: every valid element
  kRowRank = 1,     // one-row blocks of <= 32 columns: ranked in registers while the mask is written
  kCut = 2,         // any other block: through a per-block cut computed beforehand (smallest_z_cut)
};

SPX_HD ZeroMode zero_mode(const BlockGrid& grid, int64_t zeros_per_block) {
  if (zeros_per_block >= grid.block_size()) return ZeroMode::kWholeBlock;
  return grid.block_rows == 1 && grid.block_cols <= 32 ? ZeroMode::kRowRank : ZeroMode::kCut;
}

// --------------------------------------------------------------- selection inside one block
// Valid elements of a block are numbered row-major among the valid ones (p = r * valid_cols + c);
// the z elements with the smallest (key, p) are zeroed.

// Whether element p is among the z smallest of keys[0, kMaxN), ties by lower index (rank counting).
// Used unpadded on exact groups (2:4), and through smallest_z_bits on padded ones. Branch-free, so
// CPU loops over many groups vectorize and GPU threads do not diverge.
template <int kMaxN>
SPX_HD bool in_smallest_z(const uint32_t (&keys)[kMaxN], int p, int z) {
  int rank = 0;
  SPX_UNROLL
  for (int q = 0; q < kMaxN; ++q) rank += q < p ? keys[q] <= keys[p] : keys[q] < keys[p];
  return rank < z;
}

// Bit p set <=> element p is among the z smallest of the first n keys, ties by lower p, O(kMaxN^2).
// keys[n, kMaxN) must hold kNanKey: padding ranks after every real key, so the loops need no bounds.
// kMaxN is a compile-time bound so that small groups live in registers.
template <int kMaxN>
SPX_HD uint32_t smallest_z_bits(const uint32_t (&keys)[kMaxN], int n, int z) {
  static_assert(kMaxN >= 1 && kMaxN <= 32, "rank counting is for groups of at most 32 elements");
  uint32_t bits = 0;
  SPX_UNROLL
  for (int p = 0; p < kMaxN; ++p) bits |= static_cast<uint32_t>(in_smallest_z<kMaxN>(keys, p, z)) << p;
  return n >= 32 ? bits : bits & ((1u << n) - 1u);
}

SPX_HD int clamp_zeros(int64_t z, int bound) { return z < bound ? static_cast<int>(z) : bound; }

// The z smallest (key, p) pairs of any number n of valid elements are exactly those whose
// (key << 32 | p) is <= the returned cut; ~0 when z >= n (every valid element). key_at(p) gives the
// key of element p. Bitwise bisection on the key: 34 passes over the block, no scratch memory, so
// it also serves one GPU thread per block; used for blocks too large for smallest_z_bits.
constexpr uint64_t kCutAll = ~uint64_t{0};

template <class KeyAt>
SPX_HD uint64_t smallest_z_cut(const KeyAt& key_at, int64_t n, int64_t z) {
  if (z >= n) return kCutAll;
  // threshold = the smallest key t with #(key <= t) >= z, decided from the top bit down
  uint32_t threshold = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t probe = threshold | ((1u << bit) - 1u);
    int64_t at_most = 0;
    for (int64_t p = 0; p < n; ++p) at_most += key_at(p) <= probe;
    if (at_most < z) threshold |= 1u << bit;
  }
  int64_t take = z;  // the cut is the take-th element equal to threshold, after every smaller one
  for (int64_t p = 0; p < n; ++p) take -= key_at(p) < threshold;
  for (int64_t p = 0; p < n; ++p) {
    if (key_at(p) == threshold && --take == 0) return (static_cast<uint64_t>(threshold) << 32) | static_cast<uint64_t>(p);
  }
  return kCutAll;  // unreachable: 1 <= take <= #(key == threshold)
}

SPX_HD uint64_t cut_key(uint32_t key, int64_t p) { return (static_cast<uint64_t>(key) << 32) | static_cast<uint64_t>(p); }

// Zero bits of n <= kMaxN consecutive elements of one row (a block of one row, e.g. an N:M group).
template <int kMaxN, typename T>
SPX_HD uint32_t row_group_zero_bits(const T* first, int n, int64_t z, int norm) {
  uint32_t keys[kMaxN];
  SPX_UNROLL
  for (int p = 0; p < kMaxN; ++p) keys[p] = p < n ? element_key(first[p], norm) : kNanKey;
  return smallest_z_bits<kMaxN>(keys, n, clamp_zeros(z, kMaxN));
}

// smallest_z_bits with the smallest compile-time bound that holds n <= 32 keys (padded in place).
template <int kMaxN = 32>
SPX_HD uint32_t smallest_z_bits_any(uint32_t (&keys)[32], int n, int64_t z) {
  for (int p = n; p < kMaxN; ++p) keys[p] = kNanKey;
  if constexpr (kMaxN > 4) {
    if (n <= kMaxN / 2) return smallest_z_bits_any<kMaxN / 2>(keys, n, z);
  }
  return smallest_z_bits<kMaxN>(reinterpret_cast<const uint32_t(&)[kMaxN]>(keys), n, clamp_zeros(z, kMaxN));
}

// The cut (see smallest_z_cut) of block (block_row, block_col): rank counting when it has at most 32
// valid elements, bisection beyond.
template <typename T>
SPX_HD uint64_t block_zero_cut(const T* data, int64_t ld, const BlockGrid& grid, int64_t block_row,
                               int64_t block_col, int64_t z, int norm) {
  const int64_t ncols = grid.valid_cols(block_col);
  const int64_t n = grid.valid_rows(block_row) * ncols;
  if (z >= n) return kCutAll;
  const T* first = data + block_row * grid.block_rows * ld + block_col * grid.block_cols;
  const auto key_at = [&](int64_t p) {
    const int64_t r = divide(p, ncols);
    return element_key(first[r * ld + (p - r * ncols)], norm);
  };
  if (n > 32) return smallest_z_cut(key_at, n, z);
  uint32_t keys[32];
  for (int p = 0; p < n; ++p) keys[p] = key_at(p);
  const uint32_t bits = smallest_z_bits_any(keys, static_cast<int>(n), z);
  uint64_t cut = 0;  // the largest zeroed (key, p)
  for (int p = 0; p < n; ++p) {
    if (((bits >> p) & 1u) && cut_key(keys[p], p) > cut) cut = cut_key(keys[p], p);
  }
  return cut;
}

// ------------------------------------------------------------------------- flat range walk
// Visits the flat row-major range [begin, end) of a matrix with `cols` columns as maximal runs that
// stay inside one row and one block column: visit(row, block_col, col_begin, col_end, offset), where
// offset = flat index of (row, col_begin) - begin. Divides once, then steps.
template <class Visit>
SPX_HD void for_each_block_run(int64_t begin, int64_t end, int64_t cols, int64_t block_cols, Visit&& visit) {
  if (begin >= end || cols <= 0) return;
  int64_t row = divide(begin, cols);
  int64_t col = begin - row * cols;
  int64_t block_col = divide(col, block_cols);
  int64_t block_end = (block_col + 1) * block_cols;
  int64_t offset = 0;
  const int64_t count = end - begin;
  while (offset < count) {
    int64_t run_end = block_end < cols ? block_end : cols;
    if (run_end - col > count - offset) run_end = col + (count - offset);
    visit(row, block_col, col, run_end, offset);
    offset += run_end - col;
    col = run_end;
    if (col == cols) {
      ++row;
      col = 0;
      block_col = 0;
      block_end = block_cols;
    } else if (col == block_end) {
      ++block_col;
      block_end += block_cols;
    }
  }
}

// --------------------------------------------------------------------------- radix select
// The k-th smallest uint32 key in three histogram passes over digits of 11, 11 and 10 bits (high to
// low). Pass p counts, per digit, the keys whose higher bits equal the prefix found so far.
constexpr int kRadixPasses = 3;
constexpr int kRadixBins = 2048;

SPX_HD int radix_shift(int pass) { return pass == 0 ? 21 : (pass == 1 ? 10 : 0); }
SPX_HD int radix_bins(int pass) { return pass == 2 ? 1024 : 2048; }
SPX_HD uint32_t radix_digit(uint32_t key, int pass) {
  return (key >> radix_shift(pass)) & static_cast<uint32_t>(radix_bins(pass) - 1);
}
// Keys still in the running in pass p: those whose bits above the pass's digit equal the prefix.
SPX_HD bool radix_candidate(uint32_t key, uint32_t prefix, int pass) {
  const uint32_t above = pass == 0 ? 0u : (pass == 1 ? 0xFFE00000u : 0xFFFFFC00u);
  return (key & above) == prefix;
}

// Progress of one selection: after the last pass, prefix is the k-th smallest key, less = #(key <
// prefix), rank = k - less = how many keys equal to prefix are taken (lowest indices first), and
// equal = #(key == prefix).
struct RadixState {
  uint32_t prefix;
  int64_t rank;  // 1-based rank of the k-th key among the remaining candidates
  int64_t less;
  int64_t equal;
  int64_t last_tied_index;  // filled by the caller: index of the rank-th key equal to prefix
};

SPX_HD RadixState radix_start(int64_t k) { return RadixState{0u, k, 0, 0, INT64_MAX}; }

// One pass's digit choice from its histogram (host / single-thread version; the CUDA kernels do the
// same with a block-wide scan).
inline void radix_step(const int64_t* hist, int pass, RadixState& state) {
  const int bins = radix_bins(pass);
  for (int d = 0; d < bins; ++d) {
    if (state.rank <= hist[d]) {
      state.prefix |= static_cast<uint32_t>(d) << radix_shift(pass);
      state.equal = hist[d];
      return;
    }
    state.rank -= hist[d];
    state.less += hist[d];
  }
}

}  // namespace sparsity_ext
