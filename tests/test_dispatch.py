"""The dispatch layer: one implementation per (op, backend), composites where a backend has no kernel,
info() naming what runs, torch.compile(fullgraph=True) through every public op, and a package whose
modules each import alone."""
import dataclasses
import pkgutil
import subprocess
import sys

import pytest
import torch

import sparsity_ext
from sparsity_ext import _backend, _composites, _extension, ops, reference
from sparsity_ext import triton as triton_backend

from conftest import backend_available


def _device_of(backend: str) -> str:
    return "cpu" if backend in ("cpu", "reference") else "cuda"


def test_every_op_has_one_described_implementation_per_backend():
    allowed = ("kernel", "torch ops", "composite: ", "not built: ", "-")
    table = _backend.backend_table()
    assert set(table) == set(_backend.OP_NAMES)
    for op, row in table.items():
        assert row["reference"] == "torch ops", op
        for backend, cell in row.items():
            assert cell.startswith(allowed), (op, backend, cell)


def test_composites_fill_exactly_the_ops_a_backend_has_no_kernel_for():
    composite_ops = {c.op for c in _composites.COMPOSITES}
    if triton_backend.is_available():
        for op in _backend.OP_NAMES:
            kind = _backend.describe(op, "triton")
            if op in triton_backend.OP_NAMES:
                assert kind == "kernel", op
            else:
                assert op in composite_ops and kind.startswith("composite: "), (op, kind)
    if _extension.load_error is None:  # the C++ CPU backend has a kernel for every op
        assert all(_backend.describe(op, "cpu") == "kernel" for op in _backend.OP_NAMES)


def test_no_cell_says_not_built_for_an_op_the_build_can_run():
    """A backend is either built (every op it lists runs: its kernel or a composite) or not built at all."""
    for backend in ("cpu", "cuda", "triton"):
        cells = [_backend.describe(op, backend) for op in _backend.OP_NAMES]
        built = [c for c in cells if c.startswith(("kernel", "composite: "))]
        if built:
            assert not any(c.startswith("not built") for c in cells), (backend, cells)


def test_info_text_names_the_composites():
    text = sparsity_ext.info()
    for op in _backend.OP_NAMES:
        assert op in text
    if triton_backend.is_available():
        for composite in _composites.COMPOSITES:
            assert composite.description in text


@pytest.mark.skipif(not (triton_backend.is_available() and triton_backend.interpreting()),
                    reason="CPU tensors run on the triton backend only under TRITON_INTERPRET=1")
def test_pinned_triton_runs_its_composites_on_its_own_kernels(monkeypatch):
    """block_scores, block_norm_mask_update_/into_/select under use_backend('triton'): the composites run (they
    raised 'not compiled' before), equal the reference, and call the triton block_norm_mask, not another one."""
    triton_backend.register()
    g = torch.Generator().manual_seed(3)
    data = torch.randn(12, 40, generator=g)
    mask = torch.rand(12, 40, generator=g) > 0.3
    calls = []
    kernel = _backend.implementation("block_norm_mask", "triton")
    monkeypatch.setitem(_backend._registry["block_norm_mask"], "triton",
                        dataclasses.replace(kernel, fn=lambda *args: calls.append(args) or kernel.fn(*args)))
    with sparsity_ext.use_backend("triton"):
        scores = ops.block_scores(data, (2, 4))
        threshold, ties = ops.select_threshold(scores, 20)
        selected = ops.block_norm_mask_select(data, scores, threshold, ties, (2, 4), 3, 2)
        updated = ops.block_norm_mask_update_(data, mask.clone(), 0.5, (1, 4), 2, 1)
        into = ops.block_norm_mask_into_(data, torch.zeros(60, dtype=torch.uint8), 0.4, (2, 4), 8, 2)
    assert torch.equal(scores, reference.block_scores(data, (2, 4), 2))
    assert torch.equal(selected, reference.block_norm_mask_select(data, scores, threshold.item(), ties.item(),
                                                                  (2, 4), 3, 2))
    want = mask.clone()
    reference.block_norm_mask_update_(data, want, 0.5, (1, 4), 2, 1)
    assert torch.equal(updated, want)
    assert torch.equal(into, reference.block_norm_mask(data, 0.4, (2, 4), 8, 2, packed=True))
    assert len(calls) == 3  # select (level 1), update_ and into_ each ran the triton block_norm_mask once


