// CPU radix select over uint32 order keys (csrc/common/mask_math.h). Histograms are kept per chunk
// of the index range, filled in parallel and merged in chunk order, so results never depend on the
// thread count.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/mask_math.h"

namespace sparsity_ext {
namespace cpu {

// [0, n) split into `count` contiguous chunks of near-equal size.
struct Chunking {
  int64_t n;
  int64_t count;
  // the first n % count chunks get one item more
  int64_t begin(int64_t chunk) const { return (n / count) * chunk + std::min(chunk, n % count); }
  int64_t end(int64_t chunk) const { return begin(chunk + 1); }
};

// At least `grain` items per chunk, a few chunks per thread for balance.
inline Chunking make_chunking(int64_t n, int64_t grain) {
  const int64_t by_size = (n + grain - 1) / grain;
  const int64_t by_threads = 4 * static_cast<int64_t>(at::get_num_threads());
  return Chunking{n, std::max<int64_t>(1, std::min(by_size, by_threads))};
}

// One kRadixBins histogram per chunk.
struct ChunkHistograms {
  explicit ChunkHistograms(int64_t chunks) : count(chunks), bins(static_cast<size_t>(chunks) * kRadixBins, 0) {}
  int64_t* of(int64_t chunk) { return bins.data() + chunk * kRadixBins; }
  const int64_t* of(int64_t chunk) const { return bins.data() + chunk * kRadixBins; }
  std::vector<int64_t> merged() const {
    std::vector<int64_t> total(kRadixBins, 0);
    for (int64_t c = 0; c < count; ++c) {
      for (int d = 0; d < kRadixBins; ++d) total[d] += of(c)[d];
    }
    return total;
  }
  int64_t count;
  std::vector<int64_t> bins;
};

// Adds the digits of pass `pass` of the keys in [begin, end) that match the prefix to hist.
template <class KeyAt>
void add_to_histogram(const KeyAt& key_at, int64_t begin, int64_t end, uint32_t prefix, int pass, int64_t* hist) {
  if (pass == 0) {
    for (int64_t i = begin; i < end; ++i) ++hist[radix_digit(key_at(i), 0)];
    return;
  }
  for (int64_t i = begin; i < end; ++i) {
    const uint32_t key = key_at(i);
    hist[radix_digit(key, pass)] += radix_candidate(key, prefix, pass);
  }
}

template <class KeyAt>
ChunkHistograms histogram_pass(const Chunking& chunks, const KeyAt& key_at, uint32_t prefix, int pass) {
  ChunkHistograms hists(chunks.count);
  at::parallel_for(0, chunks.count, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) add_to_histogram(key_at, chunks.begin(c), chunks.end(c), prefix, pass, hists.of(c));
  });
  return hists;
}

// Pass 1's histogram, and the keys whose pass-0 digit is `digit` gathered in index order (chunk c
// holds first_pass.of(c)[digit] of them).
template <class KeyAt>
ChunkHistograms gather_and_count(const Chunking& chunks, const KeyAt& key_at, const ChunkHistograms& first_pass,
                                 uint32_t digit, uint32_t* out) {
  ChunkHistograms hists(chunks.count);
  std::vector<int64_t> offset(chunks.count + 1, 0);
  for (int64_t c = 0; c < chunks.count; ++c) offset[c + 1] = offset[c] + first_pass.of(c)[digit];
  // Branch-free: whether a key survives is close to random, so each key is staged unconditionally and the
  // stage cursor advances by the match; the stage (cache-resident) is flushed to `out` every kStage keys.
  constexpr int64_t kStage = 1024;
  at::parallel_for(0, chunks.count, 1, [&](int64_t c0, int64_t c1) {
    uint32_t stage[kStage];
    for (int64_t c = c0; c < c1; ++c) {
      uint32_t* dst = out + offset[c];
      int64_t* hist = hists.of(c);
      for (int64_t begin = chunks.begin(c), end = chunks.end(c); begin < end; begin += kStage) {
        const int64_t stop = std::min(end, begin + kStage);
        int64_t staged = 0;
        for (int64_t i = begin; i < stop; ++i) {
          const uint32_t key = key_at(i);
          const int64_t match = radix_digit(key, 0) == digit;
          stage[staged] = key;
          staged += match;
          hist[radix_digit(key, 1)] += match;
        }
        std::memcpy(dst, stage, staged * sizeof(uint32_t));
        dst += staged;
      }
    }
  });
  return hists;
}

// The k-th smallest key (1 <= k <= n) and its tie rank. first_pass, when given, is pass 0's
// per-chunk histogram, computed by the caller while it produced the keys. Pass 1 also gathers the
// keys still in the running when they are at most half of all (reading n and writing at most n/2
// keys beats a second full read), and pass 2 reads only those.
template <class KeyAt>
RadixState radix_select(const Chunking& chunks, const KeyAt& key_at, int64_t k, const ChunkHistograms* first_pass) {
  RadixState state = radix_start(k);
  const ChunkHistograms own_first = first_pass ? ChunkHistograms(0) : histogram_pass(chunks, key_at, 0u, 0);
  const ChunkHistograms& pass0 = first_pass ? *first_pass : own_first;
  radix_step(pass0.merged().data(), 0, state);
  if (state.equal * 2 > chunks.n) {
    for (int pass = 1; pass < kRadixPasses; ++pass) {
      radix_step(histogram_pass(chunks, key_at, state.prefix, pass).merged().data(), pass, state);
    }
    return state;
  }
  std::vector<uint32_t> survivors(state.equal);
  radix_step(gather_and_count(chunks, key_at, pass0, radix_digit(state.prefix, 0), survivors.data()).merged().data(), 1,
             state);
  const uint32_t* data = survivors.data();
  const auto survivor_at = [data](int64_t i) { return data[i]; };
  const Chunking survivor_chunks = make_chunking(static_cast<int64_t>(survivors.size()), 1 << 16);
  radix_step(histogram_pass(survivor_chunks, survivor_at, state.prefix, 2).merged().data(), 2, state);
  return state;
}

// How many i of each chunk have key_at(i) == key.
template <class KeyAt>
std::vector<int64_t> equal_per_chunk(const Chunking& chunks, const KeyAt& key_at, uint32_t key) {
  std::vector<int64_t> equal(chunks.count, 0);
  at::parallel_for(0, chunks.count, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t count = 0;
      for (int64_t i = chunks.begin(c), end = chunks.end(c); i < end; ++i) count += key_at(i) == key;
      equal[c] = count;
    }
  });
  return equal;
}

// Index of the rank-th (1-based) i with key_at(i) == key, in index order, given equal_per_chunk's counts.
template <class KeyAt>
int64_t index_of_tied(const Chunking& chunks, const KeyAt& key_at, uint32_t key, int64_t rank,
                      const std::vector<int64_t>& equal) {
  for (int64_t c = 0; c < chunks.count; ++c) {
    if (rank > equal[c]) {
      rank -= equal[c];
      continue;
    }
    for (int64_t i = chunks.begin(c), end = chunks.end(c); i < end; ++i) {
      if (key_at(i) == key && --rank == 0) return i;
    }
  }
  TORCH_INTERNAL_ASSERT(false, "index_of_tied: fewer keys equal to the threshold than its tie rank");
  return -1;
}

template <class KeyAt>
int64_t index_of_tied(const Chunking& chunks, const KeyAt& key_at, uint32_t key, int64_t rank) {
  return index_of_tied(chunks, key_at, key, rank, equal_per_chunk(chunks, key_at, key));
}

}  // namespace cpu
}  // namespace sparsity_ext
