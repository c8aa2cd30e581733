"""The `sparsity-ext` command line.

  sparsity-ext info                 what is built and which backend each op runs on
  sparsity-ext sparsify [CHECKPOINT] --tensors REGEX --level 0.8 --block 1x4 [-o OUT] [--format dense|packed] ...
                                    block-norm sparsify the matching tensors (>= 2-D unless --include-1d) of a
                                    checkpoint (DataNormSparsifier's semantics); with no CHECKPOINT, a generated
                                    DLRM-like model, timed against torch.ao.pruning
  sparsity-ext unpack PACKED -o OUT the dense checkpoint of a packed sparse file, bit for bit
  sparsity-ext bench [--device cpu|cuda] [--quick] [--out DIR]
                                    benchmark every op on every backend against torch baselines and the
                                    copy-bandwidth floor: JSON, markdown and PNG plots (sparsity_ext.bench)

Checkpoints are read by their content (torch.save zip or legacy pickle, safetensors, packed sparse) and
written by the output's extension: .pt/.pth/.bin (torch.save), .safetensors (dense), .sparse.safetensors
(packed by default: see sparsity_ext.checkpoint for the layout).
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import re
import stat
import sys
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .checks import FLOAT_DTYPES

# The generated model of `sparsify` without a checkpoint: DLRM-like (embedding tables + MLPs), seeded.
DEMO_TABLE_ROWS = (2_000_000, 1_000_000, 500_000, 250_000, 100_000, 50_000)
DEMO_EMBEDDING_DIM = 16
DEMO_SEED = 0
EXIT_BAD_INPUT, EXIT_WRITE_FAILED, EXIT_INTERRUPTED = 2, 1, 130
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
PACKED_SUFFIX = ".sparse.safetensors"
# Matches DLRM's emb_l.N.weight, TorchRec's ...embedding_bags.<table>.weight / ...embeddings.<table>.weight and
# HF's *_embeddings.weight; HF's embeddings.LayerNorm.* match too but are 1-D, which are left alone by default.
DEFAULT_TENSORS = "emb"


class CliError(Exception):
    """A problem to report in one line, with the exit status to return."""

    def __init__(self, message: str, status: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------ arguments
def _level(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _block(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS with positive sizes, e.g. 1x4, got {text!r}")
    return int(match[1]), int(match[2])


def _regex(text: str) -> re.Pattern:
    try:
        return re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"invalid regular expression {text!r}: {exc}") from None


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _add_sparsify_parser(sub) -> None:
    p = sub.add_parser(
        "sparsify", help="block-norm sparsify the tensors of a checkpoint (default: a generated DLRM-like model)",
        description="Zero the blocks of smallest mean norm of every tensor of at least 2 dims whose name matches "
                    "--tensors (DataNormSparsifier's semantics), and write the checkpoint with the sparsified "
                    "tensors: dense, or packed (kept values + 1-bit mask) into a .sparse.safetensors file. Without "
                    "CHECKPOINT, sparsify a generated DLRM-like model and time torch.ao.pruning's "
                    "DataNormSparsifier on the same tables.")
    p.add_argument("checkpoint", nargs="?", type=Path,
                   help="a torch.save'd state_dict (nested dicts are searched too; a whole model with "
                        "--allow-pickle), a safetensors file or a packed sparse file, recognised by content; "
                        "default: the generated model")
    p.add_argument("--tensors", type=_regex, default=_regex(DEFAULT_TENSORS), metavar="REGEX",
                   help=f"sparsify the tensors whose name contains a match (re.search; default {DEFAULT_TENSORS!r}: "
                        "DLRM, TorchRec and HF embedding tables)")
    p.add_argument("--include-1d", action="store_true",
                   help="also sparsify matching 1-D tensors (as one row); by default they are skipped, so that "
                        "norms and biases are left alone")
    p.add_argument("--level", type=_level, default=0.8, help="fraction of blocks zeroed, in [0, 1] (default 0.8)")
    p.add_argument("--block", type=_block, default=(1, 4), metavar="RxC", help="block shape (default 1x4)")
    p.add_argument("--norm", choices=("L1", "L2"), default="L1", help="block score: mean |x| (L1, default) or x*x")
    p.add_argument("--zeros-per-block", type=int, default=None, metavar="N",
                   help="elements zeroed in each selected block (default: the whole block)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to compute (default: cuda if available, else cpu); the output stays on the cpu")
    p.add_argument("-o", "--output", type=Path, default=None, metavar="OUT",
                   help="output file, its format by its extension: .pt/.pth/.bin (torch.save), .safetensors, "
                        f"{PACKED_SUFFIX} (packed); default: CHECKPOINT's name with .sparse before the suffix; "
                        "with no CHECKPOINT nothing is written unless OUT is given")
    p.add_argument("--format", choices=("dense", "packed"), default=None,
                   help=f"dense tensors, or the sparsified ones packed (a safetensors output only; the default "
                        f"for names ending in {PACKED_SUFFIX})")
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing OUT, or the input itself")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load checkpoints that hold pickled objects (e.g. a whole nn.Module); this runs code from "
                        "the file, so only for files you trust")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.ao.pruning's DataNormSparsifier on each tensor and check it gives the "
                        "same bytes (fp16/bf16 tensors: on fp32 copies, see the note printed); default: on "
                        "without CHECKPOINT, off with one")
    p.add_argument("--max-chunk-mb", type=_positive_int, default=256, metavar="MB",
                   help="without a compiled kernel taking the tensor whole (reference backend, layouts it would "
                        "copy), tensors larger than this are processed in row chunks (default 256)")


def _add_unpack_parser(sub) -> None:
    p = sub.add_parser("unpack", help="the dense checkpoint of a packed sparse file, bit for bit",
                       description="Restore every packed tensor of a packed sparse file (written by sparsify into "
                                   f"a {PACKED_SUFFIX} file) and write the dense checkpoint.")
    p.add_argument("packed", type=Path, help="a packed sparse file")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT",
                   help="output file: .safetensors (metadata kept) or .pt/.pth/.bin (torch.save)")
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing OUT")


# ------------------------------------------------------------------------------ files and names
def _output_format(output: Path, requested: str | None) -> str:
    """'torch', 'safetensors' or 'packed', from the output's name (and --format)."""
    name = output.name.lower()
    if name.endswith(".safetensors"):
        packed = requested == "packed" or (requested is None and name.endswith(PACKED_SUFFIX))
        return "packed" if packed else "safetensors"
    if output.suffix.lower() in TORCH_SUFFIXES:
        if requested == "packed":
            raise CliError(f"--format packed writes a safetensors file: name the output *{PACKED_SUFFIX}, "
                           f"not {output.name!r}")
        return "torch"
    raise CliError(f"unknown output extension {output.suffix or '(none)'!r} of {str(output)!r}: use "
                   f"{', '.join(TORCH_SUFFIXES)} (torch.save), .safetensors, or {PACKED_SUFFIX} (packed)")


