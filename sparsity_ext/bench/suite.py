"""Runs the cases of sparsity_ext.bench.cases at their sizes on every available backend and baseline, and turns
the measurements into rows (JSON) and a markdown report."""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable

import torch

from .. import _backend
from .cases import SLOW_MAX_NUMEL, Baseline, Case, cases, shape_for, sizes_for
from .measure import peak_probe, time_call

FLOOR = "(bytes the op must read once + bytes it must write once) / measured copy bandwidth of the same device"
# Seconds of timed repeats per measurement (after the warm-up call), and the most repeats.
BUDGET_S = {("cpu", True): 0.1, ("cpu", False): 0.5, ("cuda", True): 0.1, ("cuda", False): 0.2}
MAX_RUNS = 30


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str                  # "sparsity_ext[cpu]", or the baseline's name
    backend: str | None        # sparsity_ext backend pinned ("auto" for an op the registry does not know); None: torch
    baseline: Baseline | None

    @property
    def slow(self) -> bool:
        return self.backend == "reference" or (self.baseline is not None and self.baseline.slow)


def backends_for(case: Case, device: str) -> tuple[list[str], dict[str, str]]:
    """(backends that can run the case's op on this device, {backend: why not} for those registered for this
    device that cannot: not built, dtype unsupported)."""
    if not case.op:
        return [], {}
    registered = _backend._registry.get(case.op)
    if registered is None:
        return ["auto"], {}   # an op outside the registry dispatches by itself
    usable, reasons = [], {}
    for name in _backend.BACKENDS:
        if name not in registered or device not in registered[name].devices:
            continue
        if name == "triton" and device == "cpu":  # only under TRITON_INTERPRET: a test mode, not worth timing
            reasons[name] = "the triton interpreter (TRITON_INTERPRET=1) is not timed"
            continue
        with _backend.use_backend(name):
            try:
                _backend.resolve(case.op, torch.device(device), case.dtype)
                usable.append(name)
            except RuntimeError as exc:
                reasons[name] = str(exc)
    return usable, reasons


def select_cases(device: str, only: list[str] | None) -> list[Case]:
    """The cases to run: all, or those whose key or op is named in `only`."""
    every = cases(device)
    if not only:
        return every
    return [c for c in every if c.key in only or c.op in only or c.key.split(".")[0] in only]


def case_names(device: str = "cpu") -> list[str]:
    """Names --ops accepts: the ops and the case keys."""
    return sorted({c.key for c in cases(device)} | {c.key.split(".")[0] for c in cases(device)})


def plan(device: str, quick: bool, sizes: tuple[int, ...] | None, only: list[str] | None):
    """[(case, impls, [numel...])], and [{case, impl, reason}] for implementations that cannot run here."""
    planned, unavailable = [], []
    for case in select_cases(device, only):
        usable, reasons = backends_for(case, device)
        impls = [Impl(f"sparsity_ext[{b}]", b, None) for b in usable]
        impls += [Impl(b.name, None, b) for b in case.baselines]
        unavailable += [{"case": case.key, "impl": f"sparsity_ext[{b}]", "reason": r} for b, r in reasons.items()]
        planned.append((case, impls, sizes_for(case, device, quick, sizes)))
    return planned, unavailable


def ops_not_covered(device: str) -> list[str]:
    """Registered ops that no case measures (e.g. a new op the suite does not know yet)."""
    covered = {c.op for c in cases(device)}
    return sorted(op for op in _backend._registry if op not in covered)


def _bind(case: Case, impl: Impl, inputs: dict) -> Callable[[], object]:
    if impl.baseline is not None:
        return impl.baseline.bind(inputs)
    if impl.backend == "auto":
        return lambda: case.run(inputs)

    def pinned():
        with _backend.use_backend(impl.backend):
            return case.run(inputs)
    return pinned


def _error_text(exc: BaseException) -> str:
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return f"out of memory: {first}"
    return f"{type(exc).__name__}: {first}"


