// Torch-free math of sparsify_24_pack, shared by the CPU kernel (cpu/semi_structured_cpu.cpp) and the
// CUDA kernel (cuda/semi_structured_cuda.cu): the 2:4 prune of one group, the (values, metadata)
// encoding of the pruned group, and where a metadata element goes in the reordered metadata of
// torch's SparseSemiStructuredTensorCUTLASS. The oracle is sparsity_ext/semi_structured/reference.py.
//
// Layout (rows x cols dense input, cols a multiple of 4; one "group" = 4 consecutive elements of a row):
//   values   rows x cols/2, the input's dtype: the two entries (r, 2g), (r, 2g + 1) are the masked
//            group's elements at positions idx0 < idx1.
//   metadata rows x cols/(4 * kGroupsPerMeta): group g's nibble is idx0 | idx1 << 2, and one metadata
//            element holds kGroupsPerMeta consecutive groups (4 in an int16 for 16-bit values, 8 in an
//            int32 for int8), group j of it in bits [4j, 4j + 4). Elements are then moved to the
//            CUTLASS order (meta_reordered_offset).
// idx0 / idx1: the positions of the masked group's nonzeros (x != 0, so -0.0 counts as zero); with
// fewer than two, padded with position 2, then 3, whichever is not taken. This is the choice torch's
// conversion makes for the masked dense tensor, so both give the same bits.
#pragma once

#include <cstdint>

#include "common/mask_math.h"

namespace sparsity_ext {

// Nibble idx0 | idx1 << 2 of each 4-bit nonzero pattern p (bit i: element i is nonzero), at bits
// [4p, 4p + 4). Patterns of more than two nonzeros cannot come out of a 2:4 prune; they map to their
// first two positions.
constexpr uint64_t kPairNibbles = 0x498E4DCE498E498Eull;

SPX_HD uint32_t pair_nibble(uint32_t nonzero_pattern) {
  return static_cast<uint32_t>(kPairNibbles >> (4u * nonzero_pattern)) & 0xFu;
}

// Per-element properties of the input dtypes: the 2:4 ranking key (|x| in fp32, NaN largest, through
// mask_math's element_key / order_key) and "is nonzero".
SPX_HD uint32_t abs_key(half_storage x) { return element_key(x, 1); }
SPX_HD uint32_t abs_key(bf16_storage x) { return element_key(x, 1); }
SPX_HD uint32_t abs_key(int8_t x) { return order_key(element_norm(static_cast<float>(x), 1)); }

SPX_HD bool is_nonzero(half_storage x) { return (x.bits & 0x7fffu) != 0; }
SPX_HD bool is_nonzero(bf16_storage x) { return (x.bits & 0x7fffu) != 0; }
SPX_HD bool is_nonzero(int8_t x) { return x != 0; }

SPX_HD half_storage zero_like(half_storage) { return half_storage{0}; }
SPX_HD bf16_storage zero_like(bf16_storage) { return bf16_storage{0}; }
SPX_HD int8_t zero_like(int8_t) { return 0; }

// Metadata element type and groups per element, by value type.
template <typename T>
struct MetaTraits {
  using meta_t = uint16_t;  // stored in torch's int16 tensor
  static constexpr int kGroupsPerMeta = 4;
};
template <>
struct MetaTraits<int8_t> {
  using meta_t = uint32_t;  // stored in torch's int32 tensor
  static constexpr int kGroupsPerMeta = 8;
};

// 2:4 prune of the group x[0..4) (keep the 2 largest |x|; of equal keys the lower position is zeroed
// first, exactly nm_mask(data, 2, 4)), then its two stored values; returns the group's nibble.
template <typename T>
SPX_HD uint32_t prune_pack_group(const T* x, T* values) {
  uint32_t keys[4];
  SPX_UNROLL
  for (int i = 0; i < 4; ++i) keys[i] = abs_key(x[i]);
  const uint32_t keep = ~smallest_z_bits<4>(keys, 4, 2) & 0xFu;
  uint32_t nonzero = 0;
  SPX_UNROLL
  for (int i = 0; i < 4; ++i) nonzero |= static_cast<uint32_t>(is_nonzero(x[i])) << i;
  const uint32_t nibble = pair_nibble(keep & nonzero);
  const uint32_t idx0 = nibble & 3u, idx1 = nibble >> 2;
  values[0] = (keep >> idx0) & 1u ? x[idx0] : zero_like(x[0]);
  values[1] = (keep >> idx1) & 1u ? x[idx1] : zero_like(x[0]);
  return nibble;
}

// One metadata element: the 4 * kGroupsPerMeta dense elements x -> 2 * kGroupsPerMeta values.
template <typename T>
SPX_HD typename MetaTraits<T>::meta_t prune_pack_meta_element(const T* x, T* values) {
  uint32_t meta = 0;
  SPX_UNROLL
  for (int g = 0; g < MetaTraits<T>::kGroupsPerMeta; ++g) meta |= prune_pack_group(x + 4 * g, values + 2 * g) << (4 * g);
  return static_cast<typename MetaTraits<T>::meta_t>(meta);
}

// Flat position of metadata element (row, col) of a rows x meta_cols metadata matrix in the reordered
// buffer that CUTLASS's sparse GEMM reads (viewed as rows x meta_cols again):
//  1. rows are interleaved within bands of `band` rows (32 for 16-bit metadata, 16 for 32-bit):
//     row r goes to band_start + (r % 8) * (band / 8) + (r % band) / 8;
//  2. within each 2 x 2 tile of (interleaved row, col), the top-right and bottom-left entries swap;
//  3. the matrix is stored column-major in pairs of columns ("ColumnMajorInterleaved<2>"):
//     offset = (col / 2) * (2 * rows) + row * 2 + col % 2.
SPX_HD int64_t meta_reordered_offset(int64_t row, int64_t col, int64_t rows, int meta_bytes) {
  const int64_t band = meta_bytes == 2 ? 32 : 16;
  int64_t r = row - row % band + (row % 8) * (band / 8) + (row % band) / 8;
  int64_t c = col;
  const int64_t swap = (r & 1) ^ (c & 1);  // off-diagonal entry of its 2 x 2 tile
  const int64_t down = swap & (c & 1);      // top-right moves down-left; bottom-left moves up-right
  r += swap * (2 * down - 1);
  c -= swap * (2 * down - 1);
  return (c >> 1) * (2 * rows) + r * 2 + (c & 1);
}

}  // namespace sparsity_ext
