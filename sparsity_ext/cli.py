"""The `sparsity-ext` command line.

  sparsity-ext info                 what is built and which backend each op runs on
  sparsity-ext sparsify [CHECKPOINT] --tensors REGEX --level 0.8 --block 1x4 [-o OUT] ...
                                    block-norm sparsify the matching tensors of a checkpoint (DataNormSparsifier's
                                    semantics); with no CHECKPOINT, a generated DLRM-like model, timed against
                                    torch.ao.pruning
  sparsity-ext bench [--device cpu|cuda] [--quick] [--out DIR]
                                    benchmark every op on every backend against torch baselines and the
                                    copy-bandwidth floor: JSON, markdown and PNG plots (sparsity_ext.bench)
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import re
import stat
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch

# The generated model of `sparsify` without a checkpoint: DLRM-like (embedding tables + MLPs), seeded.
DEMO_TABLE_ROWS = (2_000_000, 1_000_000, 500_000, 250_000, 100_000, 50_000)
DEMO_EMBEDDING_DIM = 16
DEMO_SEED = 0
EXIT_BAD_INPUT, EXIT_WRITE_FAILED, EXIT_INTERRUPTED = 2, 1, 130


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
        description="Zero the blocks of smallest mean norm of every tensor whose name matches --tensors "
                    "(DataNormSparsifier's semantics: 2-D tensors as they are, 1-D tensors as one row), and "
                    "write the checkpoint with the sparsified tensors. Without CHECKPOINT, sparsify a generated "
                    "DLRM-like model and time torch.ao.pruning's DataNormSparsifier on the same tables.")
    p.add_argument("checkpoint", nargs="?", type=Path,
                   help="a torch.save'd state_dict (nested dicts are searched too), or a whole model with "
                        "--allow-pickle; default: the generated model")
    p.add_argument("--tensors", type=_regex, default=_regex("emb"), metavar="REGEX",
                   help="sparsify the tensors whose name contains a match (re.search; default: 'emb')")
    p.add_argument("--level", type=_level, default=0.8, help="fraction of blocks zeroed, in [0, 1] (default 0.8)")
    p.add_argument("--block", type=_block, default=(1, 4), metavar="RxC", help="block shape (default 1x4)")
    p.add_argument("--norm", choices=("L1", "L2"), default="L1", help="block score: mean |x| (L1, default) or x*x")
    p.add_argument("--zeros-per-block", type=int, default=None, metavar="N",
                   help="elements zeroed in each selected block (default: the whole block)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to compute (default: cuda if available, else cpu); the output stays on the cpu")
    p.add_argument("-o", "--output", type=Path, default=None, metavar="OUT",
                   help="output file (default: CHECKPOINT's name with .sparse before the suffix; with no "
                        "CHECKPOINT nothing is written unless OUT is given)")
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing OUT, or the input itself")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load checkpoints that hold pickled objects (e.g. a whole nn.Module); this runs code from "
                        "the file, so only for files you trust")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.ao.pruning's DataNormSparsifier on each tensor and check it gives the "
                        "same result (default: on without CHECKPOINT, off with one)")
    p.add_argument("--max-chunk-mb", type=_positive_int, default=256, metavar="MB",
                   help="without a compiled kernel taking the tensor whole (reference backend, layouts it would "
                        "copy), tensors larger than this are processed in row chunks (default 256)")


# ------------------------------------------------------------------------------- checkpoint I/O
def _default_output(checkpoint: Path) -> Path:
    return checkpoint.with_name(f"{checkpoint.stem}.sparse{checkpoint.suffix or '.pt'}")


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


def _load_checkpoint(path: Path, allow_pickle: bool):
    if not path.exists():
        raise CliError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise CliError(f"checkpoint {str(path)!r} is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types on files that are not checkpoints
        pickled_objects = "weights_only" in str(exc).lower() or "unsupported global" in str(exc).lower()
        if not pickled_objects:
            raise CliError(f"{str(path)!r} is not a torch checkpoint (torch.load failed: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
        if not allow_pickle:
            raise CliError(f"{str(path)!r} holds pickled Python objects (a whole model?); loading it runs code "
                           f"from the file: pass --allow-pickle if you trust it") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CliError(f"cannot load {str(path)!r}: {type(exc).__name__}: {exc}") from exc


def _named_tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """{dotted name: tensor} of a state_dict (nested mappings flattened) or of a model's state_dict."""
    if isinstance(obj, torch.nn.Module):
        return {prefix + name: t for name, t in obj.state_dict().items()}
    found = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            found[name] = value
        elif isinstance(value, (Mapping, torch.nn.Module)):
            found.update(_named_tensors(value, name + "."))
    return found


