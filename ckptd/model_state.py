"""Model weights in and out of live ``nn.Module`` objects, through the usual wrappers.

Wrappers seen through: DistributedDataParallel / DataParallel (``.module``), ``torch.compile``
(``._orig_mod``), ``torch.optim.swa_utils.AveragedModel`` and timm-style ``ModelEma*`` (``.module``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckptd.errors import WeightsMismatchError

_MODULE_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel, torch.optim.swa_utils.AveragedModel)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The innermost real model behind any stack of wrappers."""
    seen = 0
    while seen < 16:
        seen += 1
        if isinstance(model, _MODULE_WRAPPERS) or _is_ema_wrapper(model):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            break
    return model


def _is_ema_wrapper(model: Any) -> bool:
    name = type(model).__name__.lower()
    return "ema" in name and isinstance(getattr(model, "module", None), nn.Module)


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain ``state_dict`` of the unwrapped model (no ``module.``/``_orig_mod.`` prefixes)."""
    return dict(unwrap_model(model).state_dict())


@dataclass
class LoadReport:
    """What happened when weights were loaded: empty lists mean an exact match."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    loaded: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 10, model: str = "model") -> str:
        """Readable diff; ``model`` names the side the weights are compared against."""
        parts: list[str] = []

        def listing(title: str, items: list[str]) -> None:
            if items:
                more = f" … (+{len(items) - limit} more)" if len(items) > limit else ""
                parts.append(f"{title} ({len(items)}): " + ", ".join(items[:limit]) + more)

        listing("missing in checkpoint" if model == "model" else f"missing in checkpoint (present in {model})",
                self.missing)
        listing("unexpected in checkpoint", self.unexpected)
        listing("shape mismatch", [f"{k} {model} {list(m)} vs checkpoint {list(c)}" for k, m, c in self.mismatched])
        return "; ".join(parts) if parts else f"all {self.loaded} tensors matched"


def compare_state(model_state: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]) -> LoadReport:
    """Pure key/shape diff between a model's state dict and a set of weights."""
    report = LoadReport()
    report.missing = sorted(k for k in model_state if k not in weights)
    report.unexpected = sorted(k for k in weights if k not in model_state)
    for k in sorted(set(model_state) & set(weights)):
        if tuple(model_state[k].shape) != tuple(weights[k].shape):
            report.mismatched.append((k, tuple(model_state[k].shape), tuple(weights[k].shape)))
    report.loaded = len(set(model_state) & set(weights)) - len(report.mismatched)
    return report


def load_model_weights(model: nn.Module, weights: Mapping[str, torch.Tensor] | str | Path, *,
                       strict: bool = True, **open_kwargs: Any) -> LoadReport:
    """Load weights (a state dict or any checkpoint path ckptd can read) into ``model``.

    ``strict`` refuses any missing/unexpected/shape-mismatched key with a readable report; non-strict loads
    every tensor that matches and returns the report.
    """
    source = "weights"
    if isinstance(weights, (str, Path)):
        from ckptd.weights import open_checkpoint

        source = str(weights)
        weights = open_checkpoint(weights, **open_kwargs).weights
    target = unwrap_model(model)
    report = compare_state(target.state_dict(), weights)
    if strict and not report.ok:
        raise WeightsMismatchError(f"cannot load {source} into {type(target).__name__}: {report.describe()}")
    bad = {k for k, _, _ in report.mismatched}
    usable = {k: v for k, v in weights.items() if k not in bad and k not in report.unexpected}
    target.load_state_dict(usable, strict=False)
    return report


def copy_weights(src: nn.Module, dst: nn.Module, *, strict: bool = True) -> LoadReport:
    """Copy weights model -> model (through wrappers on either side)."""
    return load_model_weights(dst, model_state_dict(src), strict=strict)
