"""sparsity_ext.checkpoint: format detection by content, the streaming safetensors writer, the packed layout
(read back by safetensors alone and restored bit for bit), and damaged files."""
import errno
import json
import os
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sparsity_ext import checkpoint as ckpt
from sparsity_ext import load_checkpoint, ops


def _bytes_of(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_same_bytes(a, b, name=""):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    assert torch.equal(_bytes_of(a), _bytes_of(b)), name


def _sparse(shape, dtype, block=(1, 4), level=0.8, seed=0):
    """Random data zeroed as torch.ao.pruning zeroes it (x * mask: negatives become -0.0), plus special values."""
    data = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    rows = shape[0] if len(shape) >= 2 else 1
    mask = ops.block_norm_mask(data.reshape(rows, data.numel() // max(1, rows)), level, block, block[0] * block[1],
                               1).reshape(shape)
    data = data * mask.to(dtype)
    flat = data.view(-1)
    if flat.numel() > 8:
        kept = mask.view(-1).nonzero().view(-1)
        flat[kept[0]] = 0.0  # a kept zero
        flat[kept[1]] = float("inf")
        flat[kept[2]] = float("nan")
    return data


def _write_packed(path, tensors, blocks, metadata=None):
    source = ckpt.Checkpoint.from_object(tensors)
    source.metadata = metadata or {}
    with open(path, "w+b") as handle:
        return ckpt.write_safetensors(handle, source, blocks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,block", [((37, 23), (1, 4)), ((37, 23), (2, 3)), ((64, 16), (1, 1)),
                                         ((101,), (1, 4)), ((5, 3, 7), (1, 2)), ((0, 8), (1, 4)), ((3, 5), (4, 4))])
def test_packed_round_trip_bit_for_bit(tmp_path, dtype, shape, block):
    tensors = {"table": _sparse(shape, dtype, block), "bias": torch.randn(7).to(dtype), "step": torch.tensor(3)}
    assert shape == (0, 8) or torch.signbit(tensors["table"][tensors["table"] == 0]).any()
    path = tmp_path / "m.sparse.safetensors"
    _write_packed(path, tensors, {"table": block})
    restored = load_checkpoint(path)
    assert set(restored) == set(tensors)
    for name, tensor in tensors.items():
        _assert_same_bytes(restored[name], tensor, name)


@pytest.mark.parametrize("block", [(2, 4), (1, 4)])
def test_packed_chunks_give_the_same_bytes(tmp_path, monkeypatch, block):
    """Packing and restoring go through large tensors in slices; slice boundaries change nothing."""
    tensors = {"table": _sparse((203, 40), torch.float32, block)}
    whole, sliced = tmp_path / "whole.safetensors", tmp_path / "sliced.safetensors"
    _write_packed(whole, tensors, {"table": block})
    monkeypatch.setattr(ckpt, "_ROW_CHUNK_BYTES", 1000)  # 8 or 16 rows per slice
    _write_packed(sliced, tensors, {"table": block})
    assert whole.read_bytes() == sliced.read_bytes()
    _assert_same_bytes(load_checkpoint(sliced)["table"], tensors["table"])


def test_packed_file_read_by_safetensors_alone(tmp_path):
    """The documented layout, decoded with safetensors + numpy only."""
    table = _sparse((48, 20), torch.float32, (1, 4))
    path = tmp_path / "m.sparse.safetensors"
    _write_packed(path, {"emb.weight": table, "fc.bias": torch.randn(3)}, {"emb.weight": (1, 4)}, {"owner": "me"})
    with safe_open(str(path), framework="np") as handle:
        assert set(handle.keys()) == {"fc.bias", "emb.weight::values", "emb.weight::mask", "emb.weight::zero_signs"}
        metadata = handle.metadata()
        values = handle.get_tensor("emb.weight::values")
        mask = handle.get_tensor("emb.weight::mask")
        signs = handle.get_tensor("emb.weight::zero_signs")
    assert metadata["owner"] == "me"
    packed = json.loads(metadata["sparsity_ext.packed"])
    assert packed == {"format": "sparsity_ext.packed", "version": 1,
                      "tensors": {"emb.weight": {"shape": [48, 20], "dtype": "float32", "block": [1, 4]}}}
    assert mask.dtype == np.uint8 and mask.size % 8 == 0 and signs.size % 8 == 0
    kept_blocks = np.unpackbits(mask, bitorder="little")[:48 * 5].reshape(48, 5).astype(bool)
    keep = np.repeat(kept_blocks, 4, axis=1)
    dense = np.zeros((48, 20), dtype=np.float32)
    dense[keep] = values
    negative = np.unpackbits(signs, bitorder="little")[:int((~keep).sum())].astype(bool)
    dense[~keep] = np.where(negative, np.float32(-0.0), np.float32(0.0))
    assert dense.tobytes() == table.numpy().tobytes()
    assert values.size == int(keep.sum()) == int((table.view(-1, 4) != 0).any(1).sum()) * 4


def test_tensors_start_aligned(tmp_path):
    tensors = {"a16": torch.randn(3).half(), "b8": torch.ones(5, dtype=torch.uint8), "c32": torch.randn(3),
               "d64": torch.randn(1, dtype=torch.float64), "packed16": _sparse((9, 7), torch.float16),
               "packed32": _sparse((9, 7), torch.float32)}
    path = tmp_path / "m.safetensors"
    _write_packed(path, tensors, {"packed16": (1, 4), "packed32": (1, 4)})
    raw = path.read_bytes()
    header_size = struct.unpack("<Q", raw[:8])[0]
    assert (8 + header_size) % 8 == 0
    header = json.loads(raw[8:8 + header_size])  # the reserved room is padded with spaces
    sizes = {"F64": 8, "F32": 4, "F16": 2, "U8": 1}
    for key, entry in header.items():
        if key != "__metadata__":
            assert entry["data_offsets"][0] % sizes[entry["dtype"]] == 0, key
    for name, tensor in tensors.items():
        _assert_same_bytes(load_checkpoint(path)[name], tensor, name)


def test_zero_signs_empty_without_negative_zeros(tmp_path):
    table = _sparse((32, 16), torch.float32).abs()  # every zero is +0.0
    path = tmp_path / "m.safetensors"
    stored = _write_packed(path, {"t": table}, {"t": (1, 4)})
    with safe_open(str(path), framework="pt") as handle:
        assert handle.get_tensor("t::zero_signs").numel() == 0
    _assert_same_bytes(load_checkpoint(path)["t"], table)
    kept_blocks = int((table != 0).view(-1, 4).any(1).sum())
    assert stored["t"] == kept_blocks * 4 * 4 + 128 // 8  # 4 fp32 values per kept block + 128 mask bits


def test_dense_safetensors_match_the_safetensors_library(tmp_path):
    tensors = {"w": torch.randn(5, 3), "h": torch.randn(4).half(), "i": torch.arange(3), "s": torch.tensor(2.5)}
    ours = tmp_path / "ours.safetensors"
    _write_packed(ours, tensors, {}, {"k": "v"})
    theirs = tmp_path / "theirs.safetensors"
    save_file(tensors, theirs, metadata={"k": "v"})
    with safe_open(str(ours), framework="pt") as a, safe_open(str(theirs), framework="pt") as b:
        assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
        for key in a.keys():
            _assert_same_bytes(a.get_tensor(key), b.get_tensor(key), key)


# ---------------------------------------------------------------------------------- formats by content
def test_formats_recognised_by_content_not_name(tmp_path):
    tensors = {"w": torch.randn(4, 4)}
    zip_named_safetensors = tmp_path / "a.safetensors"
    torch.save(tensors, zip_named_safetensors)
    legacy = tmp_path / "b.bin"
    torch.save(tensors, legacy, _use_new_zipfile_serialization=False)
    safetensors_named_pt = tmp_path / "c.pt"
    save_file(tensors, safetensors_named_pt)
    assert ckpt.detect_format(zip_named_safetensors) == "torch-zip"
    assert ckpt.detect_format(legacy) == "torch-legacy"
    assert ckpt.detect_format(safetensors_named_pt) == "safetensors"
    for path in (zip_named_safetensors, legacy, safetensors_named_pt):
        _assert_same_bytes(load_checkpoint(path)["w"], tensors["w"], path.name)


def _random_bytes(size, seed=0):
    return bytes(torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8))


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_bytes(_random_bytes(1000)), "is not a checkpoint"),
    (lambda p: p.write_bytes(b""), "the file is empty"),
    (lambda p: p.write_bytes(b"\x80\x04\x95 a pickle, not torch.save"), "is not a checkpoint"),
    (lambda p: (torch.save({"w": torch.randn(64, 64)}, p), p.write_bytes(p.read_bytes()[:3000])),
     "damaged or truncated torch.save file"),
    (lambda p: (torch.save({"w": torch.randn(64, 64)}, p, _use_new_zipfile_serialization=False),
                p.write_bytes(p.read_bytes()[:3000])), "damaged or truncated torch.save file"),
    (lambda p: (save_file({"w": torch.randn(64, 64)}, p), p.write_bytes(p.read_bytes()[:3000])),
     "truncated safetensors file"),
    (lambda p: (save_file({"w": torch.randn(64, 64)}, p), p.write_bytes(p.read_bytes()[:40])),
     "truncated safetensors file"),
    (lambda p: p.write_bytes(struct.pack("<Q", 12) + b"{not json!!}"), "damaged safetensors header"),
])
def test_bad_files(tmp_path, make, message):
    path = tmp_path / "garbage.pt"
    make(path)
    before = path.read_bytes()
    with pytest.raises(ckpt.CheckpointError, match=message):
        load_checkpoint(path)
    assert path.read_bytes() == before


