"""Checkpoint files: read by their content, written by the output's name, and a compact sparse layout.

Reading (`open_checkpoint`, `load_checkpoint`) recognises a file by its first bytes, never by its name:
a torch.save zip archive, a legacy torch.save pickle, a safetensors file, or a packed sparse file (below).
Safetensors files are read one tensor at a time (validated by the safetensors library, read with plain reads);
torch zip archives are memory-mapped privately (writing to a tensor never reaches the file).

Writing goes to a temporary file in the output's directory, which is fsync'ed and renamed over the output
(`atomic_write`): the output is the old file or the complete new one, whatever happens meanwhile.
`SafetensorsWriter` streams tensors into a safetensors file one at a time, so that writing a checkpoint
needs no more memory than its largest tensor.

Packed layout (format "sparsity_ext.packed", version 1): a plain safetensors file any safetensors reader
opens. A tensor that was not packed is stored under its own name as it was. A packed tensor NAME is
viewed as a 2-D table (1-D: one row; N-D: shape[0] rows) cut into blocks of `block` = (rows, cols), edge
blocks partial, and stored as three 1-D tensors:
  NAME::values      the tensor's dtype: every element of the kept blocks, in row-major order
  NAME::mask        uint8: one bit per block, row-major over the block grid, 1 = kept (a block is dropped
                    only when all its elements are zeros), in ops.pack_mask's layout (bit i of byte j is
                    block 8j+i); zero bytes pad it to a multiple of 8 bytes, so that tensors stay aligned
  NAME::zero_signs  uint8: the sign bits of the dropped elements (+0.0 or -0.0: torch.ao.pruning zeroes
                    by multiplying, so a zeroed negative weight is -0.0) in row-major order, same bit layout
                    and padding; empty when every dropped element is +0.0
The metadata entry "sparsity_ext.packed" is JSON: {"format": "sparsity_ext.packed", "version": 1,
"tensors": {NAME: {"shape": [...], "dtype": "float32", "block": [rows, cols]}}}; the other metadata
entries are the checkpoint's own. Restoring gives back the dense tensor bit for bit.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch

from . import ops
from .checks import FLOAT_DTYPES

__all__ = ["CheckpointError", "Checkpoint", "detect_format", "open_checkpoint", "load_checkpoint", "SafetensorsWriter",
           "TensorPacker", "packed_part_names", "write_safetensors", "atomic_write", "PACKED_FORMAT", "PACKED_VERSION",
           "PACKED_METADATA_KEY", "SAFETENSORS_DTYPES"]

PACKED_FORMAT = "sparsity_ext.packed"
PACKED_VERSION = 1
PACKED_METADATA_KEY = "sparsity_ext.packed"
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
                      torch.float8_e5m2: "F8_E5M2", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64"}
_DTYPES_BY_NAME = {str(d).removeprefix("torch."): d for d in SAFETENSORS_DTYPES}
# Integer views with the float dtypes' element sizes: zeros and their signs are tested on the bits.
_BITS_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_ZIP_MAGIC = b"PK\x03\x04"
_TORCH_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")  # torch.serialization.MAGIC_NUMBER
_MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library refuses larger headers
_ROW_CHUNK_BYTES = 64 << 20  # packing and restoring go through a tensor in slices of about this size
_PART_SUFFIXES = ("::values", "::mask", "::zero_signs")


class CheckpointError(ValueError):
    """A file that is not a checkpoint this module can read, or is damaged; the message says which."""


# ------------------------------------------------------------------------------------ detection
def detect_format(path: Path) -> str:
    """'torch-zip', 'torch-legacy' or 'safetensors' from the file's first bytes; raises CheckpointError."""
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} is not a file")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.startswith(_ZIP_MAGIC):
        return "torch-zip"
    if head[:1] == b"\x80" and _TORCH_LEGACY_MAGIC in head[:32]:  # pickle PROTO, then torch's magic number
        return "torch-legacy"
    if len(head) >= 9 and head[8:9] == b"{":
        header_size = struct.unpack("<Q", head[:8])[0]
        if header_size <= _MAX_SAFETENSORS_HEADER:
            if header_size > size - 8:
                raise CheckpointError(f"{str(path)!r} is a truncated safetensors file: its header alone needs "
                                      f"{header_size + 8:,} bytes, the file has {size:,}")
            return "safetensors"
    shown = head[:8].hex(" ") if head else "(the file is empty)"
    raise CheckpointError(f"{str(path)!r} is not a checkpoint: neither a torch.save file (zip or legacy pickle) "
                          f"nor a safetensors file (first bytes: {shown})")