def _default_output(checkpoint: Path) -> Path:
    """CHECKPOINT's name with .sparse before its suffix (a suffix that names no format: the content's)."""
    known = checkpoint.suffix.lower() in TORCH_SUFFIXES + (".safetensors",)
    if known:
        return checkpoint.with_name(f"{checkpoint.stem}.sparse{checkpoint.suffix}")
    try:
        suffix = ".safetensors" if ckpt.detect_format(checkpoint) == "safetensors" else ".pt"
    except ckpt.CheckpointError as exc:
        raise CliError(str(exc)) from None
    return checkpoint.with_name(f"{checkpoint.name}.sparse{suffix}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _check_output(output: Path, checkpoint: Path | None, overwrite: bool) -> None:
    if not output.parent.is_dir():
        raise CliError(f"output directory {str(output.parent)!r} does not exist")
    if output.is_dir():
        raise CliError(f"output {str(output)!r} is a directory")
    if checkpoint is not None and output.exists() and _same_file(output, checkpoint) and not overwrite:
        raise CliError(f"output {str(output)!r} is the input checkpoint; pass --overwrite to replace it")
    if output.exists() and not overwrite:
        raise CliError(f"output {str(output)!r} exists; pass --overwrite to replace it")


def _file_mode(output: Path, checkpoint: Path | None) -> int:
    for existing in (output, checkpoint):
        if existing is not None and existing.exists():
            return stat.S_IMODE(existing.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write(output: Path, out_format: str, source: ckpt.Checkpoint, pack_blocks: dict, prepare, mode: int) -> dict:
    """Writes `source` (each tensor through prepare(name, tensor)) to `output` atomically; returns {name: bytes}."""
    stored = {}

    def write(handle):
        if out_format == "torch":
            prepared = {name: prepare(name, source.tensor(name)) for name in source.names}
            # a torch checkpoint keeps its structure (the tensors were changed in place); others are flat
            torch.save(source.obj if source.kind == "torch" else prepared, handle)
            stored.update({name: t.numel() * t.element_size() for name, t in prepared.items()})
        else:
            stored.update(ckpt.write_safetensors(handle, source, pack_blocks if out_format == "packed" else {},
                                                 prepare))
    try:
        ckpt.atomic_write(output, write, mode)
    except OSError as exc:
        reason = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        raise CliError(f"could not write {str(output)!r}: {reason}; nothing was written", EXIT_WRITE_FAILED) from exc
    return stored


def _open_source(path: Path, allow_pickle: bool) -> ckpt.Checkpoint:
    try:
        return ckpt.open_checkpoint(path, allow_pickle=allow_pickle)
    except ckpt.CheckpointError as exc:
        raise CliError(str(exc)) from exc
    except OSError as exc:
        raise CliError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc


# ---------------------------------------------------------------------------------- the work
def _demo_model() -> torch.nn.Module:
    """DLRM-like: one EmbeddingBag per sparse feature (emb_l.i), bottom and top MLPs; seeded."""
    generator = torch.Generator().manual_seed(DEMO_SEED)
    model = torch.nn.Module()
    model.emb_l = torch.nn.ModuleList(
        torch.nn.EmbeddingBag(rows, DEMO_EMBEDDING_DIM, mode="sum",
                              _weight=torch.randn(rows, DEMO_EMBEDDING_DIM, generator=generator))
        for rows in DEMO_TABLE_ROWS)
    model.bot_l = torch.nn.Sequential(torch.nn.Linear(13, 64), torch.nn.ReLU(), torch.nn.Linear(64, DEMO_EMBEDDING_DIM))
    model.top_l = torch.nn.Sequential(torch.nn.Linear(DEMO_EMBEDDING_DIM * (len(DEMO_TABLE_ROWS) + 1), 64),
                                      torch.nn.ReLU(), torch.nn.Linear(64, 1))
    return model


def _skip_reason(source: ckpt.Checkpoint, name: str, include_1d: bool) -> str | None:
    shape, dtype = source.shape_and_dtype(name)
    if source.kind == "torch":
        tensor = source.tensor(name)
        if tensor.layout != torch.strided or tensor.is_quantized:
            return f"a {tensor.layout} / quantized tensor"
    if dtype not in FLOAT_DTYPES:
        return f"dtype {str(dtype).removeprefix('torch.')} (not a float tensor)"
    if len(shape) == 0:
        return "0-d (a scalar)"
    if len(shape) == 1 and not include_1d:
        return "1-D (norms and biases are left alone; --include-1d sparsifies 1-D tensors as one row)"
    if len(shape) > 2:
        return f"{len(shape)}-D (the block-norm mask takes 2-D tables, or 1-D ones with --include-1d)"
    if math.prod(shape) == 0:
        return "empty"
    return None


def _select(source: ckpt.Checkpoint, pattern: re.Pattern, include_1d: bool) -> tuple[list[str], dict[str, str]]:
    """(names to sparsify, {matched name: why it is skipped})."""
    matched = [name for name in source.names if pattern.search(name)]
    if not matched:
        listing = ", ".join(source.names[:8]) + (", ..." if len(source.names) > 8 else "")
        raise CliError(f"--tensors {pattern.pattern!r} matches no tensor; the checkpoint has "
                       f"{len(source.names)}: {listing or '(none)'}")
    skipped = {name: why for name in matched if (why := _skip_reason(source, name, include_1d))}
    chosen = [name for name in matched if name not in skipped]
    if not chosen:
        details = "; ".join(f"{name}: {why}" for name, why in skipped.items())
        raise CliError(f"nothing to sparsify: --tensors {pattern.pattern!r} matches {len(matched)} tensors, none of "
                       f"which can be sparsified ({details})")
    return chosen, skipped


def _progress_bar(total_bytes: int):
    """A tqdm bar over bytes processed, or None when tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sparsify_tensor(tensor: torch.Tensor, args, device: torch.device) -> float:
    """Sparsifies `tensor` in place (computing on `device`) through block_norm_mask_chunked's apply, so that the
    zeros are written as torch.ao.pruning writes them (x * 0); returns the seconds it took."""
    from .data_sparsifier import block_norm_mask_chunked
    from .data_sparsifier.data_norm_sparsifier import data_norm_level
    rows, cols = (1, tensor.shape[0]) if tensor.dim() == 1 else tensor.shape
    level = data_norm_level(args.level, math.ceil(rows / args.block[0]) * math.ceil(cols / args.block[1]))
    _sync(device)
    start = time.perf_counter()
    work = tensor.to(device)
    block_norm_mask_chunked(work, level, args.block, args.zeros_per_block, args.norm, apply=True,
                            max_chunk_bytes=args.max_chunk_mb << 20)
    if work is not tensor:
        tensor.copy_(work)
    _sync(device)
    return time.perf_counter() - start


def _torch_ao_run(original: torch.Tensor, args) -> tuple[float, torch.Tensor] | None:
    """(seconds, result) of torch.ao.pruning's DataNormSparsifier (add_data, step, squash_mask) on a copy,
    or None where torch.ao.pruning is missing or cannot handle the tensor (it crashes on 1-D data).
    fp16/bf16 run on an fp32 copy (torch.ao scores in the input dtype, sparsity_ext in fp32); the result is
    cast back, which is exact."""
    try:
        from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as TorchDataNormSparsifier
    except ImportError:
        return None
    if original.dim() != 2:
        return None
    data = original.float() if original.dtype in (torch.float16, torch.bfloat16) else original.clone()
    start = time.perf_counter()
    sparsifier = TorchDataNormSparsifier(sparsity_level=args.level, sparse_block_shape=args.block,
                                         zeros_per_block=args.zeros_per_block, norm=args.norm)
    sparsifier.add_data("data", data)
    sparsifier.step()
    sparsifier.squash_mask()
    return time.perf_counter() - start, data.to(original.dtype)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (torch.equal calls -0.0 and 0.0 equal)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _mb(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.1f}"


def _print_table(rows: list[dict], compare: bool, stored_column: str | None) -> None:
    headers = ["tensor", "shape", "dtype", "sparsity", "time s"]
    if compare:
        headers += ["torch.ao s", "speedup", "same"]
    headers += ["dense MB"] + ([stored_column] if stored_column else [])
    lines = []
    for r in rows:
        line = [r["name"], "x".join(map(str, r["shape"])), r["dtype"], f"{r['sparsity']:.3f}", f"{r['seconds']:.3f}"]
        if compare:
            ao = r.get("torch_ao_seconds")
            line += ([f"{ao:.3f}", f"{ao / r['seconds']:.1f}x" if r["seconds"] > 0 else "",
                      "yes" if r["same"] else "NO"] if ao is not None else ["n/a", "", ""])
        line += [_mb(r["dense_bytes"])] + ([_mb(r["stored_bytes"])] if stored_column else [])
        lines.append(line)
    total = ["total", "", "", "", f"{sum(r['seconds'] for r in rows):.3f}"]
    if compare:
        compared = [r for r in rows if r.get("torch_ao_seconds") is not None]
        ao_total = sum(r["torch_ao_seconds"] for r in compared)
        ours = sum(r["seconds"] for r in compared)
        total += [f"{ao_total:.3f}", f"{ao_total / ours:.1f}x" if compared and ours > 0 else "",
                  "yes" if all(r["same"] for r in compared) else "NO"]
    total += [_mb(sum(r["dense_bytes"] for r in rows))]
    total += [_mb(sum(r["stored_bytes"] for r in rows))] if stored_column else []
    lines.append(total)
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *lines)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    print(fmt(headers))
    print("  ".join("-" * w for w in widths))
    for line in lines[:-1]:
        print(fmt(line))
    print(fmt(lines[-1]))
    print("sparsity: fraction of zeros in the result. dense MB: the tensor's raw bytes."
          + (f" {stored_column}: the bytes it takes in the output." if stored_column else ""))
    if compare:
        print("torch.ao s: torch.ao.pruning DataNormSparsifier add_data + step + squash_mask on a copy; same: "
              "identical bytes (the sign of zeros included).")
        if any(r["dtype"] in ("float16", "bfloat16") for r in compared):
            print("fp16/bf16 tensors: sparsity_ext scores them in fp32, torch.ao.pruning in the input dtype (its "
                  "rounded block scores can order blocks differently), so torch.ao ran on fp32 copies of them, "
                  "cast back.")


def _print_selection(pattern: re.Pattern, chosen: list[str], skipped: dict[str, str], non_tensors: list[str]) -> None:
    print(f"--tensors {pattern.pattern!r}: {len(chosen) + len(skipped)} matched, {len(chosen)} sparsified, "
          f"{len(skipped)} skipped")
    for name, why in skipped.items():
        print(f"  skipped {name}: {why}")
    if non_tensors:
        print(f"  not tensors, kept as they are: {', '.join(non_tensors)}")


def _print_sizes(checkpoint: Path | None, output: Path) -> None:
    out_size = output.stat().st_size
    if checkpoint is None:
        print(f"wrote {output}: {_mb(out_size)} MB on disk")
        return
    in_size = checkpoint.stat().st_size
    print(f"wrote {output}: {_mb(out_size)} MB on disk; input {checkpoint}: {_mb(in_size)} MB "
          f"(output {100 * out_size / max(1, in_size):.1f} % of the input)")


def _sparsify(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    block_size = args.block[0] * args.block[1]
    if args.zeros_per_block is not None and not 0 <= args.zeros_per_block <= block_size:
        raise CliError(f"--zeros-per-block must be in [0, {block_size}] for block {args.block[0]}x{args.block[1]}, "
                       f"got {args.zeros_per_block}")
    compare = args.checkpoint is None if args.compare is None else args.compare
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise CliError(f"checkpoint {str(args.checkpoint)!r} "
                       f"{'is not a file' if args.checkpoint.exists() else 'does not exist'}")
    output = args.output
    if args.checkpoint is not None and output is None:
        output = _default_output(args.checkpoint)
    out_format = None
    if output is not None:
        out_format = _output_format(output, args.format)
        _check_output(output, args.checkpoint, args.overwrite)
    elif args.format is not None:
        raise CliError("--format needs an output (-o OUT)")

    if args.checkpoint is None:
        print(f"generated DLRM-like model: {len(DEMO_TABLE_ROWS)} embedding tables, {sum(DEMO_TABLE_ROWS):,} rows "
              f"x {DEMO_EMBEDDING_DIM} (seed {DEMO_SEED})", file=sys.stderr)
        source = ckpt.Checkpoint.from_object(_demo_model())
    else:
        source = _open_source(args.checkpoint, args.allow_pickle)
    with source:
        chosen, skipped = _select(source, args.tensors, args.include_1d)
        if out_format in ("safetensors", "packed") and source.non_tensors:
            raise CliError(f"the checkpoint has entries that are not tensors ({', '.join(source.non_tensors[:8])}), "
                           f"which a safetensors file cannot hold: write a .pt output instead")
        _print_selection(args.tensors, chosen, skipped, source.non_tensors)
        # Packed tensors are stored by blocks when whole blocks are zeroed (1 mask bit per block), else by element.
        pack_block = args.block if args.zeros_per_block in (None, block_size) else (1, 1)
        chosen_set = set(chosen)
        written = source.names if output is not None else chosen
        bar = _progress_bar(sum(math.prod(s) * d.itemsize for s, d in map(source.shape_and_dtype, written)))
        rows = {}

        # Streaming out of a torch file, sparsify copies: the loaded (memory-mapped) tensors stay clean file pages,
        # and each copy is freed once written, so memory does not grow with the checkpoint.
        copy_first = source.kind == "torch" and out_format in ("safetensors", "packed")

        def prepare(name: str, tensor: torch.Tensor) -> torch.Tensor:
            if name in chosen_set:
                tensor = tensor.clone() if copy_first else tensor
                rows[name] = _sparsify_and_measure(name, tensor, args, device, compare)
            if bar is not None:
                bar.update(tensor.numel() * tensor.element_size())
            return tensor

        try:
            if output is None:
                for name in chosen:
                    prepare(name, source.tensor(name))
            else:
                stored = _write(output, out_format, source, {name: pack_block for name in chosen}, prepare,
                                _file_mode(output, args.checkpoint))
                for name, row in rows.items():
                    row["stored_bytes"] = stored[name]
        finally:
            if bar is not None:
                bar.close()

    print(f"level {args.level}, block {args.block[0]}x{args.block[1]}, norm {args.norm}, zeros per block "
          f"{args.zeros_per_block if args.zeros_per_block is not None else block_size}, device {device}")
    stored_column = None if output is None else ("packed MB" if out_format == "packed" else "stored MB")
    _print_table([rows[name] for name in chosen], compare, stored_column)
    if output is not None:
        if out_format == "torch" and source.metadata:
            print(f"note: the input's safetensors metadata ({', '.join(source.metadata)}) has no place in a .pt file "
                  f"and was not kept")
        _print_sizes(args.checkpoint, output)
    return 0


def _sparsify_and_measure(name: str, tensor: torch.Tensor, args, device: torch.device, compare: bool) -> dict:
    """Sparsifies `tensor` in place; its table row (and torch.ao.pruning's result compared, with `compare`)."""
    original = tensor.detach().clone() if compare else None
    with torch.no_grad():
        seconds = _sparsify_tensor(tensor.detach(), args, device)
    row = {"name": name, "shape": tuple(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
           "seconds": seconds, "sparsity": 1.0 - int(torch.count_nonzero(tensor)) / max(1, tensor.numel()),
           "dense_bytes": tensor.numel() * tensor.element_size()}
    if compare:
        ran = _torch_ao_run(original, args)
        if ran is not None:
            row["torch_ao_seconds"], theirs = ran
            row["same"] = _same_bytes(theirs, tensor.detach())
    return row


def _unpack(args) -> int:
    out_format = _output_format(args.output, None)
    if out_format == "packed":
        out_format = "safetensors"  # unpack writes dense files, whatever the name
    _check_output(args.output, args.packed, args.overwrite)
    if not args.packed.is_file():
        raise CliError(f"{str(args.packed)!r} {'is not a file' if args.packed.exists() else 'does not exist'}")
    with _open_source(args.packed, allow_pickle=False) as source:
        if source.kind != "packed":
            raise CliError(f"{str(args.packed)!r} is not a packed sparse file (it is a "
                           f"{'torch.save' if source.kind == 'torch' else 'dense safetensors'} file): nothing to unpack")
        _write(args.output, out_format, source, {}, lambda name, tensor: tensor,
               _file_mode(args.output, args.packed))
        metadata_lost = out_format == "torch" and source.metadata
    if metadata_lost:
        print(f"note: the safetensors metadata ({', '.join(source.metadata)}) has no place in a .pt file and was "
              f"not kept")
    _print_sizes(args.packed, args.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsity-ext", description="sparsity_ext: kernel-accelerated torch.ao.pruning")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what is built and which backend each op runs on")
    _add_sparsify_parser(sub)
    _add_unpack_parser(sub)
    from .bench import command as bench_command
    bench_command.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "info":
        import sparsity_ext
        print(sparsity_ext.info())
        return 0
    try:
        if args.command == "bench":
            return bench_command.run(args)
        return _unpack(args) if args.command == "unpack" else _sparsify(args)
    except CliError as exc:
        print(f"sparsity-ext {args.command}: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print(f"sparsity-ext {args.command}: interrupted; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
