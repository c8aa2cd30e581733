// Host-side flow of the CUDA block-norm masks and of select_threshold: which kernels run, in which
// order, on which buffers. Everything runs on the current stream without a host synchronization: k is
// computed on the host from the shape, and the threshold key and tie cut-off stay in a device-side
// RadixState that the later kernels read. Kernels are started through launch() (cuda/launch.h), so the
// same flow also runs under the CPU emulation of tests/cuda_emulation.
//
// Extra memory: 4 bytes per block (keys), +8 per block (cuts) for blocks that are not one row of <= 32
// columns when zeros_per_block < block size, a 50 KB workspace, and one counter per 8192 blocks for
// splitting ties at the threshold.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <utility>

#include "common/mask_math.h"
#include "common/op_args.h"
#include "cuda/launch.h"
#include "cuda/apply_mask.cuh"
#include "cuda/mask_kernels.cuh"

namespace sparsity_ext {
namespace cuda {

// Device-side state of one radix select; zero-initialized (at::zeros) before the first pass.
struct SelectWorkspace {
  unsigned long long hist[kRadixPasses][kRadixBins];
  RadixState state;
};

inline SelectWorkspace* new_workspace(at::Tensor& storage, const at::TensorOptions& options) {
  storage = at::zeros({static_cast<int64_t>(sizeof(SelectWorkspace))}, options.dtype(at::kByte));
  return reinterpret_cast<SelectWorkspace*>(storage.data_ptr<uint8_t>());
}

// Radix select of the k-th smallest of keys(i), i < n; pass 0's histogram is already in ws->hist[0]
// when first_pass_done.
template <class Keys>
void radix_select(const Keys& keys, int64_t n, int64_t k, SelectWorkspace* ws, bool first_pass_done,
                  cudaStream_t stream) {
  for (int pass = 0; pass < kRadixPasses; ++pass) {
    if (pass > 0 || !first_pass_done) {
      launch(radix_hist_kernel<Keys>, grid_for(radix_hist_kernel<Keys>, n), stream, keys, n,
             pass == 0 ? nullptr : &ws->state, pass, ws->hist[pass]);
    }
    launch(radix_step_kernel, 1, stream, ws->hist[pass], &ws->state, pass, k);
  }
}

template <typename T>
void launch_block_keys(const T* data, const KeysArgs& args, cudaStream_t stream) {
  const BlockGrid& g = args.grid;
  const int64_t n = g.num_blocks();
  if (g.block_rows == 1 && g.block_cols == 4) {
    launch(block_keys_kernel<T, 4>, grid_for(block_keys_kernel<T, 4>, n), stream, data, args);
  } else if (g.block_rows == 1 && g.block_cols == 8) {
    launch(block_keys_kernel<T, 8>, grid_for(block_keys_kernel<T, 8>, n), stream, data, args);
  } else {
    launch(block_keys_kernel<T, 0>, grid_for(block_keys_kernel<T, 0>, n), stream, data, args);
  }
}

template <typename T, ZeroMode kMode, int kGroup>
void launch_mask(T* data, const MaskArgs& args, cudaStream_t stream) {
  const int64_t chunks = (args.grid.rows * args.grid.cols + kChunk - 1) / kChunk;
  launch(mask_kernel<T, kMode, kGroup>, grid_for(mask_kernel<T, kMode, kGroup>, chunks), stream, data, args);
}

// The whole block_norm_mask(_apply_) pipeline for data of storage type T (see the file comment).
template <typename T>
void block_mask(T* data, int64_t ld, const BlockGrid& grid, double sparsity_level, int64_t zeros_per_block,
                       int norm, bool packed, bool apply, at::Tensor& mask) {
  const int64_t num_blocks = grid.num_blocks();
  const int64_t k = num_selected_blocks(sparsity_level, num_blocks);
  if (k == 0 || zeros_per_block == 0) {
    fill_ones(mask, packed, grid.rows * grid.cols);
    return;
  }
  const cudaStream_t stream = current_stream();
  const bool all_selected = k == num_blocks;
  const ZeroMode mode = zero_mode(grid, zeros_per_block);
  const at::TensorOptions options = mask.options();
  // uninitialized O(num_blocks) buffers: every entry is written by block_keys_kernel
  const at::Tensor keys = all_selected ? at::Tensor() : at::empty({num_blocks}, options.dtype(at::kInt));
  const at::Tensor cuts = mode == ZeroMode::kCut ? at::empty({num_blocks}, options.dtype(at::kLong)) : at::Tensor();
  uint32_t* key_data = keys.defined() ? reinterpret_cast<uint32_t*>(keys.data_ptr<int32_t>()) : nullptr;
  uint64_t* cut_data = cuts.defined() ? reinterpret_cast<uint64_t*>(cuts.data_ptr<int64_t>()) : nullptr;
  at::Tensor workspace_storage;
  SelectWorkspace* ws = key_data ? new_workspace(workspace_storage, options) : nullptr;

  if (key_data || cut_data) {
    const int64_t vector_bytes = std::min<int64_t>(16, grid.block_cols * static_cast<int64_t>(sizeof(T)));
    const bool vector_rows = grid.block_rows == 1 && (grid.block_cols == 4 || grid.block_cols == 8) &&
                             aligned(data, vector_bytes) && (ld * static_cast<int64_t>(sizeof(T))) % vector_bytes == 0;
    const KeysArgs args{ld,          grid,     norm,     zeros_per_block, vector_rows,
                              key_data,    cut_data, ws ? ws->hist[0] : nullptr};
    launch_block_keys(data, args, stream);
  }
  if (key_data) {
    radix_select(KeyArray{key_data}, num_blocks, k, ws, /*first_pass_done=*/true, stream);
    // when the blocks equal to the threshold are only partly selected: the last selected one
    const int64_t tiles = (num_blocks + kTieTile - 1) / kTieTile;
    const at::Tensor tile_counts = at::empty({tiles}, options.dtype(at::kInt));
    unsigned* counts = reinterpret_cast<unsigned*>(tile_counts.data_ptr<int32_t>());
    launch(tie_count_kernel, static_cast<unsigned>(tiles), stream, key_data, num_blocks, &ws->state, counts);
    launch(tie_find_kernel, 1, stream, key_data, num_blocks, &ws->state, counts, tiles);
  }

  // kRowRank fast path: every 32-element chunk lies in one row, read with 16-byte loads
  const bool row_vectors = grid.block_rows == 1 && grid.cols % kChunk == 0 && aligned(data, 16) &&
                           (ld * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  MaskArgs args{ld,       grid,     zeros_per_block, norm,  key_data, ws ? &ws->state : nullptr,
                      cut_data, mask.data_ptr(), packed,   apply, false};
  switch (mode) {
    case ZeroMode::kWholeBlock: {
      const int64_t spans = (grid.rows * grid.cols + kSpan - 1) / kSpan;  // one warp each
      return launch(whole_block_mask_kernel<T>, grid_for(whole_block_mask_kernel<T>, spans * 32), stream, data, args);
    }
    case ZeroMode::kCut:
      return launch_mask<T, ZeroMode::kCut, 1>(data, args, stream);
    case ZeroMode::kRowRank:
      args.vector_rows = row_vectors && (grid.block_cols == 4 || grid.block_cols == 8);
      // Without the vector path a block may straddle two threads' chunks, and one thread would zero
      // elements the other still ranks: write the mask first, then zero in a second pass.
      args.apply = apply && args.vector_rows;
      if (grid.block_cols <= 4) {
        launch_mask<T, ZeroMode::kRowRank, 4>(data, args, stream);
      } else if (grid.block_cols <= 8) {
        launch_mask<T, ZeroMode::kRowRank, 8>(data, args, stream);
      } else {
        launch_mask<T, ZeroMode::kRowRank, 32>(data, args, stream);
      }
      if (apply && !args.apply) {
        const int64_t numel = grid.rows * grid.cols;
        launch_apply_mask(data, numel, grid.cols, ld, packed ? nullptr : static_cast<const bool*>(mask.data_ptr()),
                          packed ? static_cast<const uint8_t*>(mask.data_ptr()) : nullptr, stream);
      }
      return;
  }
}

// The k-th smallest of `values` (1-D, contiguous, storage type T): (fp32 value, int64 tie rank), 0-d
// tensors on values' device.
template <typename T>
std::pair<at::Tensor, at::Tensor> select_kth(const T* values, int64_t n, int64_t k, const at::TensorOptions& options) {
  const cudaStream_t stream = current_stream();
  at::Tensor workspace_storage;
  SelectWorkspace* ws = new_workspace(workspace_storage, options);
  radix_select(ValueKeys<T>{values}, n, k, ws, /*first_pass_done=*/false, stream);
  at::Tensor value = at::empty({}, options.dtype(at::kFloat));
  at::Tensor tie_rank = at::empty({}, options.dtype(at::kLong));
  launch(select_finish_kernel, 1, stream, static_cast<const RadixState*>(&ws->state), value.data_ptr<float>(),
         tie_rank.data_ptr<int64_t>());
  return {value, tie_rank};
}

}  // namespace cuda
}  // namespace sparsity_ext