def _read_safetensors_header(path: Path) -> dict:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header_size = struct.unpack("<Q", handle.read(8))[0]
        raw = handle.read(header_size)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
        data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
                       default=0)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"{str(path)!r} has a damaged safetensors header ({exc})") from None
    if 8 + header_size + data_end > size:
        raise CheckpointError(f"{str(path)!r} is a truncated safetensors file: its header describes "
                              f"{8 + header_size + data_end:,} bytes, the file has {size:,}")
    return header


# ------------------------------------------------------------------------------------ reading
def _named_tensors(obj, prefix: str = "") -> tuple[dict[str, torch.Tensor], list[str]]:
    """({dotted name: tensor}, names of the non-tensor leaves) of a state_dict (nested mappings flattened)
    or of a model (its state_dict)."""
    if isinstance(obj, torch.nn.Module):
        return {prefix + name: t for name, t in obj.state_dict().items()}, []
    tensors, others = {}, []
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            found, nested_others = {name: value}, []
        elif isinstance(value, (Mapping, torch.nn.Module)):
            found, nested_others = _named_tensors(value, name + ".")
        else:
            found, nested_others = {}, [name]
        clash = tensors.keys() & found.keys()
        if clash:
            raise CheckpointError(f"two entries of the checkpoint flatten to the same name {sorted(clash)[0]!r}")
        tensors.update(found)
        others += nested_others
    return tensors, others


class Checkpoint:
    """An opened checkpoint: its tensors by dotted name, read one at a time where the format allows.

    kind: 'torch' (torch.save file or an in-memory object), 'safetensors', or 'packed' (the layout above).
    obj: for 'torch', the loaded object; `tensor(name)` returns the very tensor inside it.
    metadata: a safetensors file's metadata (without the packed entry); {} for torch files.
    non_tensors: dotted names of a torch checkpoint's entries that are not tensors (epoch counters, ...).
    """

    def __init__(self, kind: str, names: list[str], *, metadata: dict[str, str] | None = None, obj=None,
                 tensors: dict[str, torch.Tensor] | None = None, non_tensors: list[str] | None = None,
                 file=None, header: dict | None = None, packed: dict[str, dict] | None = None):
        """Use open_checkpoint or from_object. file, header, packed: a _SafetensorsFile, its header, the packed
        tensors' metadata entries; tensors: a torch checkpoint's {name: tensor}."""
        self.kind, self.names, self.metadata, self.obj = kind, names, metadata or {}, obj
        self.non_tensors = non_tensors or []
        self._tensors, self._file, self._header, self._packed = tensors or {}, file, header or {}, packed or {}

    @classmethod
    def from_object(cls, obj) -> "Checkpoint":
        """A torch state_dict (nested mappings allowed) or model already in memory."""
        if not isinstance(obj, (Mapping, torch.nn.Module)):
            raise CheckpointError(f"holds a {type(obj).__name__}, not a state_dict or a model")
        tensors, others = _named_tensors(obj)
        return cls("torch", list(tensors), obj=obj, tensors=tensors, non_tensors=others)

    def shape_and_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        if self.kind == "torch":
            return tuple(self._tensors[name].shape), self._tensors[name].dtype
        if name in self._packed:
            info = self._packed[name]
            return tuple(info["shape"]), _DTYPES_BY_NAME[info["dtype"]]
        entry = self._header[name]
        return tuple(entry["shape"]), _dtype_of(entry["dtype"], name)

    def tensor(self, name: str) -> torch.Tensor:
        """The dense tensor `name` (for a file: freshly read, so writing to it leaves the file alone)."""
        if self.kind == "torch":
            return self._tensors[name]
        if name in self._packed:
            return _restore(self._file, name, self._packed[name])
        return self._file.get_tensor(name)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _dtype_of(code: str, name: str) -> torch.dtype:
    for dtype, dtype_code in SAFETENSORS_DTYPES.items():
        if dtype_code == code:
            return dtype
    raise CheckpointError(f"tensor {name!r} has a dtype this module does not handle: {code}")


