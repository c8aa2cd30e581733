"""`sparsity-ext bench`: a tiny run writes JSON, markdown and plots of the expected structure; bad arguments fail
clearly. No timing asserts: benchmarks are not tests."""
import json
import os
import subprocess
import sys

import pytest
import torch

from sparsity_ext import cli
from sparsity_ext.bench import cases as bench_cases, suite

TINY = ["--device", "cpu", "--sizes", "4096,16384", "--budget", "0"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Every case at two tiny sizes, once for the module's tests."""
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("bench")
    status = cli.main(["bench", *TINY, "--out", str(out)])
    with open(out / "bench.json") as f:
        return status, out, json.load(f)


def test_tiny_run_succeeds_and_writes_every_output(tiny_run):
    status, out, _ = tiny_run
    assert status == 0
    assert sorted(os.listdir(out)) == ["bench.json", "bench.md", "time_vs_size.png", "x_over_floor.png"]
    for png in ("time_vs_size.png", "x_over_floor.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_json_meta_describes_the_machine_and_run(tiny_run):
    _, _, result = tiny_run
    meta = result["meta"]
    assert meta["device"] and meta["torch"] == torch.__version__
    assert meta["copy_bandwidth_gbps"] > 0
    assert "copy bandwidth" in meta["floor"]
    assert meta["sizes"] == [4096, 16384] and meta["quick"] is False
    assert meta["plots"] == ["time_vs_size.png", "x_over_floor.png"]
    assert "commit" in meta and meta["wall_s"] > 0
    assert "block_norm_mask" in meta["backends"]


def test_json_rows_cover_every_case_backend_baseline_and_size(tiny_run):
    _, _, result = tiny_run
    rows = result["rows"]
    assert suite.backends_for(bench_cases.cases("cpu")[0], "cpu")[0] == ["reference", "cpu"]
    assert all("error" not in r for r in rows), [r for r in rows if "error" in r]
    for case in bench_cases.cases("cpu"):
        case_rows = [r for r in rows if r["case"] == case.key]
        usable, _ = suite.backends_for(case, "cpu")
        expected = {f"sparsity_ext[{b}]" for b in usable} | {b.name for b in case.baselines}
        assert {r["impl"] for r in case_rows} == expected, case.key
        for impl in expected:   # one row per size, sizes rounded to the case's layout
            numels = sorted(r["numel"] for r in case_rows if r["impl"] == impl)
            assert len(numels) == 2 and numels[0] < numels[1], (case.key, impl)
    for r in rows:
        assert r["ms"] > 0 and r["runs"] >= 3 and r["floor_ms"] > 0
        assert r["x_over_floor"] == pytest.approx(r["ms"] / r["floor_ms"])
        assert r["numel"] == int(torch.tensor(r["shape"]).prod())
        if not r["baseline"]:
            baselines = {b["impl"]: b["ms"] for b in rows
                         if b["baseline"] and b["case"] == r["case"] and b["numel"] == r["numel"]}
            assert r["speedup_vs"].keys() == baselines.keys()
            for name, ms in baselines.items():
                assert r["speedup_vs"][name] == pytest.approx(ms / r["ms"])


def test_markdown_has_summary_a_table_per_case_and_the_plots(tiny_run):
    _, out, result = tiny_run
    text = (out / "bench.md").read_text()
    assert text.startswith("# sparsity_ext ops (cpu)")
    assert "## Summary (largest size of each case)" in text
    for title in {r["title"] for r in result["rows"]}:
        assert f"## {title}" in text
    assert "speedup vs torch.ao DataNormSparsifier.step" in text
    assert "![time_vs_size](time_vs_size.png)" in text and "![x_over_floor](x_over_floor.png)" in text
    header = next(line for line in text.splitlines() if line.startswith("| elements |"))
    assert not header.endswith("| |")


def test_without_matplotlib_the_plots_are_skipped_with_a_notice(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # `import matplotlib` raises ImportError
    status = cli.main(["bench", *TINY, "--sizes", "4096", "--ops", "pack_mask", "--out", str(tmp_path)])
    _, err = capsys.readouterr()
    assert status == 0
    assert sorted(os.listdir(tmp_path)) == ["bench.json", "bench.md"]
    assert "matplotlib is not installed" in err
    assert "matplotlib is not installed" in (tmp_path / "bench.md").read_text()
    assert json.loads((tmp_path / "bench.json").read_text())["meta"]["plots"] == []


def test_ops_selects_cases(tmp_path):
    assert cli.main(["bench", *TINY, "--sizes", "4096", "--ops", "apply_mask_", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {r["case"] for r in rows} == {"apply_mask_", "apply_mask_.packed"}


@pytest.mark.parametrize("argv, message", [
    (["--device", "gpu"], "invalid choice: 'gpu'"),
    (["--sizes", "abc"], "expected comma-separated element counts"),
    (["--sizes", "4096,0"], "element counts must be positive"),
    (["--ops", "nm_mask,bogus"], "unknown op bogus"),
    (["--budget", "-1"], "must be >= 0 seconds"),
])
def test_bad_arguments_exit_2_with_a_clear_message(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *argv, "--out", str(tmp_path / "never")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "--device", "cuda", "--out", str(tmp_path / "never")]) == 2
    assert "sparsity-ext bench: error: --device cuda: no CUDA device is available" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("keep me")
    assert cli.main(["bench", *TINY, "--out", str(target)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_bench_ops_script_runs_the_same_suite(tmp_path):
    """benchmarks/bench_ops.py is a thin wrapper over the suite (run as a script, from the checkout)."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_ops.py"), "--sizes", "4096",
                           "--ops", "pack_mask", "--budget", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {r["impl"] for r in rows} == {"sparsity_ext[cpu]", "sparsity_ext[reference]"}