def _compile_cases():
    """(op, function of one tensor returning tensors) for every public op."""
    block = (1, 4)

    def into(x):
        return ops.block_norm_mask_into_(x, torch.empty(x.shape, dtype=torch.bool, device=x.device), 0.5, block)

    def update(x):
        return ops.block_norm_mask_update_(x, torch.ones(x.shape, device=x.device), 0.5, block, 2, 1)

    def select(x):
        scores = ops.block_scores(x, block)
        return ops.block_norm_mask_select(x, scores, 0.5, 2, block, 2, 2)

    def apply_(x):
        y = x.clone()
        mask = ops.block_norm_mask_apply_(y, 0.5, (2, 2), packed=True)
        return y, mask

    def apply_mask(x):
        y = x.clone()
        ops.apply_mask_(y, x > 0)
        return y

    def pack_24(x):
        return ops.sparsify_24_pack(x.to(torch.float16))

    return {
        "block_norm_mask": lambda x: ops.block_norm_mask(x, 0.5, block),
        "block_norm_mask_apply_": apply_,
        "block_norm_mask_into_": into,
        "block_norm_mask_update_": update,
        "block_scores": lambda x: ops.block_scores(x, (2, 4), 1),
        "block_norm_mask_select": select,
        "nm_mask": lambda x: ops.nm_mask(x, 2, 4),
        "select_threshold": lambda x: ops.select_threshold(x.reshape(-1), 77),
        "apply_mask_": apply_mask,
        "pack_mask": lambda x: ops.pack_mask(x > 0),
        "unpack_mask": lambda x: ops.unpack_mask(ops.pack_mask(x > 0), x.shape),
        "sparsify_24_pack": pack_24,
    }


@pytest.mark.parametrize("backend", ["cpu", "reference", pytest.param("cuda", marks=pytest.mark.cuda),
                                     pytest.param("triton", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("op", _backend.OP_NAMES)
def test_every_public_op_compiles_fullgraph_and_gives_the_eager_result(op, backend):
    device = _device_of(backend)
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not backend_available(backend, device, op, torch.float16 if op == "sparsify_24_pack" else torch.float32):
        pytest.skip(f"the {backend} backend is not built here")
    data = torch.randn(32, 64, generator=torch.Generator().manual_seed(7)).to(device)
    fn = _compile_cases()[op]
    with sparsity_ext.use_backend(backend):
        eager = fn(data)
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(data)
    eager, compiled = (eager, compiled) if isinstance(eager, tuple) else ((eager,), (compiled,))
    assert len(compiled) == len(eager)
    for got, want in zip(compiled, eager):
        assert got.dtype == want.dtype and torch.equal(got, want), op


def _package_modules() -> list[str]:
    names = ["sparsity_ext"]
    for info in pkgutil.walk_packages(sparsity_ext.__path__, "sparsity_ext."):
        names.append(info.name)
    return sorted(names)


# Third-party packages some modules need that are optional extras of sparsity_ext.
OPTIONAL_DEPENDENCIES = {"lightning", "pytorch_lightning", "torchrec", "fbgemm_gpu", "matplotlib"}


# Each module is imported first in a process of its own, forked from one that has imported only torch (so the
# check costs one torch import, not one per module).
_IMPORT_EACH_ALONE = """
import importlib, os, sys, warnings
import torch
warnings.simplefilter("ignore")
for name in sys.argv[1:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            message = "ok"
        except ImportError as exc:  # an optional dependency's own error, or ours naming it (raised from it)
            missing = exc if isinstance(exc, ModuleNotFoundError) else exc.__cause__
            message = (f"missing {missing.name}" if isinstance(missing, ModuleNotFoundError)
                       else f"error ImportError: {exc}")
        except BaseException as exc:
            message = f"error {type(exc).__name__}: {exc}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        print(name, pipe.read().replace(chr(10), " "), flush=True)
    os.waitpid(pid, 0)
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """No import cycles: each module, imported first in a fresh process, loads (a cycle shows up as an
    ImportError or AttributeError on a half-initialised module)."""
    modules = _package_modules()
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH_ALONE, *modules], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert set(results) == set(modules)
    failures = {name: result for name, result in results.items()
                if result != "ok" and not (result.startswith("missing ")
                                           and result.split()[1].split(".")[0] in OPTIONAL_DEPENDENCIES)}
    assert not failures, failures