def measure(case: Case, impl: Impl, inputs: dict, device: str, budget_s: float) -> dict:
    """{ms, runs, peak_extra_mib (CUDA)} of one implementation on one input, or {error}."""
    try:
        call = _bind(case, impl, inputs)
        setup = (lambda: inputs["x"].copy_(inputs["pristine"])) if case.restore else None
        if setup is not None:
            setup()
        result = {}
        call()  # warm-up: compiles, and autotunes triton kernels (whose benchmark buffers are not the op's)
        if device == "cuda":  # the peak of the next call is the one reported
            if setup is not None:
                setup()
            reset, peak = peak_probe(device)
            reset()
            call()
            result["peak_extra_mib"] = peak() / 2**20
        timing = time_call(call, device, budget_s, setup=setup, warmup=False, max_runs=MAX_RUNS)
        return {**result, "ms": timing.ms, "runs": timing.runs}
    except Exception as exc:  # reported in the results, never hidden
        return {"error": _error_text(exc)}


class _Progress:
    """tqdm on a terminal; otherwise (a log file, tqdm missing) one line per measurement on stderr."""

    def __init__(self, total: int):
        self.total, self.done, self.bar = total, 0, None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def start(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description(label[:60])

    def finish(self, label: str, result: dict) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update()
        else:
            status = f"{result['ms']:.3f} ms" if "ms" in result else result["error"]
            print(f"[{self.done}/{self.total}] {label}: {status}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_suite(device: str, quick: bool, bandwidth: float, sizes: tuple[int, ...] | None = None,
              only: list[str] | None = None, budget_s: float | None = None) -> tuple[list[dict], list[dict]]:
    """Measures every planned (case, size, implementation); returns (rows, unavailable)."""
    planned, unavailable = plan(device, quick, sizes, only)
    budget = BUDGET_S[(device, quick)] if budget_s is None else budget_s
    slow_cap = SLOW_MAX_NUMEL[device]
    total = sum(1 for _, impls, numels in planned for n in numels for i in impls if not (i.slow and n > slow_cap))
    progress = _Progress(total)
    rows, shared = [], {}   # shared: (baseline key, shape) -> result, for baselines common to several cases
    try:
        for case, impls, numels in planned:
            for numel in numels:
                shape = shape_for(case.layout, numel)
                actual = 1
                for s in shape:
                    actual *= s
                generator = torch.Generator(device=device).manual_seed(0)
                inputs = case.make(shape, device, generator)
                floor_ms = case.floor_bytes(actual) / bandwidth * 1e3
                for impl in impls:
                    if impl.slow and numel > slow_cap:
                        continue
                    label = f"{case.key} {'x'.join(map(str, shape))} {impl.name}"
                    progress.start(label)
                    cache_key = (impl.baseline.key, shape) if impl.baseline is not None else None
                    if cache_key in shared:
                        result = shared[cache_key]
                    else:
                        result = measure(case, impl, inputs, device, budget)
                        if cache_key is not None:
                            shared[cache_key] = result
                    progress.finish(label, result)
                    row = {"case": case.key, "title": case.title, "op": case.op, "impl": impl.name,
                           "backend": impl.backend, "baseline": impl.baseline is not None, "numel": actual,
                           "shape": list(shape), "floor_ms": floor_ms, **result}
                    if "ms" in result:
                        row["x_over_floor"] = result["ms"] / floor_ms
                    rows.append(row)
                del inputs
                if device == "cuda":
                    torch.cuda.empty_cache()
    finally:
        progress.close()
    _add_speedups(rows)
    return rows, unavailable


def _add_speedups(rows: list[dict]) -> None:
    """Each sparsity_ext row gets speedup_vs {baseline: baseline ms / its ms} at the same case and size."""
    for row in rows:
        if row["baseline"] or "ms" not in row:
            continue
        row["speedup_vs"] = {b["impl"]: b["ms"] / row["ms"] for b in rows
                             if b["baseline"] and b["case"] == row["case"] and b["numel"] == row["numel"] and "ms" in b}


# ------------------------------------------------------------------------------------------ report
def _fmt_ms(ms: float) -> str:
    return f"{ms:.4f}" if ms < 0.1 else f"{ms:.3f}" if ms < 100 else f"{ms:.1f}"


def markdown(rows: list[dict], unavailable: list[dict], device: str, plots: list[str], plot_notice: str | None) -> str:
    """The report body: a summary at each case's largest size, then one table per case, then the plots."""
    by_case: dict[str, list[dict]] = {}
    for row in rows:
        by_case.setdefault(row["case"], []).append(row)
    lines = ["Times are medians after a warm-up call"
             + (" (CUDA events); peak extra MiB: torch.cuda.max_memory_allocated during the warm-up call above "
                "what was allocated before it." if device == "cuda" else
                "; peak memory is not measured on the CPU (see benchmarks/bench_sparsifiers.py for per-process "
                "peaks)."),
             f"x over floor = ms / floor ms; below 1x means the data fit in a cache (the floor is measured with "
             f"a copy much larger than the caches). Slow-by-design implementations (torch.ao, full-sort baselines, the "
             f"reference backend) stop at {SLOW_MAX_NUMEL[device]:,} elements.", "",
             "## Summary (largest size of each case)", "",
             "| case | elements | fastest sparsity_ext | ms | x over floor | fastest baseline | ms | speedup |",
             "|---|---:|---|---:|---:|---|---:|---:|"]
    for case, case_rows in by_case.items():
        ok = [r for r in case_rows if "ms" in r]
        ours = [r for r in ok if not r["baseline"]]
        theirs = [r for r in ok if r["baseline"]]
        top = max((r["numel"] for r in ours), default=max((r["numel"] for r in theirs), default=None))
        if top is None:
            continue
        best = min((r for r in ours if r["numel"] == top), key=lambda r: r["ms"], default=None)
        base = min((r for r in theirs if r["numel"] == top), key=lambda r: r["ms"], default=None)
        cells = [case, f"{top:,}"]
        cells += [best["impl"], _fmt_ms(best["ms"]), f"{best['x_over_floor']:.2f}"] if best else ["-", "", ""]
        cells += [base["impl"], _fmt_ms(base["ms"])] if base else ["-", ""]
        cells.append(f"{base['ms'] / best['ms']:.1f}x" if best and base else "")
        lines.append("| " + " | ".join(cells) + " |")
    for case, case_rows in by_case.items():
        baselines = list(dict.fromkeys(r["impl"] for r in case_rows if r["baseline"]))
        headers = ["elements", "shape", "impl", "ms", "x over floor", "floor ms"] + [f"speedup vs {b}" for b in baselines]
        headers += ["peak extra MiB"] if device == "cuda" else []
        lines += ["", f"## {case_rows[0]['title']}", "", "| " + " | ".join(headers) + " |",
                  "|---:|---|---|" + "---:|" * (len(headers) - 3)]
        for r in case_rows:
            cells = [f"{r['numel']:,}", "x".join(map(str, r["shape"])), r["impl"]]
            if "ms" in r:
                cells += [_fmt_ms(r["ms"]), f"{r['x_over_floor']:.2f}", _fmt_ms(r["floor_ms"])]
                speedups = r.get("speedup_vs", {})
                cells += [f"{speedups[b]:.1f}x" if b in speedups else "" for b in baselines]
                if device == "cuda":
                    cells.append(f"{r['peak_extra_mib']:.1f}")
            else:
                cells += [r["error"], "", _fmt_ms(r["floor_ms"])] + [""] * len(baselines) + ([""] if device == "cuda" else [])
            lines.append("| " + " | ".join(cells) + " |")
    if not_covered := ops_not_covered(device):
        lines += ["", "Registered ops this suite has no case for: " + ", ".join(not_covered) + "."]
    grouped: dict[tuple[str, str], list[str]] = {}
    for u in unavailable:
        grouped.setdefault((u["impl"], u["reason"]), []).append(u["case"])
    for (impl, reason), where in grouped.items():
        lines += ["", f"Not run here: {impl} for {', '.join(where)}: {reason}"]
    if plots:
        lines += [""] + [f"![{p[:-4]}]({p})" for p in plots]
    if plot_notice:
        lines += ["", plot_notice]
    return "\n".join(lines)
