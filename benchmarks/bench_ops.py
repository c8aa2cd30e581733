"""Per-op kernel benchmark: the `sparsity-ext bench` suite (sparsity_ext/bench), run from a source checkout.

    python benchmarks/bench_ops.py                   # CPU: every op on every CPU backend, torch baselines, floor
    python benchmarks/bench_ops.py --device cuda     # GPU: cuda, triton and reference backends
    python benchmarks/bench_ops.py --quick           # small sizes

Same options as `sparsity-ext bench` (see `sparsity-ext bench --help`); results (bench.json, bench.md, PNG plots)
go to --out, by default benchmarks/results/<device>/bench[-quick].
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))   # the checkout's sparsity_ext, when it is not installed

from sparsity_ext import cli  # noqa: E402


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def main(argv: list[str]) -> int:
    if _option(argv, "--device") is None:   # this script's default stays the CPU, whatever the machine has
        argv = [*argv, "--device", "cpu"]
    if _option(argv, "--out") is None:
        folder = "bench-quick" if "--quick" in argv else "bench"
        argv = [*argv, "--out", os.path.join(HERE, "results", _option(argv, "--device"), folder)]
    return cli.main(["bench", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
