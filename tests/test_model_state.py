"""Loading and copying weights with readable reports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ckptd.errors import WeightsMismatchError
from ckptd.model_state import copy_weights, load_model_weights, model_state_dict, unwrap_model
from tests.conftest import assert_same_state


def test_unwrap_and_state_dict_through_wrappers(tiny) -> None:
    model = tiny()
    for wrapped in (nn.DataParallel(model), torch.compile(model), torch.optim.swa_utils.AveragedModel(model),
                    torch.compile(nn.DataParallel(model))):
        inner = unwrap_model(wrapped)
        assert isinstance(inner, type(model))
        assert set(model_state_dict(wrapped)) == set(model.state_dict())


def test_strict_load_reports_every_problem(tiny) -> None:
    weights = tiny(width=8).state_dict()
    weights["stale.weight"] = torch.zeros(1)
    del weights["head.bias"]
    with pytest.raises(WeightsMismatchError) as info:
        load_model_weights(tiny(width=4), weights)
    text = str(info.value)
    assert "missing in checkpoint (1): head.bias" in text
    assert "unexpected in checkpoint (1): stale.weight" in text
    assert "conv.weight model [4, 3, 3, 3] vs checkpoint [8, 3, 3, 3]" in text


def test_non_strict_loads_what_matches(tiny) -> None:
    src = tiny(seed=1, width=8)
    dst = tiny(seed=2, width=8)
    weights = src.state_dict()
    weights["head.weight"] = torch.zeros(5, 5)
    report = load_model_weights(dst, weights, strict=False)
    assert report.mismatched and not report.missing
    assert torch.equal(dst.conv.weight, src.conv.weight)
    assert not torch.equal(dst.head.weight, torch.zeros(5, 5))


def test_copy_weights_and_load_from_path(tmp_path: Path, tiny) -> None:
    a, b = tiny(seed=1), nn.DataParallel(tiny(seed=2))
    report = copy_weights(torch.compile(a), b)
    assert report.ok and "matched" in report.describe()
    assert_same_state(b.module.state_dict(), a.state_dict())
    torch.save({"state_dict": {f"model.{k}": v for k, v in a.state_dict().items()},
                "pytorch-lightning_version": "2.4"}, tmp_path / "l.ckpt")
    c = tiny(seed=3)
    load_model_weights(c, tmp_path / "l.ckpt")
    assert_same_state(c.state_dict(), a.state_dict())


def test_distributed_data_parallel_is_seen_through(tmp_path: Path, tiny) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = tiny(seed=1)
        ddp = nn.parallel.DistributedDataParallel(model)
        assert unwrap_model(ddp) is model
        state = model_state_dict(ddp)
        assert not any(k.startswith("module.") for k in state)
        target = nn.parallel.DistributedDataParallel(tiny(seed=2))
        copy_weights(ddp, target)
        assert_same_state(target.module.state_dict(), model.state_dict())
        # and a raw DDP state dict (module. prefix) saved by a trainer loads through the prefix stripping
        torch.save(ddp.state_dict(), tmp_path / "ddp.pt")
        fresh = tiny(seed=3)
        load_model_weights(fresh, tmp_path / "ddp.pt")
        assert_same_state(fresh.state_dict(), model.state_dict())
    finally:
        dist.destroy_process_group()
