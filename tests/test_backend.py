"""Backend registry, dispatch overrides, info(), and import without the compiled extension."""
import os
import subprocess
import sys

import pytest
import torch

import sparsity_ext
from sparsity_ext import _backend, ops, reference


def test_auto_prefers_compiled_cpu_kernel_when_built():
    name, _ = _backend.resolve("pack_mask", torch.device("cpu"), torch.bool)
    expected = "cpu" if sparsity_ext._extension.load_error is None else "reference"
    assert name == expected


def test_use_backend_nests_and_restores():
    assert sparsity_ext.current_backend() == "auto"
    with sparsity_ext.use_backend("reference"):
        assert _backend.resolve("block_norm_mask", torch.device("cpu"), torch.float32)[0] == "reference"
        with sparsity_ext.use_backend("auto"):
            assert sparsity_ext.current_backend() == "auto"
        assert sparsity_ext.current_backend() == "reference"
    assert sparsity_ext.current_backend() == "auto"


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="unknown sparsity_ext backend"):
        with sparsity_ext.use_backend("fpga"):
            pass


def test_explicit_backend_that_cannot_run_says_why():
    # The cuda backend never accepts CPU tensors, whatever is built.
    with sparsity_ext.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="cannot run block_norm_mask on the requested backend"):
            ops.block_norm_mask(torch.randn(4, 8), 0.5, (1, 4))


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("SPARSITY_EXT_BACKEND", "reference")
    assert sparsity_ext.current_backend() == "reference"
    monkeypatch.setenv("SPARSITY_EXT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        sparsity_ext.current_backend()


def test_fp64_falls_back_to_reference_under_auto():
    x = torch.randn(6, 10, dtype=torch.float64)
    assert _backend.resolve("block_norm_mask", x.device, x.dtype)[0] == "reference"
    assert torch.equal(ops.block_norm_mask(x, 0.5, (1, 2)), reference.block_norm_mask(x, 0.5, (1, 2), 2, 2))


def test_info_lists_every_op_and_backend():
    text = sparsity_ext.info()
    data = sparsity_ext.info(as_text=False)
    for op in ("block_norm_mask", "nm_mask", "select_threshold", "apply_mask_", "pack_mask", "unpack_mask"):
        assert op in text
        assert data["backends"][op]["reference"] == "yes"
        assert data["fp32_runs_on"][op]["cpu"] in _backend.BACKENDS


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_import_without_extension_warns_once_and_uses_reference():
    code = ("import warnings, torch\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import sparsity_ext\n"
            "    from sparsity_ext import ops\n"
            "msgs = [str(x.message) for x in w if 'compiled kernels unavailable' in str(x.message)]\n"
            "assert len(msgs) == 1, msgs\n"
            "m = ops.block_norm_mask(torch.randn(8, 8), 0.5, (2, 2))\n"
            "assert m.dtype == torch.bool and m.shape == (8, 8)\n"
            "print(sparsity_ext.info(as_text=False)['fp32_runs_on']['block_norm_mask']['cpu'])\n")
    proc = _run_python(code, SPARSITY_EXT_USE_CPP="0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "reference"


def test_cli_info_runs():
    proc = _run_python("from sparsity_ext.cli import main; main(['info'])")
    assert proc.returncode == 0, proc.stderr
    assert "block_norm_mask" in proc.stdout


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the CPU's features from /proc/cpuinfo")
def test_kernels_built_for_missing_cpu_features_are_not_loaded(monkeypatch):
    """setup.py records the CPU features its -march needs; a CPU without them must get the reference ops (and
    a message saying why), never an illegal-instruction crash on import."""
    import types
    with open("/proc/cpuinfo") as f:
        present = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))[0]
    monkeypatch.setitem(sys.modules, "sparsity_ext._build_config",
                        types.SimpleNamespace(CPU_ARCH_FLAGS=(present, "no_such_cpu_feature")))
    assert sparsity_ext._extension._missing_cpu_features() == ["no_such_cpu_feature"]
    code = ("import sys, types; sys.modules['sparsity_ext._build_config'] = "
            "types.SimpleNamespace(CPU_ARCH_FLAGS=('no_such_cpu_feature',)); import warnings; "
            "warnings.simplefilter('ignore'); import sparsity_ext; print(sparsity_ext._extension.load_error)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "no_such_cpu_feature" in out and "rebuild" in out
