"""Checkpoint contents for the fault suite: deterministic from a seed, so the harness knows every version's
weights (their fingerprint) without reading what a writer wrote.

Imported by the writer subprocess (``bench/chaos_writer.py``) and by the harness; depends on torch only.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def width_for(kb: int) -> int:
    """Channel width whose state dict is about ``kb`` KiB (conv W*W*3*3 + linear W*W floats)."""
    return max(4, int(math.sqrt(kb * 1024 / 40)))


def model_state(seed: int, kb: int = 64, arch: str = "a", channels_last: bool = True) -> dict[str, torch.Tensor]:
    """A small conv net's state dict. The conv weight is channels_last, as under AMP training: copying it out of
    a mapped file needs a user-space copy (the SIGBUS class). ``arch='b'`` has other shapes."""
    w = width_for(kb) + (1 if arch == "b" else 0)
    g = torch.Generator().manual_seed(seed)
    conv = torch.randn(w, w, 3, 3, generator=g)
    if channels_last:
        conv = conv.contiguous(memory_format=torch.channels_last)
    return {
        "conv.weight": conv,
        "conv.bias": torch.randn(w, generator=g),
        "bn.weight": torch.rand(w, generator=g) + 0.5,
        "bn.bias": torch.randn(w, generator=g),
        "bn.running_mean": torch.randn(w, generator=g),
        "bn.running_var": torch.rand(w, generator=g) + 0.5,
        "bn.num_batches_tracked": torch.tensor(seed, dtype=torch.int64),
        "head.weight": torch.randn(w, w, generator=g),
        "head.bias": torch.randn(w, generator=g),
    }


def checkpoint(seed: int, metric: float, step: int, kb: int = 64, arch: str = "a",
               poison: str = "") -> dict[str, Any]:
    """A trainer's checkpoint (ml-cvnets layout). ``poison='nan'|'inf'`` puts one non-finite value in."""
    sd = model_state(seed, kb, arch)
    if poison:
        sd["head.weight"][0, 0] = float("nan") if poison == "nan" else float("inf")
    return {"model_state_dict": sd, "metric": float(metric), "iterations": int(step),
            "optim_state_dict": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}}


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and values (independent of memory layout)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.detach().contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def version_fingerprint(seed: int, kb: int = 64, arch: str = "a") -> str:
    return fingerprint(model_state(seed, kb, arch))


def serialize(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save(obj: Any, path: Path, how: str = "atomic", chunk_delay: float = 0.0, on_start: Any = None) -> None:
    """Write a checkpoint the way trainers do.

    atomic: torch.save to a temp name, rename into place (careful trainers).
    inplace: plain torch.save to the final name (ml-cvnets' checkpoint_last.pt; truncates a file being read).
    rplus: open(path, "r+b"), truncate, rewrite (an in-place rewrite that keeps the inode).
    slow: in-place, chunk by chunk with ``chunk_delay`` pauses (a writer that can be killed mid-file).
    """
    path = Path(path)
    if how == "atomic":
        tmp = path.with_name(path.name + ".tmp")
        torch.save(obj, tmp)
        os.replace(tmp, path)
    elif how == "inplace":
        torch.save(obj, path)
    elif how == "rplus":
        data = serialize(obj)
        mode = "r+b" if path.exists() else "wb"
        with open(path, mode) as fh:
            fh.truncate(0)
            for i in range(0, len(data), 1 << 16):
                fh.write(data[i:i + (1 << 16)])
                fh.flush()
    elif how == "slow":
        data = serialize(obj)
        with open(path, "wb") as fh:
            if on_start is not None:
                on_start()
            for i in range(0, len(data), 1 << 16):
                fh.write(data[i:i + (1 << 16)])
                fh.flush()
                time.sleep(chunk_delay)
    else:
        raise ValueError(f"unknown write mode {how!r}")
