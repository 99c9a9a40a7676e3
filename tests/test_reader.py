"""The lazy reader on real torch.save / safetensors files: only the model's bytes are read, with ordinary reads,
values and strides intact, a content hash of the weights, and a clean error when the file changes underneath."""

from __future__ import annotations

import argparse
import os
import subprocess
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from ckptd.errors import CheckpointChangedError, WeightsNotFoundError
from ckptd.file_source import FileSource
from ckptd.reader import content_sha256, read_checkpoint
from ckptd.safetensors_io import open_safetensors, save_safetensors
from ckptd.weights import extract_weights, open_checkpoint
from tests.conftest import PYTHON, assert_same_state, subprocess_env


def _awkward_model() -> dict[str, torch.Tensor]:
    """Weights that make a copy of mapped bytes unavoidable: channels_last, bf16, views sharing one storage."""
    shared = torch.randn(4096)
    return {
        "conv.weight": torch.randn(64, 32, 3, 3).to(memory_format=torch.channels_last),
        "proj.weight": torch.randn(256, 128).bfloat16(),
        "a.weight": shared[:2048].view(32, 64),
        "b.weight": shared[1024:],
        "bn.num_batches_tracked": torch.tensor(7),
    }


def _training_state(model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None = None) -> dict:
    history = torch.linspace(0, 1, 5000)
    return {"model_state_dict": model, "ema_state_dict": ema or {k: v.clone() + 1 for k, v in model.items()},
            "optim_state_dict": {"state": {0: {"exp_avg": torch.randn(200_000)}}}, "iterations": 12,
            "epoch": 3, "best_metric": torch.tensor(0.5), "metric": history[-1]}  # a view into a large storage


def _nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def test_weights_match_torch_load_and_keep_strides(tmp_path: Path) -> None:
    model = _awkward_model()
    torch.save(_training_state(model), tmp_path / "t.pt")
    expected = torch.load(tmp_path / "t.pt", weights_only=True)["model_state_dict"]
    with read_checkpoint(tmp_path / "t.pt") as reader:
        assert reader.obj["optim_state_dict"]["state"][0]["exp_avg"].device.type == "meta"
        assert float(reader.obj["best_metric"]) == 0.5  # tiny tensors are real, for metric lookups
        assert float(reader.obj["metric"]) == 1.0  # also when they are a view into a large storage
        found = reader.weights()
    assert found.layout == "training-state" and found.key == "model_state_dict"
    assert_same_state(found.state, expected)
    for k, t in found.state.items():
        assert t.device.type == "cpu" and t.stride() == expected[k].stride(), k
    # tensors that shared a storage in the file share memory again (read once)
    assert found.state["a.weight"].untyped_storage().data_ptr() == found.state["b.weight"].untyped_storage().data_ptr()


def test_only_the_model_bytes_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _awkward_model()
    torch.save(_training_state(model), tmp_path / "t.pt")
    read: list[int] = []
    original = FileSource.read_into

    def counting(self: FileSource, buf: torch.Tensor, offset: int, what: str = "data") -> None:
        read.append(buf.numel())
        original(self, buf, offset, what)

    monkeypatch.setattr(FileSource, "read_into", counting)
    with read_checkpoint(tmp_path / "t.pt") as reader:
        before = sum(read)
        reader.weights()
        model_reads = sum(read) - before
    size = (tmp_path / "t.pt").stat().st_size
    assert size > 3 * _nbytes(model)  # the optimizer state dominates the file
    assert _nbytes(model) - 8 * 1024 <= model_reads <= _nbytes(model) + 1024
    assert sum(read) < _nbytes(model) + 16 * 1024


def test_model_and_ema_streams_from_one_open(tmp_path: Path) -> None:
    model = _awkward_model()
    ema = {k: v.clone() * 2 for k, v in model.items()}
    torch.save(_training_state(model, ema), tmp_path / "t.pt")
    with read_checkpoint(tmp_path / "t.pt") as reader:
        main, averaged = reader.weights(), reader.weights(prefer_ema=True)
        with pytest.raises(WeightsNotFoundError, match="nope"):
            reader.weights(key="nope")
    assert averaged.layout == "training-state-ema"
    assert_same_state(main.state, model)
    assert_same_state(averaged.state, ema)
    assert main.content_sha256 != averaged.content_sha256


