"""GPU cases the other tests never reach: tie resolution past 256 tie tiles, ops on a side stream and inside
CUDA-graph capture and replay, the cuda and triton backends (triton autotuned) against the reference at the
headline sizes, and two GPUs. All cuda-marked (skipped without a GPU) except the tie case on the cpu backend
and the dry run of scripts/gpu_run.sh, which run everywhere.

The headline tests (named test_headline_*) hold tensors of up to 8 GB with the reference's temporaries (a few
tens of GB): scripts/gpu_run.sh runs them in their own step, one process, after the benchmarks.
"""
import os
import subprocess
import sys

import pytest
import torch

import sparsity_ext
from sparsity_ext import ops, reference
from conftest import HAS_CUDA, backend_available, cuda_only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_BACKENDS = ["cuda", "triton"]


def _require(backend: str, device: str) -> None:
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    if not backend_available(backend, device):
        pytest.skip(f"backend {backend!r} is not available for {device} tensors here")


def _randn(shape, seed, device="cuda", dtype=torch.float32):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device).to(dtype)


# ------------------------------------------------------------------------------ ties past 256 tie tiles
@pytest.mark.parametrize("backend,device", [("cpu", "cpu"), ("cuda", "cuda"), ("triton", "cuda")])
def test_ties_split_past_256_tie_tiles(backend, device):
    """2,304,000 (1, 4) blocks of one score, but for 1000 lower and 1000 higher ones at seeded places. At 95 % the
    mask selects every lower block and then the tied ones by lower index up to about block 2.19 M: in 8192-key
    tile 267, past the 256 tile counts that the CUDA tie search scans in its first round (> 2.1 M tied blocks)."""
    _require(backend, device)
    rows, cols, level = 4500, 2048, 0.95
    num_blocks = rows * cols // 4
    g = torch.Generator().manual_seed(0)
    data = torch.where(torch.rand(rows, cols, generator=g) < 0.5, -0.5, 0.5)  # |x| = 0.5: L1 scores tie
    order = torch.randperm(num_blocks, generator=g)
    lower, higher = order[:1000], order[1000:2000]
    blocks = data.view(num_blocks, 4)
    blocks[lower] *= 0.5
    blocks[higher] *= 2.0
    k = reference.num_selected_blocks(level, num_blocks)
    tied = torch.ones(num_blocks, dtype=torch.bool)
    tied[lower] = tied[higher] = False
    selected = ~tied
    selected[higher] = False
    taken = tied.nonzero().flatten()[:k - len(lower)]
    selected[taken] = True
    assert int(taken[-1]) // 8192 > 256  # the case this test is for
    expected = (~selected)[:, None].expand(num_blocks, 4).reshape(rows, cols).to(device)
    x = data.to(device)
    with sparsity_ext.use_backend(backend):
        assert torch.equal(ops.block_norm_mask(x, level, (1, 4), 4, 1), expected)
        assert torch.equal(ops.block_norm_mask(x, level, (1, 4), 4, 1, packed=True), reference.pack_mask(expected))
        zeroed = x.clone()
        ops.block_norm_mask_apply_(zeroed, level, (1, 4), 4, 1)
    assert torch.equal(zeroed, x.masked_fill(~expected, 0))