def _unsupported_reason(tensor: torch.Tensor) -> str | None:
    from . import ops
    if tensor.layout != torch.strided or tensor.is_quantized:
        return f"a {tensor.layout} / quantized tensor"
    if tensor.dtype not in ops.FLOAT_DTYPES:
        return f"dtype {tensor.dtype} (needs a float dtype)"
    if tensor.dim() not in (1, 2):
        return f"{tensor.dim()}-D (needs 1-D or 2-D)"
    return None


def _select(tensors: dict[str, torch.Tensor], pattern: re.Pattern) -> dict[str, torch.Tensor]:
    chosen = {name: t for name, t in tensors.items() if pattern.search(name)}
    if not chosen:
        listing = ", ".join(list(tensors)[:8]) + (", ..." if len(tensors) > 8 else "")
        raise CliError(f"--tensors {pattern.pattern!r} matches no tensor; the checkpoint has "
                       f"{len(tensors)}: {listing or '(none)'}")
    bad = {name: why for name, t in chosen.items() if (why := _unsupported_reason(t))}
    if bad:
        details = "; ".join(f"{name}: {why}" for name, why in bad.items())
        raise CliError(f"--tensors {pattern.pattern!r} matches tensors that cannot be sparsified ({details}); "
                       f"narrow the regular expression")
    return chosen


def _atomic_save(obj, output: Path, mode: int) -> None:
    """torch.save to a temporary file beside `output`, then os.replace: `output` is either left as it was
    or is the complete new file, whatever happens (disk full, interrupt)."""
    fd, temp_name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp_name, mode)
        os.replace(temp_name, output)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


