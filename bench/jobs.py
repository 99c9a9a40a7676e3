"""Jobs measured by the benchmarks (each runs in its own fresh process, see _measure.py)."""

from __future__ import annotations

import torch


def naive_average(paths: list[str], out: str) -> None:
    """The classic utility: torch.load each whole file, sum into a float64 copy of the model, save."""
    acc: dict[str, torch.Tensor] | None = None
    for p in paths:
        obj = torch.load(p, map_location="cpu", weights_only=True)
        sd = obj.get("model_state_dict", obj)
        if acc is None:
            acc = {k: v.double().clone() for k, v in sd.items()}
        else:
            for k, v in sd.items():
                acc[k] += v.double()
        del obj, sd
    assert acc is not None
    torch.save({k: (v / len(paths)).float() for k, v in acc.items()}, out)


def ckptd_average(paths: list[str], out: str) -> None:
    from ckptd.averaging import average_checkpoints

    average_checkpoints(paths, out)


def full_load_extract(path: str, out: str) -> None:
    """Baseline extraction: load the whole training checkpoint, keep the model part."""
    from safetensors.torch import save_file

    obj = torch.load(path, map_location="cpu", weights_only=True)
    save_file(obj["model_state_dict"], out)


def ckptd_extract(path: str, out: str) -> None:
    from ckptd.weights import extract_weights

    extract_weights(path, out, hash_source=False)