def _torch_load(path: Path, kind: str, allow_pickle: bool):
    # torch.load reads a path named *.safetensors as safetensors, whatever it holds: such a file goes in as an
    # open handle, which cannot be memory-mapped; neither can legacy pickles.
    by_handle = path.name.endswith(".safetensors")
    mmap = kind == "torch-zip" and not by_handle
    with open(path, "rb") if by_handle else contextlib.nullcontext(path) as source:
        return _torch_load_from(source, path, mmap, allow_pickle)


def _torch_load_from(source, path: Path, mmap: bool, allow_pickle: bool):
    try:
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch.load raises many types on damaged files
        message = str(exc)
        if "Unsupported global" not in message and "Unsupported operand" not in message:
            first_line = message.strip().splitlines()[-1] if message.strip() else type(exc).__name__
            raise CheckpointError(f"{str(path)!r} is a damaged or truncated torch.save file "
                                  f"({type(exc).__name__}: {first_line})") from exc
        if not allow_pickle:
            raise CheckpointError(f"{str(path)!r} holds pickled Python objects (a whole model?); loading it runs "
                                  f"code from the file: pass --allow-pickle if you trust it") from exc
    if hasattr(source, "seek"):
        source.seek(0)
    try:
        return torch.load(source, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as exc:
        raise CheckpointError(f"cannot load {str(path)!r}: {type(exc).__name__}: {exc}") from exc


def open_checkpoint(path, *, allow_pickle: bool = False) -> Checkpoint:
    """Opens a checkpoint file of any supported format, recognised by its content.

    Args:
        path: a torch.save file (zip or legacy), a safetensors file, or a packed sparse file.
        allow_pickle: let torch.load run the pickled code of a file that holds Python objects (whole models).
    Returns:
        a Checkpoint (close it, or use it as a context manager).
    Raises:
        CheckpointError: not a checkpoint, damaged or truncated, or pickled objects without allow_pickle.
    """
    path = Path(path)
    kind = detect_format(path)
    if kind != "safetensors":
        return Checkpoint.from_object(_torch_load(path, kind, allow_pickle))
    header = _read_safetensors_header(path)
    metadata = dict(header.get("__metadata__") or {})
    packed_json = metadata.pop(PACKED_METADATA_KEY, None)
    names = [key for key in header if key != "__metadata__"]
    packed = {} if packed_json is None else _parse_packed_metadata(path, packed_json, header)
    if packed:
        parts = {part for name in packed for part in packed_part_names(name)}
        names = [key for key in names if key not in parts] + list(packed)
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu"):  # the library's checks of offsets, sizes, dtypes
            pass
    except Exception as exc:  # safetensors raises its own SafetensorError on inconsistent files
        raise CheckpointError(f"{str(path)!r} is a damaged safetensors file ({exc})") from exc
    return Checkpoint("packed" if packed_json is not None else "safetensors", names, metadata=metadata,
                      file=_SafetensorsFile(path, header), header=header, packed=packed)


class _SafetensorsFile:
    """Reads a (validated) safetensors file's tensors one at a time into fresh memory.

    Not through safe_open's tensors: they are views of one private mapping of the whole file, so the pages of
    every tensor sparsified in place would stay in memory until the file is closed (a 4 GiB checkpoint peaked
    at 4.45 GiB of anonymous memory that way); a plain read costs the same copy and frees it with the tensor.
    """

    def __init__(self, path: Path, header: dict):
        self._handle = open(path, "rb")
        self._header = header
        self._data_start = 8 + struct.unpack("<Q", self._handle.read(8))[0]

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self._header[name]
        dtype, shape = _dtype_of(entry["dtype"], name), tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        data = torch.empty(end - begin, dtype=torch.uint8)
        self._handle.seek(self._data_start + begin)
        if self._handle.readinto(memoryview(data.numpy())) != end - begin:
            raise CheckpointError(f"tensor {name!r} is cut short: the file was truncated while being read")
        return data.view(dtype).reshape(shape)

    def close(self) -> None:
        self._handle.close()


def load_checkpoint(path, *, allow_pickle: bool = False):
    """The dense contents of a checkpoint file, whatever its format (recognised by content).

    Args:
        path: a torch.save file, a safetensors file, or a packed sparse file written by `sparsity-ext sparsify`.
        allow_pickle: see open_checkpoint.
    Returns:
        for safetensors and packed files, {name: tensor} with every packed tensor restored bit for bit
        (the sign of zeros included); for torch.save files, what torch.load returns (weights only).
    """
    with open_checkpoint(path, allow_pickle=allow_pickle) as checkpoint:
        if checkpoint.kind == "torch":
            return checkpoint.obj
        return {name: checkpoint.tensor(name) for name in checkpoint.names}


# -------------------------------------------------------------------------------------- packing
def packed_part_names(name: str) -> tuple[str, str, str]:
    """Keys of a packed tensor's values, mask and zero_signs in the safetensors file."""
    return tuple(name + suffix for suffix in _PART_SUFFIXES)


def _grid(shape, block) -> tuple[int, int, int, int]:
    """(rows, cols, block rows, block cols) of the 2-D view of a tensor of `shape`."""
    numel = math.prod(shape)
    rows = shape[0] if len(shape) >= 2 else 1
    cols = numel // rows if rows else 0
    return rows, cols, -(-rows // block[0]), -(-cols // block[1])


def _padded_bytes(num_bits: int) -> int:
    return -(-num_bits // 64) * 8


def _chunk_rows(cols: int, element_size: int, block_rows: int) -> int:
    """Rows per slice: a multiple of 8 block rows (so each slice's mask bits fill whole bytes)."""
    unit = 8 * block_rows
    return max(1, _ROW_CHUNK_BYTES // max(1, cols * element_size * unit)) * unit


def _expand(block_flags: torch.Tensor, block, rows: int, cols: int) -> torch.Tensor:
    """Per-element flags of a (rows, cols) slice from the flags of its blocks."""
    return block_flags.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]


class TensorPacker:
    """Packs one dense float tensor (see the module docstring): iterate `values()` first (the slices of
    NAME::values), then `mask()` and `zero_signs()` hold the padded bit bytes."""

    def __init__(self, tensor: torch.Tensor, block: tuple[int, int]):
        if tensor.dtype not in FLOAT_DTYPES:
            raise TypeError(f"only float tensors are packed, got {tensor.dtype}")
        self.tensor, self.block = tensor, tuple(block)
        self._mask_bytes: list[torch.Tensor] = []
        self._sign_bytes: list[torch.Tensor] = []
        self._sign_carry = torch.zeros(0, dtype=torch.bool)
        self._dropped = 0

    def values(self) -> Iterator[torch.Tensor]:
        rows, cols, _, _ = _grid(self.tensor.shape, self.block)
        table = self.tensor.contiguous().reshape(rows, cols)
        # Values and signs are moved as integers: copies of the bits, whatever they encode (NaN payloads too).
        bits = table.view(_BITS_DTYPES[self.tensor.element_size()])
        # Blocks of one row whose width divides the row's (1x4, 1x1, ...) are runs of consecutive elements:
        # they are selected whole, much faster than element by element.
        runs = self.block[0] == 1 and cols % self.block[1] == 0
        step = _chunk_rows(cols, bits.element_size(), self.block[0])
        for start in range(0, rows, step):
            chunk, chunk_bits = table[start:start + step], bits[start:start + step]
            if runs:
                groups, group_bits = chunk.reshape(-1, self.block[1]), chunk_bits.reshape(-1, self.block[1])
                kept_blocks = (groups != 0).any(1)  # -0.0 == 0; NaN != 0, so NaN is kept
                self._add_signs((group_bits < 0)[~kept_blocks].reshape(-1))
                kept_values = group_bits[kept_blocks].reshape(-1)
            else:
                kept_blocks = ~self._all_zero_blocks(chunk == 0)
                keep = _expand(kept_blocks, self.block, *chunk.shape)
                self._add_signs((chunk_bits < 0)[~keep])
                kept_values = chunk_bits[keep]
            self._mask_bytes.append(ops.pack_mask(kept_blocks.reshape(-1)))
            yield kept_values.view(self.tensor.dtype)

    def _all_zero_blocks(self, zero: torch.Tensor) -> torch.Tensor:
        rows, cols = zero.shape
        block_rows, block_cols = -(-rows // self.block[0]), -(-cols // self.block[1])
        padded = torch.ones(block_rows * self.block[0], block_cols * self.block[1], dtype=torch.bool)
        padded[:rows, :cols] = zero  # padding counts as zero, so it never keeps a block
        return padded.view(block_rows, self.block[0], block_cols, self.block[1]).all(3).all(1)

    def _add_signs(self, negative: torch.Tensor) -> None:
        self._dropped += negative.numel()
        pending = torch.cat([self._sign_carry, negative])
        whole = pending.numel() // 8 * 8  # bits of whole bytes; the rest waits for the next slice
        if whole:
            self._sign_bytes.append(ops.pack_mask(pending[:whole]))
        self._sign_carry = pending[whole:]

    def mask(self) -> torch.Tensor:
        _, _, block_rows, block_cols = _grid(self.tensor.shape, self.block)
        return _pad(torch.cat(self._mask_bytes) if self._mask_bytes else torch.zeros(0, dtype=torch.uint8),
                    _padded_bytes(block_rows * block_cols))

    def zero_signs(self) -> torch.Tensor:
        """Empty when no dropped element is -0.0."""
        tail = [ops.pack_mask(self._sign_carry)] if self._sign_carry.numel() else []
        signs = torch.cat(self._sign_bytes + tail) if self._sign_bytes or tail else torch.zeros(0, dtype=torch.uint8)
        if not bool(signs.any()):
            return signs[:0]
        return _pad(signs, _padded_bytes(self._dropped))


def _pad(data: torch.Tensor, size: int) -> torch.Tensor:
    return torch.cat([data, torch.zeros(size - data.numel(), dtype=torch.uint8)])


def _bits_at(packed: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """`count` bits from bit `start` of ops.pack_mask-layout bytes, as bools."""
    first, last = start // 8, -(-(start + count) // 8)
    window = packed[first:last].contiguous()
    return ops.unpack_mask(window, (window.numel() * 8,))[start % 8:start % 8 + count]


def _restore(file, name: str, info: dict) -> torch.Tensor:
    shape, dtype, block = tuple(info["shape"]), _DTYPES_BY_NAME[info["dtype"]], tuple(info["block"])
    values_key, mask_key, signs_key = packed_part_names(name)
    bits_dtype = _BITS_DTYPES[dtype.itemsize]
    values = file.get_tensor(values_key).view(bits_dtype)
    mask, signs = file.get_tensor(mask_key), file.get_tensor(signs_key)
    rows, cols, block_rows, block_cols = _grid(shape, block)
    out = torch.zeros((rows, cols), dtype=bits_dtype)
    negative_zero = torch.iinfo(bits_dtype).min  # the bits of -0.0: the sign bit alone
    step = _chunk_rows(cols, dtype.itemsize, block[0])
    runs = block[0] == 1 and cols % block[1] == 0  # blocks are runs of a row: filled whole (see TensorPacker)
    taken = dropped = 0
    for start in range(0, rows, step):
        chunk = out[start:start + step]
        first_block, chunk_block_rows = start // block[0], -(-chunk.shape[0] // block[0])
        kept_blocks = _bits_at(mask, first_block * block_cols, chunk_block_rows * block_cols)
        if runs:
            chunk, keep = chunk.view(-1, block[1]), kept_blocks
        else:
            keep = _expand(kept_blocks.view(chunk_block_rows, block_cols), block, *chunk.shape)
        kept = int(keep.sum()) * (block[1] if runs else 1)
        num_dropped = chunk.numel() - kept
        if taken + kept > values.numel() or (signs.numel() and dropped + num_dropped > signs.numel() * 8):
            raise CheckpointError(f"packed tensor {name!r} is damaged: its mask keeps more elements than it has "
                                  f"values ({values.numel():,}) or drops more than it has zero signs")
        chunk[keep] = values[taken:taken + kept].view(-1, block[1]) if runs else values[taken:taken + kept]
        taken += kept
        if signs.numel() and num_dropped:
            negative = _bits_at(signs, dropped, num_dropped)
            chunk[~keep] = torch.where(negative, negative_zero, 0).to(bits_dtype).view(chunk[~keep].shape)
        dropped += num_dropped
    if taken != values.numel():
        raise CheckpointError(f"packed tensor {name!r} is damaged: {values.numel():,} values, its mask keeps {taken:,}")
    return out.view(dtype).reshape(shape)


def _parse_packed_metadata(path: Path, text: str, header: dict) -> dict[str, dict]:
    def damaged(why: str) -> CheckpointError:
        return CheckpointError(f"{str(path)!r} is a damaged packed sparse file: {why}")
    try:
        packed = json.loads(text)
    except ValueError:
        raise damaged(f"its {PACKED_METADATA_KEY!r} metadata is not JSON") from None
    if not isinstance(packed, dict) or packed.get("format") != PACKED_FORMAT:
        raise damaged(f"its {PACKED_METADATA_KEY!r} metadata does not name the format")
    if packed.get("version") != PACKED_VERSION:
        raise CheckpointError(f"{str(path)!r} is a packed sparse file of version {packed.get('version')!r}; this "
                              f"sparsity_ext reads version {PACKED_VERSION}")
    tensors = packed.get("tensors")
    if not isinstance(tensors, dict):
        raise damaged("no tensor list")
    for name, info in tensors.items():
        try:
            shape, dtype, block = list(info["shape"]), info["dtype"], list(info["block"])
            valid = (all(isinstance(s, int) and s >= 0 for s in shape) and len(block) == 2
                     and all(isinstance(b, int) and b >= 1 for b in block) and dtype in _DTYPES_BY_NAME
                     and _DTYPES_BY_NAME[dtype] in FLOAT_DTYPES)
        except (KeyError, TypeError):
            valid = False
        if not valid:
            raise damaged(f"bad entry for {name!r}: {info!r}")
        values_key, mask_key, signs_key = packed_part_names(name)
        missing = [key for key in (values_key, mask_key, signs_key) if key not in header]
        if missing:
            raise damaged(f"{name!r} lacks {', '.join(missing)}")
        _, _, block_rows, block_cols = _grid(shape, block)
        if header[mask_key]["shape"] != [_padded_bytes(block_rows * block_cols)]:
            raise damaged(f"{mask_key!r} has shape {header[mask_key]['shape']}")
    return tensors


# -------------------------------------------------------------------------------------- writing
class SafetensorsWriter:
    """Writes a safetensors file one tensor at a time, in the order given at construction.

    The header is written last, over room reserved at the start (safetensors allows trailing spaces in
    it), so that tensors whose final size is only known once they are computed (packed values) stream
    straight to the file. Give the tensors in decreasing element size, so that each starts aligned.

    Args:
        handle: a binary file opened for writing (and seeking), at offset 0.
        plan: (key, dtype, shape or None, max_numel) per tensor; shape None: 1-D, of at most max_numel.
        metadata: the safetensors metadata (str -> str).
    """

    def __init__(self, handle, plan: list[tuple[str, torch.dtype, tuple[int, ...] | None, int]],
                 metadata: dict[str, str]):
        for key, dtype, _, _ in plan:
            if dtype not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"tensor {key!r} has dtype {dtype}, which safetensors cannot store")
        self._handle, self._plan, self._metadata = handle, plan, metadata
        self._entries: dict[str, dict] = {}
        self._offset = 0
        largest = sum(math.prod(shape) if shape is not None else max_numel for _, _, shape, max_numel in plan) * 8
        widest = {key: {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape) if shape is not None else [max_numel],
                        "data_offsets": [largest, largest]} for key, dtype, shape, max_numel in plan}
        room = len(self._header(widest))  # every number at its widest: the real header is no longer
        self._header_room = room + (-(8 + room)) % 8  # tensors start 8-byte aligned
        handle.write(b"\0" * (8 + self._header_room))

    def _header(self, entries: dict) -> bytes:
        return json.dumps({"__metadata__": self._metadata, **entries}, separators=(",", ":")).encode()

    def write(self, key: str, pieces: Iterable[torch.Tensor]) -> int:
        """Writes the next planned tensor from `pieces` (concatenated); returns its bytes."""
        index = len(self._entries)
        if index >= len(self._plan) or self._plan[index][0] != key:
            raise RuntimeError(f"SafetensorsWriter: {key!r} is not the next planned tensor")
        _, dtype, planned_shape, max_numel = self._plan[index]
        start, numel = self._offset, 0
        for piece in pieces:
            if piece.dtype != dtype:
                raise RuntimeError(f"SafetensorsWriter: {key!r} piece has dtype {piece.dtype}, planned {dtype}")
            raw = piece.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._handle.write(memoryview(raw))
            numel += piece.numel()
            self._offset += raw.size
        final_shape = tuple(planned_shape) if planned_shape is not None else (numel,)
        if math.prod(final_shape) != numel or (planned_shape is None and numel > max_numel):
            raise RuntimeError(f"SafetensorsWriter: {key!r} got {numel} elements for shape {final_shape}")
        self._entries[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(final_shape),
                              "data_offsets": [start, self._offset]}
        return self._offset - start

    def finish(self) -> None:
        if len(self._entries) != len(self._plan):
            raise RuntimeError(f"SafetensorsWriter: {len(self._plan) - len(self._entries)} planned tensors unwritten")
        header = self._header(self._entries)
        self._handle.seek(0)
        self._handle.write(struct.pack("<Q", self._header_room) + header + b" " * (self._header_room - len(header)))
        self._handle.seek(0, os.SEEK_END)


def write_safetensors(handle, checkpoint: Checkpoint, pack_blocks: Mapping[str, tuple[int, int]],
                      prepare: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, tensor: tensor
                      ) -> dict[str, int]:
    """Writes every tensor of `checkpoint` into a safetensors file, one at a time: dense, or packed (the layout
    above) for the names in pack_blocks. prepare(name, tensor) returns what to store (e.g. sparsifies it).

    Returns:
        {name: bytes it takes in the file}.
    """
    packed_info, plan = {}, []
    shapes = {name: checkpoint.shape_and_dtype(name) for name in checkpoint.names}
    # Decreasing element size, so that every tensor starts aligned (packed bit parts are padded to 8 bytes).
    order = sorted(checkpoint.names, key=lambda name: -shapes[name][1].itemsize)
    for name in order:
        shape, dtype = shapes[name]
        if name not in pack_blocks:
            plan.append((name, dtype, shape, math.prod(shape)))
            continue
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {dtype}; only float tensors are packed")
        block = tuple(pack_blocks[name])
        packed_info[name] = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "block": list(block)}
        _, _, block_rows, block_cols = _grid(shape, block)
        values_key, mask_key, signs_key = packed_part_names(name)
        plan += [(values_key, dtype, None, math.prod(shape)),
                 (mask_key, torch.uint8, (_padded_bytes(block_rows * block_cols),), 0),
                 (signs_key, torch.uint8, None, _padded_bytes(math.prod(shape)))]
    taken = set(checkpoint.names) & {key for key, _, _, _ in plan if key not in checkpoint.names}
    if taken:
        raise CheckpointError(f"cannot pack: the checkpoint already has a tensor named {sorted(taken)[0]!r}")
    metadata = dict(checkpoint.metadata)
    if packed_info:
        metadata[PACKED_METADATA_KEY] = json.dumps({"format": PACKED_FORMAT, "version": PACKED_VERSION,
                                                    "tensors": packed_info})
    writer = SafetensorsWriter(handle, plan, metadata)
    stored = {}
    for name in order:
        tensor = prepare(name, checkpoint.tensor(name))
        if name not in pack_blocks:
            stored[name] = writer.write(name, [tensor])
            continue
        packer = TensorPacker(tensor, pack_blocks[name])
        values_key, mask_key, signs_key = packed_part_names(name)
        stored[name] = (writer.write(values_key, packer.values())
                        + writer.write(mask_key, [packer.mask()]) + writer.write(signs_key, [packer.zero_signs()]))
        del tensor, packer
    writer.finish()
    return stored


def atomic_write(output: Path, write: Callable, mode: int) -> None:
    """Calls write(handle) on a temporary file beside `output`, fsyncs it and renames it over `output`:
    `output` is either left as it was or is the complete new file, whatever happens (disk full, interrupt)."""
    fd, temp_name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w+b") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp_name, mode)
        os.replace(temp_name, output)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
