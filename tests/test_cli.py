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


# ------------------------------------------------------------------------------ formats and round trips
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from sparsity_ext import load_checkpoint  # noqa: E402


def _flat_state_dict():
    sd = _state_dict()
    sd["emb_h.weight"] = tie_free((64, 32), seed=6).half()
    return sd


def _sparsified(sd, names):
    """The dense result `sparsify` must give: DataNormSparsifier on copies of `names`, the rest untouched."""
    return {name: (_expected(t) if name in names else t) for name, t in sd.items()}


SPARSIFIED = ("emb_a.weight", "emb_b.weight", "emb_h.weight")  # the default: >= 2-D tensors matching 'emb'


def _assert_state_dicts_equal(result, expected):
    assert set(result) == set(expected)
    for name in expected:
        assert _same_bytes(result[name], expected[name]), name


@pytest.mark.parametrize("in_name,out_name", [("model.pt", "out.pt"), ("model.safetensors", "out.safetensors"),
                                              ("model.pt", "out.safetensors"), ("model.safetensors", "out.pth")])
def test_dense_round_trips(tmp_path, capsys, in_name, out_name):
    sd = _flat_state_dict()
    source, out_path = tmp_path / in_name, tmp_path / out_name
    if in_name.endswith(".safetensors"):
        save_file(sd, source, metadata={"origin": "test"})
    else:
        torch.save(sd, source)
    before = _digest(source)
    status, out, _ = _run(["sparsify", source, "-o", out_path], capsys)
    assert status == 0 and _digest(source) == before
    assert "4 matched, 3 sparsified, 1 skipped" in out and "skipped emb_bias: 1-D" in out
    result = load_file(out_path) if out_name.endswith(".safetensors") else torch.load(out_path)
    _assert_state_dicts_equal(result, _sparsified(sd, SPARSIFIED))
    if out_name.endswith(".safetensors"):  # the content agrees with the name, metadata kept where there was some
        with safe_open(str(out_path), framework="pt") as handle:
            assert handle.metadata() == ({"origin": "test"} if in_name.endswith(".safetensors") else {})
    if out_name == "out.pth":
        assert "metadata (origin) has no place in a .pt file" in out


def test_pt_to_packed_to_unpack(tmp_path, capsys):
    sd = _flat_state_dict()
    source = tmp_path / "model.pt"
    torch.save(sd, source)
    dense_out, packed_out = tmp_path / "dense.pt", tmp_path / "model.sparse.safetensors"
    assert _run(["sparsify", source, "-o", dense_out], capsys)[0] == 0
    status, out, _ = _run(["sparsify", source, "-o", packed_out], capsys)  # packed: by the name
    assert status == 0 and "packed MB" in out
    assert f"wrote {packed_out}: " in out and f"input {source}: " in out and "% of the input" in out
    dense = torch.load(dense_out)
    _assert_state_dicts_equal(load_checkpoint(packed_out), dense)
    with safe_open(str(packed_out), framework="pt") as handle:  # any safetensors reader opens it
        assert "emb_a.weight::values" in handle.keys() and "mlp.weight" in handle.keys()
        _assert_state_dicts_equal({"mlp.weight": handle.get_tensor("mlp.weight")}, {"mlp.weight": sd["mlp.weight"]})
    for unpacked_name, load in (("unpacked.safetensors", load_file), ("unpacked.pt", torch.load)):
        unpacked = tmp_path / unpacked_name
        status, out, _ = _run(["unpack", packed_out, "-o", unpacked], capsys)
        assert status == 0 and f"wrote {unpacked}" in out
        _assert_state_dicts_equal(load(unpacked), dense)


def test_default_output_of_a_safetensors_checkpoint_is_packed(tmp_path, capsys):
    source = tmp_path / "model.safetensors"
    save_file(_flat_state_dict(), source, metadata={"origin": "test"})
    assert _run(["sparsify", source], capsys)[0] == 0
    packed = tmp_path / "model.sparse.safetensors"
    with safe_open(str(packed), framework="pt") as handle:
        assert handle.metadata()["origin"] == "test" and "sparsity_ext.packed" in handle.metadata()
    _assert_state_dicts_equal(load_checkpoint(packed), _sparsified(_flat_state_dict(), SPARSIFIED))
    dense = tmp_path / "dense.sparse.safetensors"  # --format dense: a plain safetensors file despite the name
    assert _run(["sparsify", source, "-o", dense, "--format", "dense"], capsys)[0] == 0
    _assert_state_dicts_equal(load_file(dense), _sparsified(_flat_state_dict(), SPARSIFIED))


def test_packed_sizes(tmp_path, capsys):
    """fp32 at 80 % (1x4 blocks): <= 25 % of the dense bytes. fp16 2:4: the values and the 1-bit mask come to
    56.25 %; the sign bits of the zeroed elements (needed to restore torch.ao's -0.0 bit for bit) add 1 bit
    per zeroed element, 3.125 %."""
    fp32 = tmp_path / "fp32.pt"
    torch.save({"emb.weight": tie_free((4096, 64), seed=11)}, fp32)
    assert _run(["sparsify", fp32, "-o", tmp_path / "fp32.sparse.safetensors"], capsys)[0] == 0
    assert (tmp_path / "fp32.sparse.safetensors").stat().st_size <= 0.25 * 4096 * 64 * 4
    fp16 = tmp_path / "fp16.pt"
    torch.save({"emb.weight": tie_free((1024, 128), seed=12).half()}, fp16)
    packed16 = tmp_path / "fp16.sparse.safetensors"
    status, out, _ = _run(["sparsify", fp16, "-o", packed16, "--level", "1", "--zeros-per-block", "2"], capsys)
    assert status == 0
    dense_bytes = 1024 * 128 * 2
    with safe_open(str(packed16), framework="pt") as handle:
        values_and_mask = sum(handle.get_tensor(f"emb.weight::{part}").numel() * (2 if part == "values" else 1)
                              for part in ("values", "mask"))
    assert values_and_mask <= 0.57 * dense_bytes
    assert packed16.stat().st_size <= 0.60 * dense_bytes


