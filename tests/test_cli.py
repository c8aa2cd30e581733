"""`sparsity-ext sparsify`: results, the generated demo, atomic writes, and every bad input."""
import errno
import hashlib
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import tie_free
from sparsity_ext import cli
from sparsity_ext.data_sparsifier import DataNormSparsifier

torch_ao = pytest.importorskip("torch.ao.pruning._experimental.data_sparsifier")


def _state_dict():
    return {
        "emb_a.weight": tie_free((300, 16), seed=1),
        "emb_b.weight": tie_free((97, 10), seed=2),
        "emb_bias": tie_free((37,), seed=3),
        "mlp.weight": tie_free((8, 8), seed=4),
        "mlp.num_batches_tracked": torch.tensor(5),
    }


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(_state_dict(), path)
    return path


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(directory):
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def _expected(tensor, level=0.8, block=(1, 4), zeros=None, norm="L1"):
    """DataNormSparsifier's result on a copy."""
    data = tensor.clone()
    sparsifier = DataNormSparsifier(sparsity_level=level, sparse_block_shape=block,
                                    zeros_per_block=zeros if zeros is not None else block[0] * block[1], norm=norm)
    sparsifier.add_data("t", data)
    sparsifier.step()
    sparsifier.squash_mask()
    return data


def _same_bytes(a, b):
    """Equal bit for bit: torch.equal calls -0.0 and 0.0 equal."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def _run(argv, capsys):
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


# ------------------------------------------------------------------------------------------ results
def test_sparsify_checkpoint(checkpoint, tmp_path, capsys):
    before = _digest(checkpoint)
    out_path = tmp_path / "out.pt"
    status, out, _ = _run(["sparsify", checkpoint, "--tensors", r"^emb", "--level", "0.5", "--block", "2x2",
                           "--norm", "L2", "--zeros-per-block", "3", "--include-1d", "-o", out_path], capsys)
    assert status == 0
    assert _digest(checkpoint) == before  # the input is never modified
    result, original = torch.load(out_path), _state_dict()
    assert set(result) == set(original)
    for name in ("emb_a.weight", "emb_b.weight", "emb_bias"):
        assert _same_bytes(result[name], _expected(original[name], 0.5, (2, 2), 3, "L2")), name
        assert name in out
    assert torch.equal(result["mlp.weight"], original["mlp.weight"])  # not matched: untouched
    assert torch.equal(result["mlp.num_batches_tracked"], original["mlp.num_batches_tracked"])
    assert "300x16" in out and "dense MB" in out and "stored MB" in out and f"wrote {out_path}" in out
    assert "3 matched, 3 sparsified, 0 skipped" in out
    assert not _leftovers(tmp_path)


def test_same_result_as_torch_ao(checkpoint, tmp_path, capsys):
    out_path = tmp_path / "out.pt"
    status, out, _ = _run(["sparsify", checkpoint, "--tensors", r"emb_.\.weight", "--compare", "-o", out_path], capsys)
    assert status == 0
    result, original = torch.load(out_path), _state_dict()
    for name in ("emb_a.weight", "emb_b.weight"):
        sparsifier = torch_ao.DataNormSparsifier(sparsity_level=0.8, sparse_block_shape=(1, 4))
        theirs = original[name].clone()
        sparsifier.add_data("t", theirs)
        sparsifier.step()
        sparsifier.squash_mask()
        assert _same_bytes(result[name], theirs)
        assert torch.signbit(result[name][result[name] == 0]).any()  # torch.ao's zeroed negatives are -0.0
    table_rows = [line for line in out.splitlines() if line.startswith(("emb_a", "emb_b", "total"))]
    assert len(table_rows) == 3 and all(" yes " in line for line in table_rows)
    sparsity = float(table_rows[0].split()[3])
    assert sparsity == pytest.approx(0.8, abs=1e-3)


def test_chunked_run_writes_the_same_file(checkpoint, tmp_path, capsys):
    big = {"emb.weight": tie_free((5000, 64), seed=9)}  # 1.28 MB: two chunks of at most 1 MB
    torch.save(big, checkpoint)
    one, chunked = tmp_path / "one.pt", tmp_path / "chunked.pt"
    assert _run(["sparsify", checkpoint, "-o", one, "--level", "0.6"], capsys)[0] == 0
    assert _run(["sparsify", checkpoint, "-o", chunked, "--level", "0.6", "--max-chunk-mb", "1"], capsys)[0] == 0
    assert torch.equal(torch.load(one)["emb.weight"], torch.load(chunked)["emb.weight"])


def test_default_output_name_and_overwrite(checkpoint, tmp_path, capsys):
    status, out, _ = _run(["sparsify", checkpoint], capsys)
    default_out = tmp_path / "model.sparse.pt"
    assert status == 0 and default_out.exists()
    status, _, err = _run(["sparsify", checkpoint], capsys)  # exists now
    assert status == 2 and "exists" in err and "--overwrite" in err
    assert _run(["sparsify", checkpoint, "--overwrite", "--level", "0.5"], capsys)[0] == 0
    assert (torch.load(default_out)["emb_a.weight"] == 0).float().mean().item() == pytest.approx(0.5)


def test_overwriting_the_input_needs_overwrite(checkpoint, tmp_path, capsys):
    before = _digest(checkpoint)
    status, _, err = _run(["sparsify", checkpoint, "-o", checkpoint], capsys)
    assert status == 2 and "is the input" in err and _digest(checkpoint) == before
    mode = 0o640
    os.chmod(checkpoint, mode)
    assert _run(["sparsify", checkpoint, "-o", checkpoint, "--overwrite"], capsys)[0] == 0
    assert torch.equal(torch.load(checkpoint)["emb_a.weight"], _expected(_state_dict()["emb_a.weight"]))
    assert os.stat(checkpoint).st_mode & 0o777 == mode  # the replaced file keeps its permissions
    assert not _leftovers(tmp_path)


def test_whole_model_needs_allow_pickle(tmp_path, capsys):
    model = nn.Sequential(nn.EmbeddingBag(200, 8), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight.copy_(tie_free((200, 8)))
    path, out_path = tmp_path / "model.pt", tmp_path / "out.pt"
    torch.save(model, path)
    status, _, err = _run(["sparsify", path, "--tensors", r"^0\.", "-o", out_path], capsys)
    assert status == 2 and "--allow-pickle" in err and not out_path.exists()
    status, out, _ = _run(["sparsify", path, "--tensors", r"^0\.", "-o", out_path, "--allow-pickle"], capsys)
    assert status == 0
    loaded = torch.load(out_path, weights_only=False)
    assert isinstance(loaded, nn.Sequential)
    assert torch.equal(loaded[0].weight.detach(), _expected(model[0].weight.detach()))
    assert torch.equal(loaded[1].weight, model[1].weight)


def test_nested_checkpoint(tmp_path, capsys):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": _state_dict(), "epoch": 3, "optimizer": {"lr": 0.1}}, path)
    out_path = tmp_path / "out.pt"
    status, out, _ = _run(["sparsify", path, "--tensors", r"model\.emb_a", "-o", out_path], capsys)
    assert status == 0 and "model.emb_a.weight" in out
    result = torch.load(out_path)
    assert result["epoch"] == 3 and result["optimizer"] == {"lr": 0.1}
    assert torch.equal(result["model"]["emb_a.weight"], _expected(_state_dict()["emb_a.weight"]))


def test_generated_demo(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "DEMO_TABLE_ROWS", (4000, 1500, 300))
    out_path = tmp_path / "demo.pt"
    status, out, err = _run(["sparsify", "-o", out_path], capsys)
    assert status == 0
    assert "generated DLRM-like model: 3 embedding tables, 5,800 rows" in err
    assert "100%|" in err and "/s]" in err  # tqdm's byte bar reached the end
    rows = [line for line in out.splitlines() if line.startswith(("emb_l.", "total"))]
    assert len(rows) == 4 and all(" yes " in line for line in rows)  # same result as torch.ao.pruning
    assert "torch.ao s" in out and "speedup" in out
    saved = torch.load(out_path, weights_only=False)
    assert (saved.emb_l[0].weight == 0).float().mean().item() == pytest.approx(0.8)
    monkeypatch.setattr(cli, "DEMO_TABLE_ROWS", (100,))
    status, out, _ = _run(["sparsify", "--no-compare"], capsys)  # nothing written without -o
    assert status == 0 and "torch.ao s" not in out and not any(tmp_path.glob("*.sparse*"))


def test_console_entry_point(checkpoint, tmp_path):
    out_path = tmp_path / "out.pt"
    done = subprocess.run([sys.executable, "-m", "sparsity_ext.cli", "sparsify", str(checkpoint), "-o", str(out_path),
                           "--tensors", "emb_b"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "emb_b.weight" in done.stdout and out_path.exists()


# ---------------------------------------------------------------------------------------- bad input
def test_missing_checkpoint(tmp_path, capsys):
    status, _, err = _run(["sparsify", tmp_path / "nope.pt"], capsys)
    assert status == 2 and "does not exist" in err
    status, _, err = _run(["sparsify", tmp_path], capsys)
    assert status == 2 and "not a file" in err


@pytest.mark.parametrize("content,message", [
    (b"", "is not a checkpoint"),
    (b"hello, not a checkpoint\n", "is not a checkpoint"),
    (bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)),
     "is not a checkpoint"),
    (b"PK\x03\x04truncated zip", "damaged or truncated torch.save file"),
])
def test_not_a_checkpoint(tmp_path, capsys, content, message):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    status, _, err = _run(["sparsify", path], capsys)
    assert status == 2 and message in err and "pickled" not in err
    assert path.read_bytes() == content and not (tmp_path / "garbage.sparse.pt").exists()


def test_not_a_state_dict(tmp_path, capsys):
    path = tmp_path / "list.pt"
    torch.save([torch.randn(3, 3)], path)
    status, _, err = _run(["sparsify", path], capsys)
    assert status == 2 and "not a state_dict or a model" in err


def test_regex_matching_nothing(checkpoint, capsys):
    before = _digest(checkpoint)
    status, _, err = _run(["sparsify", checkpoint, "--tensors", "decoder"], capsys)
    assert status == 2 and "matches no tensor" in err and "emb_a.weight" in err
    assert _digest(checkpoint) == before


def test_unsupported_tensors_are_skipped_and_listed(checkpoint, tmp_path, capsys):
    status, out, _ = _run(["sparsify", checkpoint, "--tensors", "mlp", "-o", tmp_path / "out.pt"], capsys)
    assert status == 0 and "2 matched, 1 sparsified, 1 skipped" in out
    assert "skipped mlp.num_batches_tracked: dtype int64 (not a float tensor)" in out
    torch.save({"conv.weight": torch.randn(4, 3, 3, 3), "emb_bias": torch.randn(8)}, checkpoint)
    status, _, err = _run(["sparsify", checkpoint, "--tensors", "conv|emb"], capsys)  # nothing left to sparsify
    assert status == 2 and "nothing to sparsify" in err and "conv.weight: 4-D" in err and "emb_bias: 1-D" in err
    assert not (tmp_path / "model.sparse.pt").exists()


@pytest.mark.parametrize("argv,message", [
    (["--level", "1.5"], "must be in [0, 1]"),
    (["--level", "nan"], "must be in [0, 1]"),
    (["--block", "0x4"], "ROWSxCOLS"),
    (["--block", "4"], "ROWSxCOLS"),
    (["--tensors", "emb("], "invalid regular expression"),
    (["--norm", "L3"], "invalid choice"),
    (["--max-chunk-mb", "0"], "positive integer"),
])
def test_bad_arguments(checkpoint, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(["sparsify", str(checkpoint), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bad_zeros_per_block_device_and_output_dir(checkpoint, tmp_path, capsys):
    status, _, err = _run(["sparsify", checkpoint, "--block", "1x4", "--zeros-per-block", "5"], capsys)
    assert status == 2 and "--zeros-per-block must be in [0, 4]" in err
    if not torch.cuda.is_available():
        status, _, err = _run(["sparsify", checkpoint, "--device", "cuda"], capsys)
        assert status == 2 and "no CUDA device" in err
    status, _, err = _run(["sparsify", checkpoint, "-o", tmp_path / "no" / "such" / "dir.pt"], capsys)
    assert status == 2 and "does not exist" in err


def _partial_save_then(exception):
    """A torch.save that writes part of the file, then fails like a full disk or a Ctrl-C."""
    def save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise exception
    return save


@pytest.mark.parametrize("overwrite_input", [False, True])
def test_disk_full_leaves_everything_as_it_was(checkpoint, tmp_path, capsys, monkeypatch, overwrite_input):
    before = _digest(checkpoint)
    out_path = checkpoint if overwrite_input else tmp_path / "out.pt"
    monkeypatch.setattr(torch, "save", _partial_save_then(OSError(errno.ENOSPC, "No space left on device")))
    argv = ["sparsify", checkpoint, "-o", out_path] + (["--overwrite"] if overwrite_input else [])
    status, _, err = _run(argv, capsys)
    assert status == 1 and "the disk is full" in err and "nothing was written" in err
    assert _digest(checkpoint) == before
    assert out_path == checkpoint or not out_path.exists()
    assert not _leftovers(tmp_path)


def test_interrupted_write_leaves_everything_as_it_was(checkpoint, tmp_path, capsys, monkeypatch):
    existing = tmp_path / "out.pt"
    existing.write_bytes(b"previous output")
    before = _digest(checkpoint)
    monkeypatch.setattr(torch, "save", _partial_save_then(KeyboardInterrupt()))
    status, _, err = _run(["sparsify", checkpoint, "-o", existing, "--overwrite"], capsys)
    assert status == 130 and "interrupted" in err
    assert _digest(checkpoint) == before and existing.read_bytes() == b"previous output"
    assert not _leftovers(tmp_path)


def test_info_still_works(capsys):
    assert cli.main(["info"]) == 0
    assert "block_norm_mask" in capsys.readouterr().out