# -------------------------------------------------------------------------------- streams and graphs
def _call(op: str, x: torch.Tensor) -> tuple:
    """One op on x (fp32, 2-D), returning every tensor it produced or changed; in-place ops change x."""
    if op == "block_norm_mask":
        return (ops.block_norm_mask(x, 0.8, (1, 4), 4, 1),)
    if op == "block_norm_mask.packed":
        return (ops.block_norm_mask(x, 0.8, (1, 4), 4, 1, packed=True),)
    if op == "block_norm_mask.ranked":
        return (ops.block_norm_mask(x, 0.5, (2, 4), 3, 2),)
    if op == "block_norm_mask_apply_":
        return ops.block_norm_mask_apply_(x, 0.8, (1, 4), 4, 1, packed=True), x
    if op == "nm_mask":
        return (ops.nm_mask(x, 2, 4),)
    if op == "select_threshold":
        return ops.select_threshold(x.flatten(), x.numel() // 3)
    if op == "apply_mask_":
        ops.apply_mask_(x, x.abs() > 0.5)
        return (x,)
    if op == "apply_mask_.packed":
        ops.apply_mask_(x, ops.pack_mask(x.abs() > 0.5))
        return (x,)
    if op == "sparsify_24_pack":
        return ops.sparsify_24_pack(x.half())
    raise ValueError(op)


STREAM_OPS = ["block_norm_mask", "block_norm_mask.packed", "block_norm_mask.ranked", "block_norm_mask_apply_",
              "nm_mask", "select_threshold", "apply_mask_", "apply_mask_.packed", "sparsify_24_pack"]
SHAPE = (2048, 512)  # 256 Ki (1, 4) blocks: many CTAs / programs in every pass


def _expected(op: str, source: torch.Tensor) -> tuple:
    with sparsity_ext.use_backend("reference"):
        return _call(op, source.clone())


def _assert_same(got: tuple, want: tuple, what: str) -> None:
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{what}: output {i} differs"


@cuda_only
@pytest.mark.parametrize("op", STREAM_OPS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_ops_on_a_side_stream_follow_its_order(backend, op):
    """Called under torch.cuda.stream(side), an op must enqueue its kernels on `side`: its input is written
    there by a copy that waits behind a 20 ms sleep kernel, so kernels on any other stream read the NaN poison."""
    _require(backend, "cuda")
    source = _randn(SHAPE, seed=1)
    want = _expected(op, source)
    x = torch.full_like(source, float("nan"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), sparsity_ext.use_backend(backend):
        torch.cuda._sleep(40_000_000)  # about 20 ms of GPU clock cycles
        x.copy_(source)
        got = _call(op, x)
        got = tuple(t.clone() for t in got)  # consumed on the side stream too
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    _assert_same(got, want, f"{backend} {op} on a side stream")


@cuda_only
@pytest.mark.parametrize("op", STREAM_OPS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_ops_captured_in_a_cuda_graph_replay_on_new_data(backend, op):
    """Captured once (after a warm-up that compiles and autotunes), replayed on two new inputs copied into the
    captured buffer: each replay equals the reference on that input (no host sync or host-side value inside)."""
    _require(backend, "cuda")
    x = _randn(SHAPE, seed=2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), sparsity_ext.use_backend(backend):
        _call(op, x.clone())
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), sparsity_ext.use_backend(backend):
        captured = _call(op, x)
    for seed in (3, 4):
        source = _randn(SHAPE, seed=seed)
        x.copy_(source)
        graph.replay()
        torch.cuda.synchronize()
        _assert_same(captured, _expected(op, source), f"{backend} {op}, replay on seed {seed}")


# ---------------------------------------------------------------------------------------- two GPUs
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_ops_on_the_second_gpu_while_the_first_is_current(backend):
    _require(backend, "cuda")
    source = _randn(SHAPE, seed=5, device="cpu")
    for op in STREAM_OPS:
        with torch.cuda.device(0), sparsity_ext.use_backend(backend):
            got = _call(op, source.to("cuda:1"))
            assert torch.cuda.current_device() == 0
        assert all(t.device == torch.device("cuda:1") for t in got), op
        _assert_same(tuple(t.cpu() for t in got), _expected(op, source), f"{backend} {op} on cuda:1")


# ------------------------------------------------------------------------------------ headline sizes
TABLE_SHAPE = (16_000_000, 128)   # 2,048,000,000 fp32 elements (8.2 GB)
SQUARE_SHAPE = (16384, 16384)
VECTOR_NUMEL = 10 ** 8


@pytest.fixture
def backends_autotuned(monkeypatch):
    """Both GPU backends (skipped where one is missing), triton launching its autotuned configs."""
    for backend in GPU_BACKENDS:
        _require(backend, "cuda")
    from sparsity_ext.triton import kernels
    monkeypatch.setattr(kernels, "AUTOTUNE", True)
    yield GPU_BACKENDS
    torch.cuda.empty_cache()


@cuda_only
def test_headline_table_block_masks(backends_autotuned):
    """block_norm_mask (bool, packed) and block_norm_mask_apply_ on the 16M x 128 fp32 table, (1, 4) at 80 % L1,
    on each backend == the reference's selection (its block scores, k-th smallest and tie rule) expanded."""
    level, block = 0.8, (1, 4)
    x = _randn(TABLE_SHAPE, seed=6)
    scores = reference.block_scores(x, block, 1)
    k = reference.num_selected_blocks(level, scores.numel())
    threshold, ties = reference.select_threshold(scores, k)
    selected = reference.blocks_at_threshold(scores, float(threshold), int(ties))
    del scores
    assert int(selected.sum()) == k
    expected = ~reference.expand_block_flags(selected, TABLE_SHAPE, block)
    expected_packed = reference.pack_mask(expected)
    for backend in backends_autotuned:
        with sparsity_ext.use_backend(backend):
            assert torch.equal(ops.block_norm_mask(x, level, block, 4, 1), expected), backend
            assert torch.equal(ops.block_norm_mask(x, level, block, 4, 1, packed=True), expected_packed), backend
            zeroed = x.clone()
            packed = ops.block_norm_mask_apply_(zeroed, level, block, 4, 1, packed=True)
        assert torch.equal(packed, expected_packed), backend
        assert torch.equal(zeroed, x.masked_fill(~expected, 0)), backend
        del zeroed, packed


@cuda_only
def test_headline_apply_mask(backends_autotuned):
    x = _randn(TABLE_SHAPE, seed=7)
    keep = x.abs() > 0.5
    expected = x.masked_fill(~keep, 0)
    packed = reference.pack_mask(keep)
    for backend in backends_autotuned:
        for mask in (keep, packed):
            y = x.clone()
            with sparsity_ext.use_backend(backend):
                ops.apply_mask_(y, mask)
            assert torch.equal(y, expected), (backend, mask.dtype)
            del y


@cuda_only
@pytest.mark.parametrize("values", ["random", "ties"])
def test_headline_select_threshold(backends_autotuned, values):
    v = _randn(VECTOR_NUMEL, seed=8)
    if values == "ties":
        v = (v * 4).round()  # a few dozen distinct values: the k-th sits inside millions of equal ones
    k = int(VECTOR_NUMEL * 0.8)
    want_value, want_rank = reference.select_threshold(v, k)
    for backend in backends_autotuned:
        with sparsity_ext.use_backend(backend):
            value, rank = ops.select_threshold(v, k)
        assert torch.equal(value, want_value) and torch.equal(rank, want_rank), backend


@cuda_only
def test_headline_nm_mask_and_24_pack(backends_autotuned):
    """nm_mask 2:4 and sparsify_24_pack on the 16384^2 fp16 weight: the reference's mask, and torch's own
    CUTLASS-layout conversion of the pruned weight."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured
    w = _randn(SQUARE_SHAPE, seed=9, dtype=torch.float16)
    keep = reference.nm_mask(w, 2, 4)
    saved = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = True
    try:
        theirs = to_sparse_semi_structured(w.masked_fill(~keep, 0))
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = saved
    for backend in backends_autotuned:
        with sparsity_ext.use_backend(backend):
            assert torch.equal(ops.nm_mask(w, 2, 4), keep), backend
            values, meta = ops.sparsify_24_pack(w)
        assert torch.equal(values, theirs.packed) and torch.equal(meta, theirs.meta), backend


# --------------------------------------------------------------------------- the GPU run's own flow
def test_gpu_run_dry_run_reports_every_step(tmp_path):
    """scripts/gpu_run.sh with its GPU steps forced off: the compiler choice and the smoke test run, the GPU
    steps are reported as skipped with the reason, and OUT holds the summary and the packed logs (<= 8 files)."""
    out = tmp_path / "out"
    env = {**os.environ, "GPU_RUN_CPU": "1", "STEPS": "compiler smoke tests-gpu bench-ops", "PYTHON": sys.executable}
    run = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_run.sh"), str(out)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    lines = summary.splitlines()[3:] + [""]  # after the two header lines and the column names: a row per step
    rows = {line.split()[0]: line.split(None, 3)[1:] for line in lines[:lines.index("")]}
    assert rows["compiler"][0] == "ok" and rows["smoke"][0] == "ok", summary
    assert rows["tests-gpu"][:2] == ["skipped", "0"] and "GPU_RUN_CPU=1" in rows["tests-gpu"][2], summary
    assert rows["bench-ops"][0] == "skipped" and "build" not in rows, summary
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"summary.txt", "logs.tar.gz"} <= set(files), files
    assert summary.strip() in run.stdout  # printed last