def test_content_hash_is_the_same_for_the_same_weights_in_any_file(tmp_path: Path, tiny) -> None:
    sd = tiny(seed=1).state_dict()
    sd["conv.weight"] = sd["conv.weight"].contiguous(memory_format=torch.channels_last)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "arch": "tiny"}, tmp_path / "timm.pth")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_safetensors(tmp_path / "plain.safetensors", sd)
    hashes = {p: open_checkpoint(tmp_path / p).content_sha256 for p in ("timm.pth", "legacy.pt", "plain.safetensors")}
    assert len(set(hashes.values())) == 1, hashes
    assert hashes["plain.safetensors"] == content_sha256(sd)
    # what ckptd writes hashes the same when read back (the daemon can identify restored members)
    extract_weights(tmp_path / "timm.pth", tmp_path / "out.safetensors", hash_source=False)
    assert content_sha256(open_safetensors(tmp_path / "out.safetensors").tensors) == hashes["timm.pth"]
    # one changed value changes the hash
    sd["head.bias"] = sd["head.bias"] + 1
    assert content_sha256(sd) != hashes["plain.safetensors"]


@pytest.mark.parametrize("change", ["truncated", "rewritten_same_size", "replaced"])
def test_a_file_changed_while_open_raises_changed(tmp_path: Path, change: str) -> None:
    path = tmp_path / "last.ckpt"
    torch.save(_training_state(_awkward_model()), path)
    with read_checkpoint(path) as reader:
        if change == "truncated":  # Lightning's writer: open("wb") and write again
            with open(path, "r+b") as fh:
                fh.truncate(path.stat().st_size // 3)
        elif change == "rewritten_same_size":
            st = path.stat()
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        else:
            torch.save(_training_state(_awkward_model()), tmp_path / "new.ckpt")
            os.replace(tmp_path / "new.ckpt", path)
        with pytest.raises(CheckpointChangedError, match="changed while being read") as info:
            reader.weights()
        assert str(path) in str(info.value) and "retried" in str(info.value)
        with pytest.raises(CheckpointChangedError):
            reader.verify_unchanged()


def test_a_deleted_file_is_still_read_whole_through_the_held_descriptor(tmp_path: Path) -> None:
    model = _awkward_model()
    torch.save(_training_state(model), tmp_path / "t.pt")
    with read_checkpoint(tmp_path / "t.pt") as reader:
        (tmp_path / "t.pt").unlink()  # trainers delete files that fell out of their own top-k
        assert_same_state(reader.weights().state, model)


_REWRITE_WHILE_COPYING = textwrap.dedent("""
    import sys
    import torch
    from ckptd.weights import open_checkpoint

    path = sys.argv[1]
    ckpt = open_checkpoint(path)
    with open(path, "r+b") as fh:  # the trainer rewrites its file in place (truncate, then write again)
        fh.truncate(0)
    total = 0.0
    for t in ckpt.weights.values():  # copies every byte: channels_last -> contiguous, bf16 -> float
        total += float(t.contiguous().float().sum())
    print("survived", len(ckpt.weights))
""")


@pytest.mark.slow
def test_rewriting_a_file_in_place_while_its_weights_are_copied_does_not_kill_the_reader(tmp_path: Path) -> None:
    """Regression (issue 9, item 2): trainer files were memory-mapped; truncating one killed ckptd (SIGBUS)."""
    path = tmp_path / "checkpoint_last.pt"
    model = {**_awkward_model(), "big.weight": torch.randn(1024, 1024).bfloat16()}
    torch.save(_training_state(model), path)
    proc = subprocess.run([PYTHON, "-c", _REWRITE_WHILE_COPYING, str(path)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode not in (-7, 135), "the reader died with SIGBUS"
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "survived 6" in proc.stdout


def _swap_to_big_endian(src: Path, dst: Path, itemsizes: dict[str, int]) -> None:
    """Rewrite a torch.save zip as a big-endian machine would have written it (byteorder record 'big')."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            key = info.filename.rsplit("/", 1)[-1]
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename and itemsizes.get(key, 1) > 1:
                n = itemsizes[key]
                data = b"".join(data[i:i + n][::-1] for i in range(0, len(data), n))
            zout.writestr(info.filename, data)


def test_big_endian_files_are_swapped(tmp_path: Path) -> None:
    sd = {"w": torch.randn(300), "h": torch.randn(600).half(), "i": torch.arange(200), "u": torch.arange(256).byte()}
    torch.save(sd, tmp_path / "le.pt")
    _swap_to_big_endian(tmp_path / "le.pt", tmp_path / "be.pt", {"0": 4, "1": 2, "2": 8, "3": 1})
    assert_same_state(torch.load(tmp_path / "be.pt", weights_only=True), sd)  # torch agrees the file is right
    assert_same_state(open_checkpoint(tmp_path / "be.pt").weights, sd)


def test_timm_checkpoint_with_namespace_args_loads_by_default(tmp_path: Path, tiny) -> None:
    """Regression (issue 10): timm stores ``args`` as an argparse.Namespace; it was refused by default."""
    sd, ema = tiny(seed=1).state_dict(), tiny(seed=2).state_dict()
    torch.save({"epoch": 3, "arch": "tiny", "state_dict": sd, "state_dict_ema": ema, "metric": 0.5,
                "optimizer": {"state": {}}, "args": argparse.Namespace(lr=0.1, model="tiny", amp=True)},
               tmp_path / "checkpoint-3.pth.tar")
    ckpt = open_checkpoint(tmp_path / "checkpoint-3.pth.tar")
    assert ckpt.layout == "timm" and ckpt.obj["args"].lr == 0.1 and ckpt.obj["metric"] == 0.5
    assert_same_state(ckpt.weights, sd)
    assert_same_state(open_checkpoint(tmp_path / "checkpoint-3.pth.tar", prefer_ema=True).weights, ema)


def test_tensors_that_need_torchs_own_loader_still_load(tmp_path: Path) -> None:
    """Sparse tensors are safe but outside the lazy reader: the whole file goes through torch's weights-only
    loader (ordinary reads), so nothing a plain torch.load(weights_only=True) reads is lost."""
    sparse = torch.randn(4, 4).to_sparse()
    torch.save({"state_dict": {"w": torch.ones(3)}, "mask": sparse, "arch": "x"}, tmp_path / "s.pt")
    ckpt = open_checkpoint(tmp_path / "s.pt")
    assert torch.equal(ckpt.weights["w"], torch.ones(3))
    assert torch.equal(ckpt.obj["mask"].to_dense(), sparse.to_dense())


def test_streamed_weights_read_only_the_chunk_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What averaging needs to hold one chunk per input instead of k models: placeholders for the shape checks,
    then row-major chunks read straight from the file."""
    model = _awkward_model()
    torch.save(_training_state(model), tmp_path / "t.pt")
    read: list[int] = []
    original = FileSource.read_into

    def counting(self: FileSource, buf: torch.Tensor, offset: int, what: str = "data") -> None:
        read.append(buf.numel())
        original(self, buf, offset, what)

    with read_checkpoint(tmp_path / "t.pt") as reader:
        streamed = reader.stream_weights()
        assert streamed.layout == "training-state" and set(streamed) == set(model)
        assert streamed["proj.weight"].device.type == "meta" and streamed["proj.weight"].dtype == torch.bfloat16
        monkeypatch.setattr(FileSource, "read_into", counting)
        chunk = streamed.read_flat("proj.weight", 1000, 1100)
        assert read == [100 * 2] and torch.equal(chunk, model["proj.weight"].reshape(-1)[1000:1100])
        for name, t in model.items():  # strided and shared-storage tensors too
            flat = t.reshape(-1)
            pieces = [streamed.read_flat(name, i, min(i + 777, flat.numel())) for i in range(0, flat.numel(), 777)]
            assert torch.equal(torch.cat(pieces) if pieces else flat, flat), name
        reader.verify_unchanged()


def test_streamed_weights_of_a_dcp_folder(tmp_path: Path, tiny) -> None:
    import torch.distributed.checkpoint as dcp

    sd = tiny(seed=3, width=32).state_dict()
    dcp.save({"model": dict(sd), "step": 1}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    with read_checkpoint(tmp_path / "dcp") as reader:
        streamed = reader.stream_weights()
        flat = sd["conv.weight"].reshape(-1)
        assert torch.equal(torch.cat([streamed.read_flat("conv.weight", i, min(i + 100, flat.numel()))
                                      for i in range(0, flat.numel(), 100)]), flat)