def _file_mode(output: Path, checkpoint: Path | None) -> int:
    for existing in (output, checkpoint):
        if existing is not None and existing.exists():
            return stat.S_IMODE(existing.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


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


def _progress(items, total: int):
    """tqdm over items if it is installed, else one line per item on stderr."""
    try:
        from tqdm import tqdm
    except ImportError:
        def plain():
            for i, item in enumerate(items, 1):
                print(f"[{i}/{total}] {item[0]}", file=sys.stderr, flush=True)
                yield item
        return plain()
    return tqdm(items, total=total, unit="tensor", file=sys.stderr)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sparsify_tensor(tensor: torch.Tensor, args, device: torch.device) -> float:
    """Sparsifies `tensor` in place (computing on `device`); returns the seconds it took."""
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
    or None where torch.ao.pruning is missing or cannot handle the tensor (it crashes on 1-D data)."""
    try:
        from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as TorchDataNormSparsifier
    except ImportError:
        return None
    if original.dim() != 2:
        return None
    data = original.clone()
    start = time.perf_counter()
    sparsifier = TorchDataNormSparsifier(sparsity_level=args.level, sparse_block_shape=args.block,
                                         zeros_per_block=args.zeros_per_block, norm=args.norm)
    sparsifier.add_data("data", data)
    sparsifier.step()
    sparsifier.squash_mask()
    return time.perf_counter() - start, data


def _mb(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.1f}"


def _print_table(rows: list[dict], compare: bool) -> None:
    headers = ["tensor", "shape", "sparsity", "time s"]
    if compare:
        headers += ["torch.ao s", "speedup", "same"]
    headers += ["dense MB", "packed MB"]
    lines = []
    for r in rows:
        line = [r["name"], "x".join(map(str, r["shape"])), f"{r['sparsity']:.3f}", f"{r['seconds']:.3f}"]
        if compare:
            ao = r.get("torch_ao_seconds")
            line += ([f"{ao:.3f}", f"{ao / r['seconds']:.1f}x", "yes" if r["same"] else "NO"] if ao is not None
                     else ["n/a", "", ""])
        line += [_mb(r["dense_bytes"]), _mb(r["packed_bytes"])]
        lines.append(line)
    total = ["total", "", "", f"{sum(r['seconds'] for r in rows):.3f}"]
    if compare:
        compared = [r for r in rows if r.get("torch_ao_seconds") is not None]
        ao_total = sum(r["torch_ao_seconds"] for r in compared)
        ours = sum(r["seconds"] for r in compared)
        total += [f"{ao_total:.3f}", f"{ao_total / ours:.1f}x" if compared and ours > 0 else "",
                  "yes" if all(r["same"] for r in compared) else "NO"]
    total += [_mb(sum(r["dense_bytes"] for r in rows)), _mb(sum(r["packed_bytes"] for r in rows))]
    lines.append(total)
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *lines)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    print(fmt(headers))
    print("  ".join("-" * w for w in widths))
    for line in lines[:-1]:
        print(fmt(line))
    print(fmt(lines[-1]))
    print("sparsity: fraction of zeros in the result. dense MB: the tensor as torch.save stores it (raw, "
          "uncompressed). packed MB: its nonzero values plus a 1-bit-per-element mask.")
    if compare:
        print("torch.ao s: torch.ao.pruning DataNormSparsifier add_data + step + squash_mask on a copy; same: "
              "identical result tensor.")


def _sparsify(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    block_size = args.block[0] * args.block[1]
    if args.zeros_per_block is not None and not 0 <= args.zeros_per_block <= block_size:
        raise CliError(f"--zeros-per-block must be in [0, {block_size}] for block {args.block[0]}x{args.block[1]}, "
                       f"got {args.zeros_per_block}")
    compare = args.checkpoint is None if args.compare is None else args.compare

    output = args.output
    if args.checkpoint is not None and output is None:
        output = _default_output(args.checkpoint)
    if output is not None:
        _check_output(output, args.checkpoint, args.overwrite)

    if args.checkpoint is None:
        print(f"generated DLRM-like model: {len(DEMO_TABLE_ROWS)} embedding tables, {sum(DEMO_TABLE_ROWS):,} rows "
              f"x {DEMO_EMBEDDING_DIM} (seed {DEMO_SEED})", file=sys.stderr)
        obj = _demo_model()
    else:
        obj = _load_checkpoint(args.checkpoint, args.allow_pickle)
        if not isinstance(obj, (Mapping, torch.nn.Module)):
            raise CliError(f"{str(args.checkpoint)!r} holds a {type(obj).__name__}, not a state_dict or a model")
    chosen = _select(_named_tensors(obj), args.tensors)

    rows = []
    for name, tensor in _progress(list(chosen.items()), len(chosen)):
        original = tensor.detach().clone() if compare else None
        with torch.no_grad():
            seconds = _sparsify_tensor(tensor.detach(), args, device)
        nonzeros = int(torch.count_nonzero(tensor))
        row = {"name": name, "shape": tuple(tensor.shape), "seconds": seconds,
               "sparsity": 1.0 - nonzeros / max(1, tensor.numel()),
               "dense_bytes": tensor.numel() * tensor.element_size(),
               "packed_bytes": nonzeros * tensor.element_size() + math.ceil(tensor.numel() / 8)}
        if compare:
            ran = _torch_ao_run(original, args)
            if ran is not None:
                row["torch_ao_seconds"], theirs = ran
                row["same"] = torch.equal(theirs, tensor.detach())
            del original
        rows.append(row)

    print(f"level {args.level}, block {args.block[0]}x{args.block[1]}, norm {args.norm}, zeros per block "
          f"{args.zeros_per_block if args.zeros_per_block is not None else block_size}, device {device}")
    _print_table(rows, compare)
    if output is not None:
        try:
            _atomic_save(obj, output, _file_mode(output, args.checkpoint))
        except OSError as exc:
            reason = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
            raise CliError(f"could not write {str(output)!r}: {reason}; nothing was written", EXIT_WRITE_FAILED) from exc
        print(f"wrote {output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsity-ext", description="sparsity_ext: kernel-accelerated torch.ao.pruning")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what is built and which backend each op runs on")
    _add_sparsify_parser(sub)
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
        return _sparsify(args)
    except CliError as exc:
        print(f"sparsity-ext {args.command}: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print(f"sparsity-ext {args.command}: interrupted; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
