"""Our streaming safetensors writer/reader against the official safetensors package."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckptd.atomic import atomic_open
from ckptd.safetensors_io import SafetensorsStreamWriter, TensorSpec, open_safetensors, save_safetensors


def _mixed() -> dict[str, torch.Tensor]:
    return {
        "f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 2).bfloat16(),
        "i64": torch.arange(4), "scalar": torch.tensor(3.5), "flag": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4), "i8": torch.tensor([-1, 2], dtype=torch.int8),
    }


def test_written_file_reads_back_with_official_library(tmp_path: Path) -> None:
    tensors = _mixed()
    save_safetensors(tmp_path / "x.safetensors", tensors, {"source": "/a/b.pt", "metric": "0.5"})
    back = load_file(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(tmp_path / "x.safetensors", "pt") as fh:
        assert fh.metadata() == {"source": "/a/b.pt", "metric": "0.5"}


def test_reader_maps_official_files(tmp_path: Path) -> None:
    tensors = {k: v for k, v in _mixed().items() if k != "empty"}
    save_file(tensors, tmp_path / "o.safetensors", metadata={"a": "b"})
    mapped = open_safetensors(tmp_path / "o.safetensors")
    assert mapped.metadata == {"a": "b"}
    for k, v in tensors.items():
        assert torch.equal(mapped.tensors[k], v), k


def test_chunked_stream_and_order_checks(tmp_path: Path) -> None:
    big = torch.randn(1000)
    specs = [TensorSpec("a", torch.float32, (1000,)), TensorSpec("b", torch.int64, (2,))]
    with atomic_open(tmp_path / "c.safetensors") as fh:
        w = SafetensorsStreamWriter(fh, specs)
        for i in range(0, 1000, 300):
            w.write("a", big[i:i + 300])
        w.write("b", torch.tensor([1, 2]))
        w.close()
    back = load_file(tmp_path / "c.safetensors")
    assert torch.equal(back["a"], big)
    with pytest.raises(ValueError, match="out of order"), atomic_open(tmp_path / "d.safetensors") as fh:
        SafetensorsStreamWriter(fh, specs).write("b", torch.tensor([1, 2]))
    assert not (tmp_path / "d.safetensors").exists(), "a failed write must not publish a file"
    assert not list(tmp_path.glob(".ckptd-tmp-*")), "a failed write must not leave its temp file"
