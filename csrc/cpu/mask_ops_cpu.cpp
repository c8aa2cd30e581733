// CPU kernels for the mask-format ops: pack_mask, unpack_mask, apply_mask_.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/mask_math.h"
#include "common/op_args.h"

namespace sparsity_ext {
namespace {

constexpr int64_t kGrain = 1 << 16;  // elements per parallel task: large enough to amortize a task

at::Tensor pack_mask_cpu(const at::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, "pack_mask: mask must be bool, got ", mask.scalar_type());
  const at::Tensor flat = mask.contiguous().view(-1);
  const int64_t numel = flat.numel();
  const int64_t nbytes = (numel + 7) / 8;
  at::Tensor packed = at::empty({nbytes}, mask.options().dtype(at::kByte));
  const bool* src = flat.data_ptr<bool>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  at::parallel_for(0, nbytes, kGrain / 8, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t base = 8 * j;
      const int64_t count = std::min<int64_t>(8, numel - base);
      uint8_t byte = 0;
      for (int64_t i = 0; i < count; ++i) byte |= static_cast<uint8_t>(src[base + i]) << i;
      dst[j] = byte;
    }
  });
  return packed;
}

at::Tensor unpack_mask_cpu(const at::Tensor& packed, at::IntArrayRef shape) {
  TORCH_CHECK(packed.scalar_type() == at::kByte, "unpack_mask: packed must be uint8, got ", packed.scalar_type());
  at::Tensor mask = at::empty(shape, packed.options().dtype(at::kBool));
  const int64_t numel = mask.numel();
  TORCH_CHECK(packed.numel() == (numel + 7) / 8, "unpack_mask: packed has ", packed.numel(),
              " bytes, shape ", shape, " needs ", (numel + 7) / 8);
  const at::Tensor src_t = packed.contiguous();
  const uint8_t* src = src_t.data_ptr<uint8_t>();
  bool* dst = mask.data_ptr<bool>();
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dst[i] = (src[i >> 3] >> (i & 7)) & 1;
  });
  return mask;
}

// Keep bits of the 8 elements starting at element 8 * group: one byte of a packed mask, or 8 bools.
inline unsigned keep_bits(const bool* keep, int64_t group) {
  uint64_t word;
  std::memcpy(&word, keep + 8 * group, 8);
  return static_cast<unsigned>((word * 0x0102040810204080ull) >> 56);
}

// Lane masks of the 8 keep bits of a byte: entry b, lane i is all ones where bit i of b is set.
template <typename Word>
struct LaneMasks {
  Word lanes[256][8];
  LaneMasks() {
    for (unsigned b = 0; b < 256; ++b) {
      for (int i = 0; i < 8; ++i) lanes[b][i] = static_cast<Word>(Word{0} - static_cast<Word>((b >> i) & 1u));
    }
  }
};

// data[i] = data[i] * 0 (times_zero: -0.0 for a negative x, NaN for inf and NaN, byte for byte what torch's
// data * mask writes) where element i's keep bit is 0, 8 elements at a time, branch-free: each element's bits
// are blended with those of its product with 0 through the lane masks of its keep byte (a loop the compiler
// vectorizes). Masks look random to a branch predictor, and a store to part of a cache line reads the line
// anyway, so branching on all-dropped or all-kept groups saves no memory traffic.
template <typename S, class GroupBits>
void zero_dropped_groups(S* data, int64_t numel, const GroupBits& group_bits, const bool* keep, const uint8_t* bits) {
  using Word = std::conditional_t<sizeof(S) == 8, uint64_t, std::conditional_t<sizeof(S) == 4, uint32_t, uint16_t>>;
  static_assert(sizeof(Word) == sizeof(S), "apply_mask_: unsupported element size");
  static const LaneMasks<Word> masks;
  const int64_t full_groups = numel / 8;
  at::parallel_for(0, full_groups, kGrain / 8, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const Word* lanes = masks.lanes[group_bits(g)];
      S values[8], zeroed[8];
      std::memcpy(values, data + 8 * g, sizeof(values));
      Word words[8], zero_words[8];
      std::memcpy(words, values, sizeof(words));
      if constexpr (sizeof(S) == 2) {
        // fp16/bf16: a finite x * 0 is the zero of x's sign (its sign bit alone), computed on the bits for all 8
        // at once; a group holding an inf or NaN (exponent all ones) takes times_zero's multiply for its NaN.
        constexpr Word kExponent = std::is_same_v<S, half_storage> ? Word{0x7c00} : Word{0x7f80};
        bool special = false;
        for (int i = 0; i < 8; ++i) special |= (words[i] & kExponent) == kExponent;
        if (!special) {
          for (int i = 0; i < 8; ++i) zero_words[i] = words[i] & Word{0x8000};
        } else {
          for (int i = 0; i < 8; ++i) zeroed[i] = times_zero(values[i]);
          std::memcpy(zero_words, zeroed, sizeof(zero_words));
        }
      } else {
        for (int i = 0; i < 8; ++i) zeroed[i] = times_zero(values[i]);
        std::memcpy(zero_words, zeroed, sizeof(zero_words));
      }
      for (int i = 0; i < 8; ++i) words[i] = (words[i] & lanes[i]) | (zero_words[i] & ~lanes[i]);
      std::memcpy(data + 8 * g, words, sizeof(words));
    }
  });
  for (int64_t i = 8 * full_groups; i < numel; ++i) {  // the last partial group
    const bool kept = keep ? keep[i] : (bits[i >> 3] >> (i & 7)) & 1;
    data[i] = kept ? data[i] : times_zero(data[i]);
  }
}

template <typename S>
void apply_mask_kernel(S* data, const at::Tensor& mask, int64_t numel) {
  if (mask.scalar_type() == at::kBool) {
    const bool* keep = mask.data_ptr<bool>();
    zero_dropped_groups(data, numel, [keep](int64_t g) { return keep_bits(keep, g); }, keep, nullptr);
  } else {
    const uint8_t* bits = mask.data_ptr<uint8_t>();
    zero_dropped_groups(data, numel, [bits](int64_t g) { return static_cast<unsigned>(bits[g]); }, nullptr, bits);
  }
}

void apply_mask__cpu(at::Tensor& data, const at::Tensor& mask) {
  check_mask_format_arg("apply_mask_", data, mask);
  // Work on a contiguous buffer; copy back only when data itself is not contiguous.
  at::Tensor work = data.contiguous();
  const at::Tensor mask_c = mask.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, data.scalar_type(), "apply_mask_cpu", [&] {
    using S = typename Storage<scalar_t>::type;
    apply_mask_kernel<S>(reinterpret_cast<S*>(work.data_ptr<scalar_t>()), mask_c, work.numel());
  });
  if (!work.is_same(data)) data.copy_(work);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsity_ext, CPU, m) {
  m.impl("pack_mask", &pack_mask_cpu);
  m.impl("unpack_mask", &unpack_mask_cpu);
  m.impl("apply_mask_", &apply_mask__cpu);
}

}  // namespace sparsity_ext