def test_torchrec_and_hf_names(tmp_path, capsys):
    """The default pattern takes the tables of unsharded TorchRec and HF checkpoints and leaves norms alone."""
    sd = {"sparse_arch.embedding_bag_collection.embedding_bags.t_user.weight": tie_free((40, 8), seed=1),
          "sparse_arch.embedding_collection.embeddings.t_item.weight": tie_free((30, 8), seed=2),
          "bert.embeddings.word_embeddings.weight": tie_free((50, 16), seed=3),
          "bert.embeddings.LayerNorm.weight": torch.ones(16), "bert.embeddings.LayerNorm.bias": torch.zeros(16),
          "bert.embeddings.emb_steps": torch.tensor(7.0), "dense_arch.fc.weight": tie_free((8, 8), seed=4)}
    source, out_path = tmp_path / "model.safetensors", tmp_path / "out.safetensors"
    save_file(sd, source)
    status, out, _ = _run(["sparsify", source, "-o", out_path], capsys)
    assert status == 0 and "6 matched, 3 sparsified, 3 skipped" in out
    assert "skipped bert.embeddings.LayerNorm.weight: 1-D" in out and "skipped bert.embeddings.emb_steps: 0-d" in out
    tables = [name for name in sd if name.endswith(("t_user.weight", "t_item.weight", "word_embeddings.weight"))]
    _assert_state_dicts_equal(load_file(out_path), _sparsified(sd, tables))
    status, out, _ = _run(["sparsify", source, "-o", out_path, "--overwrite", "--include-1d"], capsys)
    assert status == 0 and "6 matched, 5 sparsified, 1 skipped" in out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compare_half_precision_on_fp32_copies(tmp_path, capsys, dtype):
    source = tmp_path / "model.pt"
    torch.save({"emb.weight": tie_free((256, 32), seed=3).to(dtype)}, source)
    status, out, _ = _run(["sparsify", source, "--compare", "-o", tmp_path / "out.pt"], capsys)
    assert status == 0
    assert "torch.ao.pruning in the input dtype" in out and "ran on fp32 copies" in out
    assert all(" yes " in line for line in out.splitlines() if line.startswith(("emb.weight", "total")))


def test_non_tensor_entries_need_a_pt_output(tmp_path, capsys):
    source = tmp_path / "ckpt.pt"
    torch.save({"model": _state_dict(), "epoch": 3}, source)
    status, _, err = _run(["sparsify", source, "-o", tmp_path / "out.safetensors"], capsys)
    assert status == 2 and "not tensors (epoch)" in err and ".pt" in err
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("argv,message", [
    (["-o", "out.ckpt"], "unknown output extension '.ckpt'"),
    (["-o", "out"], "unknown output extension '(none)'"),
    (["-o", "out.pt", "--format", "packed"], "--format packed writes a safetensors file"),
])
def test_bad_output_names(checkpoint, tmp_path, capsys, argv, message):
    before = _digest(checkpoint)
    argv = [str(tmp_path / a) if a.startswith("out") else a for a in argv]
    status, _, err = _run(["sparsify", checkpoint, *argv], capsys)
    assert status == 2 and message in err and _digest(checkpoint) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_truncated_safetensors_input(tmp_path, capsys):
    source = tmp_path / "model.safetensors"
    save_file(_flat_state_dict(), source)
    source.write_bytes(source.read_bytes()[:-100])
    before = _digest(source)
    status, _, err = _run(["sparsify", source], capsys)
    assert status == 2 and "truncated safetensors file" in err and _digest(source) == before
    assert not (tmp_path / "model.sparse.safetensors").exists()


def test_unpack_needs_a_packed_file(checkpoint, tmp_path, capsys):
    status, _, err = _run(["unpack", checkpoint, "-o", tmp_path / "out.safetensors"], capsys)
    assert status == 2 and "is not a packed sparse file (it is a torch.save file)" in err


def _fail_at_fsync(fd):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("out_name", ["out.pt", "out.safetensors", "out.sparse.safetensors"])
def test_disk_full_at_fsync(checkpoint, tmp_path, capsys, monkeypatch, out_name):
    """A full disk often shows only at fsync (delayed allocation): every format leaves nothing behind."""
    before = _digest(checkpoint)
    monkeypatch.setattr(os, "fsync", _fail_at_fsync)
    status, _, err = _run(["sparsify", checkpoint, "-o", tmp_path / out_name], capsys)
    assert status == 1 and "the disk is full" in err and "nothing was written" in err
    assert _digest(checkpoint) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_interrupt_while_streaming_a_safetensors_output(checkpoint, tmp_path, capsys, monkeypatch):
    existing = tmp_path / "out.sparse.safetensors"
    existing.write_bytes(b"previous output")
    before = _digest(checkpoint)
    real = cli._sparsify_tensor
    calls = []

    def interrupted_on_second_tensor(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(cli, "_sparsify_tensor", interrupted_on_second_tensor)
    status, _, err = _run(["sparsify", checkpoint, "-o", existing, "--overwrite"], capsys)
    assert status == 130 and "interrupted" in err and len(calls) == 2
    assert _digest(checkpoint) == before and existing.read_bytes() == b"previous output"
    assert not _leftovers(tmp_path)
