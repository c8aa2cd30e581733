"""PNG plots of a `sparsity-ext bench` run (matplotlib, an optional dependency: imported only here)."""
from __future__ import annotations

import math
import os

PLOTS = ("time_vs_size.png", "x_over_floor.png")


def matplotlib_missing() -> str | None:
    """None if matplotlib can be imported, else the notice to show instead of the plots."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ("matplotlib is not installed: the PNG plots were skipped (JSON and markdown are written). "
                "Install it with `pip install matplotlib` and run the benchmark again to get them.")
    return None


# sparsity_ext backends keep their colour in every panel; torch baselines (dashed) take the others in turn.
BACKEND_COLORS = {"reference": "tab:gray", "cpu": "tab:blue", "cuda": "tab:green", "triton": "tab:purple",
                  "auto": "tab:blue"}
BASELINE_COLORS = ("tab:orange", "tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def _styles(impls: list[dict]) -> dict[str, dict]:
    """{impl name: plot style} for one panel, from one row of each implementation."""
    styles, baselines = {}, 0
    for row in impls:
        if row["baseline"]:
            styles[row["impl"]] = {"color": BASELINE_COLORS[baselines % len(BASELINE_COLORS)], "linestyle": "--",
                                   "marker": "s", "linewidth": 1.2, "markersize": 3}
            baselines += 1
        else:
            styles[row["impl"]] = {"color": BACKEND_COLORS.get(row["backend"], "tab:blue"), "linestyle": "-",
                                   "marker": "o", "linewidth": 1.8, "markersize": 4}
    return styles


def _grid(cases: list[str]):
    import matplotlib.pyplot as plt
    ncols = min(3, len(cases))
    nrows = math.ceil(len(cases) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.4 * nrows), squeeze=False)
    for ax in axes.flat[len(cases):]:
        ax.set_visible(False)
    return fig, list(axes.flat[:len(cases)])


def write_plots(rows: list[dict], out_dir: str, title: str) -> list[str]:
    """time_vs_size.png (ms vs elements, log-log, with the floor) and x_over_floor.png (ms / floor vs elements),
    one panel per case, one line per implementation. Returns the file names written."""
    import matplotlib
    matplotlib.use("Agg")   # files only, no display
    import matplotlib.pyplot as plt

    by_case: dict[str, list[dict]] = {}
    for row in rows:
        if "ms" in row:
            by_case.setdefault(row["case"], []).append(row)
    if not by_case:
        return []
    titles = {r["case"]: r["title"] for r in rows}
    written = []
    for name, metric, ylabel in (("time_vs_size.png", "ms", "median time (ms)"),
                                 ("x_over_floor.png", "x_over_floor", "time / floor (x over floor)")):
        fig, axes = _grid(list(by_case))
        for ax, (case, case_rows) in zip(axes, by_case.items()):
            styles = _styles(list({r["impl"]: r for r in case_rows}.values()))
            for impl, style in styles.items():
                points = sorted((r["numel"], r[metric]) for r in case_rows if r["impl"] == impl)
                ax.plot(*zip(*points), label=impl, **style)
            if metric == "ms":
                floor = sorted({(r["numel"], r["floor_ms"]) for r in case_rows})
                ax.plot(*zip(*floor), color="black", linestyle=":", linewidth=1.2, label="copy-bandwidth floor")
            else:
                ax.axhline(1.0, color="black", linestyle=":", linewidth=1.2, label="floor (1x)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(_wrap(titles[case]), fontsize=9)
            ax.set_xlabel("elements", fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=6.5, loc="best")
        fig.suptitle(title, fontsize=11)
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def _wrap(text: str, width: int = 55) -> str:
    if len(text) <= width:
        return text
    cut = text.rfind(" ", 0, width)
    return text[:cut] + "\n" + text[cut + 1:] if cut > 0 else text
