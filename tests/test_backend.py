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
        assert data["backends"][op]["reference"] == "torch ops"
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
            "m = ops.block_norm_mask(torch.empty(8, 8, device='meta'), 0.5, (2, 2))\n"
            "assert m.device.type == 'meta' and m.shape == (8, 8)  # the fakes serve meta without the extension\n"
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


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="meta")


def _meta_cases():
    """(op name, call) pairs: each call takes a tensor conversion (identity or _meta) and runs one op.
    (sparsify_24_pack is left out: the semi-structured layout checks ask for a CPU or CUDA tensor.)"""
    data = torch.randn(6, 10)
    mask = ops.block_norm_mask(data, 0.5, (2, 2))
    scores = ops.block_scores(data, (2, 2))
    packed = ops.pack_mask(mask)
    return [
        ("block_norm_mask", lambda to: ops.block_norm_mask(to(data), 0.5, (2, 2))),
        ("block_norm_mask packed", lambda to: ops.block_norm_mask(to(data), 0.5, (2, 2), packed=True)),
        ("block_norm_mask_apply_", lambda to: ops.block_norm_mask_apply_(to(data.clone()), 0.5, (2, 2))),
        ("block_norm_mask_into_", lambda to: ops.block_norm_mask_into_(to(data), to(mask.clone()), 0.5, (2, 2))),
        ("block_norm_mask_update_",
         lambda to: ops.block_norm_mask_update_(to(data), to(mask.float()), 0.5, (2, 2))),
        ("block_scores", lambda to: ops.block_scores(to(data), (2, 2))),
        ("block_norm_mask_select", lambda to: ops.block_norm_mask_select(to(data), to(scores), 1.0, 0, (2, 2))),
        ("nm_mask", lambda to: ops.nm_mask(to(data), 2, 4)),
        ("select_threshold", lambda to: ops.select_threshold(to(data.view(-1)), 7)),
        ("apply_mask_", lambda to: ops.apply_mask_(to(data.clone()), to(mask))),
        ("pack_mask", lambda to: ops.pack_mask(to(mask))),
        ("unpack_mask", lambda to: ops.unpack_mask(to(packed), (6, 10))),
    ]


@pytest.mark.parametrize("backend", ["auto", "reference", "cuda"])
@pytest.mark.parametrize("case", range(12))
def test_meta_tensors_run_the_fake_and_give_the_real_shapes(case, backend):
    """Shape-only (meta) tensors, as in a model built on the meta device: every op returns what it would on
    real tensors, in shape and dtype, on meta, whichever backend is chosen (like torch's own ops on meta)."""
    name, call = _meta_cases()[case]
    real = call(lambda t: t)
    with sparsity_ext.use_backend(backend):
        fake = call(_meta)
    real, fake = (real, fake) if isinstance(real, tuple) else ((real,), (fake,))
    assert len(fake) == len(real), name
    for want, got in zip(real, fake):
        assert got.device.type == "meta", name
        assert (got.shape, got.dtype) == (want.shape, want.dtype), name


def test_meta_tensors_still_get_argument_errors():
    data, mask = torch.empty(6, 10, device="meta"), torch.empty(6, 10, device="meta", dtype=torch.bool)
    with pytest.raises(ValueError, match="sparsity_level must be in"):
        ops.block_norm_mask(data, 1.5, (2, 2))
    with pytest.raises(ValueError, match="zeros_per_block"):
        ops.block_norm_mask_update_(data, mask, 0.5, (2, 2), zeros_per_block=5)
    with pytest.raises(ValueError, match="mask shape"):
        ops.block_norm_mask_update_(data, mask[:3], 0.5, (2, 2))
    with pytest.raises(ValueError, match="mask is on"):
        ops.apply_mask_(data, torch.ones(6, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="n must be in"):
        ops.nm_mask(data, 5, 4)
