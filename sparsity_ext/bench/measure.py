"""Timing, memory and bandwidth helpers shared by every sparsity_ext benchmark (the `sparsity-ext bench`
suite and benchmarks/bench_sparsifiers.py): one implementation of each."""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclasses.dataclass(frozen=True)
class Timing:
    ms: float    # median of the timed runs
    runs: int


def time_call(fn: Callable[[], object], device: str, budget_s: float, *, setup: Callable[[], object] | None = None,
              warmup: bool = True, min_runs: int = 3, max_runs: int = 50) -> Timing:
    """Median wall time of fn() in ms: an untimed warm-up call (kernel compilation, caches), then timed runs
    until at least min_runs were made and budget_s has passed, or max_runs. setup() runs untimed before each
    call (e.g. restoring data an in-place op changed). On CUDA each run is timed with CUDA events."""
    if warmup:
        if setup is not None:
            setup()
        fn()
        sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < max_runs):
        if setup is not None:
            setup()
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), len(times))


def peak_probe(device: str):
    """(reset(), peak_extra_bytes()) for the device: CUDA allocator stats, or the process's VmHWM on the CPU.
    The CPU probe is only meaningful in a fresh process: the C allocator keeps freed memory, so a process
    that already ran similar work reuses it without raising its high-water mark."""
    base = {}
    if device == "cuda":
        def reset():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base["v"] = torch.cuda.memory_allocated()

        def peak():
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base["v"]
        return reset, peak

    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        return 0

    def reset():
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
            f.write("5")
        base["v"] = status("VmRSS")

    def peak():
        return status("VmHWM") - base["v"]
    return reset, peak


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a large tensor copy on the device (median of several)."""
    n = (1 << 28) if device == "cuda" else (1 << 26)  # 1 GiB / 256 MiB of fp32
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / statistics.median(times[2:])


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def source_commit() -> str | None:
    """The git commit of the sparsity_ext checkout being run, or None (an installed copy has no git)."""
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", package_dir, "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_meta(device: str, bandwidth: float, floor: str) -> dict:
    """The machine, software and command a result was measured with (the shared header of result files)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "device": device_name(device), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "triton": triton_version, "python": platform.python_version(), "commit": source_commit(),
            "copy_bandwidth_gbps": bandwidth / 1e9,
            # other work on the machine skews CPU numbers: the 1-minute load average when the run started
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "command": " ".join([os.path.basename(sys.argv[0] or sys.executable)] + sys.argv[1:]),
            "floor": floor}


def write_results(stem: str, title: str, meta: dict, rows: list, table: str) -> None:
    """stem.json (meta + rows) and stem.md (title, meta, table); prints the table."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# {title}\n\n{meta['date']}, {meta['device']}, torch {meta['torch']}, copy bandwidth "
                f"{meta['copy_bandwidth_gbps']:.1f} GB/s (read+write).\nCommand: `{meta['command']}`. "
                f"Floor: {meta['floor']}.\n\n{table}\n")
    print()
    print(table)
    print(f"\nwrote {stem}.json and {stem}.md")
