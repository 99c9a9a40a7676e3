"""Shared fixtures: tiny real models and real checkpoints written with torch.save / safetensors / DCP."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from ckptd.examples import TinyConvNet

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny() -> Callable[..., TinyConvNet]:
    def make(seed: int | None = None, **kw: int) -> TinyConvNet:
        if seed is not None:
            torch.manual_seed(seed)
        model = TinyConvNet(**kw)
        with torch.no_grad():  # make BN buffers non-trivial
            model.bn.running_mean.uniform_(-1, 1)
            model.bn.running_var.uniform_(0.5, 2)
            model.bn.num_batches_tracked.fill_(seed or 0)
        return model

    return make


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


PYTHON = sys.executable


def train_a_bit(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    for _ in range(steps):
        x = torch.randn(4, 3, 8, 8)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


# real servers started by the tests themselves (moto S3/SQS; PostgreSQL): fixtures live beside this file
pytest_plugins = ["tests.s3_server", "tests.pg_server"]