def test_pickled_objects_need_allow_pickle(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(ckpt.CheckpointError, match="holds pickled Python objects"):
        load_checkpoint(path)
    assert isinstance(load_checkpoint(path, allow_pickle=True), torch.nn.Linear)


def _rewrite_packed_metadata(path, edit):
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata()
    packed = json.loads(metadata["sparsity_ext.packed"])
    edit(packed, tensors)
    save_file(tensors, path, metadata={"sparsity_ext.packed": json.dumps(packed)})


@pytest.mark.parametrize("edit,message", [
    (lambda packed, tensors: packed.update(version=2), "version 2"),
    (lambda packed, tensors: packed["tensors"]["t"].update(block=[0, 4]), "bad entry"),
    (lambda packed, tensors: tensors.pop("t::mask"), "lacks t::mask"),
    (lambda packed, tensors: tensors.update({"t::values": tensors["t::values"][:-1]}), "values"),
])
def test_damaged_packed_file(tmp_path, edit, message):
    path = tmp_path / "m.sparse.safetensors"
    _write_packed(path, {"t": _sparse((16, 8), torch.float32)}, {"t": (1, 4)})
    _rewrite_packed_metadata(path, edit)
    with pytest.raises(ckpt.CheckpointError, match=message):
        load_checkpoint(path)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    output = tmp_path / "out.safetensors"
    output.write_bytes(b"old")

    def fail_at_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", fail_at_fsync)
    with pytest.raises(OSError):
        ckpt.atomic_write(output, lambda handle: handle.write(b"new contents"), 0o644)
    assert output.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
