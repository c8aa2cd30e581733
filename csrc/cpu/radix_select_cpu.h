// CPU radix select over uint32 order keys (csrc/common/mask_math.h): per-chunk histograms filled in
// parallel and merged in chunk order, so results never depend on the thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/mask_math.h"

namespace sparsity_ext {
namespace cpu {

// [0, n) split into `count` contiguous chunks of near-equal size.
struct Chunking {
  int64_t n;
  int64_t count;
  int64_t begin(int64_t chunk) const { return static_cast<int64_t>(static_cast<__int128>(n) * chunk / count); }
  int64_t end(int64_t chunk) const { return begin(chunk + 1); }
};

// At least `grain` items per chunk, a few chunks per thread for balance.
inline Chunking make_chunking(int64_t n, int64_t grain) {
  const int64_t by_size = (n + grain - 1) / grain;
  const int64_t by_threads = 4 * static_cast<int64_t>(at::get_num_threads());
  return Chunking{n, std::max<int64_t>(1, std::min(by_size, by_threads))};
}

// Per-chunk histograms (kRadixBins int64 each), zeroed; summed by merge_histograms.
inline std::vector<int64_t> chunk_histograms(const Chunking& chunks) {
  return std::vector<int64_t>(static_cast<size_t>(chunks.count) * kRadixBins, 0);
}

inline std::vector<int64_t> merge_histograms(const std::vector<int64_t>& per_chunk, int64_t count) {
  std::vector<int64_t> total(kRadixBins, 0);
  for (int64_t c = 0; c < count; ++c) {
    const int64_t* h = per_chunk.data() + c * kRadixBins;
    for (int d = 0; d < kRadixBins; ++d) total[d] += h[d];
  }
  return total;
}

// Histogram of pass `pass` over the keys key_at(i), i in [0, n), that match the prefix.
template <class KeyAt>
std::vector<int64_t> radix_histogram(const Chunking& chunks, const KeyAt& key_at, uint32_t prefix, int pass) {
  std::vector<int64_t> per_chunk = chunk_histograms(chunks);
  at::parallel_for(0, chunks.count, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* hist = per_chunk.data() + c * kRadixBins;
      const int64_t end = chunks.end(c);
      if (pass == 0) {
        for (int64_t i = chunks.begin(c); i < end; ++i) ++hist[radix_digit(key_at(i), 0)];
      } else {
        for (int64_t i = chunks.begin(c); i < end; ++i) {
          const uint32_t key = key_at(i);
          hist[radix_digit(key, pass)] += radix_candidate(key, prefix, pass);
        }
      }
    }
  });
  return merge_histograms(per_chunk, chunks.count);
}

// The k-th smallest key (1 <= k <= n) and its tie rank; first_pass_hist, when given, is pass 0's
// histogram computed by the caller alongside the keys.
template <class KeyAt>
RadixState radix_select(const Chunking& chunks, const KeyAt& key_at, int64_t k,
                        const std::vector<int64_t>* first_pass_hist) {
  RadixState state = radix_start(k);
  for (int pass = 0; pass < kRadixPasses; ++pass) {
    if (pass == 0 && first_pass_hist != nullptr) {
      radix_step(first_pass_hist->data(), pass, state);
    } else {
      radix_step(radix_histogram(chunks, key_at, state.prefix, pass).data(), pass, state);
    }
  }
  return state;
}

// Index of the rank-th (1-based) i with key_at(i) == key, in index order.
template <class KeyAt>
int64_t index_of_tied(const Chunking& chunks, const KeyAt& key_at, uint32_t key, int64_t rank) {
  std::vector<int64_t> equal(chunks.count, 0);
  at::parallel_for(0, chunks.count, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t count = 0;
      for (int64_t i = chunks.begin(c); i < chunks.end(c); ++i) count += key_at(i) == key;
      equal[c] = count;
    }
  });
  for (int64_t c = 0; c < chunks.count; ++c) {
    if (rank > equal[c]) {
      rank -= equal[c];
      continue;
    }
    for (int64_t i = chunks.begin(c); i < chunks.end(c); ++i) {
      if (key_at(i) == key && --rank == 0) return i;
    }
  }
  TORCH_INTERNAL_ASSERT(false, "index_of_tied: fewer keys equal to the threshold than its tie rank");
  return -1;
}

}  // namespace cpu
}  // namespace sparsity_ext
