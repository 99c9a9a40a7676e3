"""Find the model weights inside a loaded checkpoint object, whatever trainer wrote it. Pure logic, no I/O.

Known layouts (auto-detected in this order, ``prefer_ema`` puts the EMA candidates first):
plain state dict · ml-cvnets ``model_state_dict`` / ``ema_state_dict`` · Lightning ``state_dict`` (+ the
LightningModule attribute prefix) · timm ``state_dict`` / ``state_dict_ema`` · fairseq ``model`` ·
DeepSpeed ``module`` · ``AveragedModel`` state (``module.`` + ``n_averaged``).
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def is_tensor(value: Any) -> bool:
    """``isinstance(value, torch.Tensor)`` without importing torch: no tensor exists before torch is imported, so
    ``ckptd status``/``check`` (which never load a checkpoint) stay fast."""
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(value, torch_module.Tensor)


MAIN_KEYS = ("model_state_dict", "state_dict", "model", "module", "model_state", "net", "network", "weights")
EMA_KEYS = ("ema_state_dict", "state_dict_ema", "model_ema", "ema", "ema_model", "ema_state")
DEFAULT_STRIP_PREFIXES = ("module.", "_orig_mod.")
_LIGHTNING_MARKERS = ("pytorch-lightning_version", "lightning_version")


@dataclass(frozen=True)
class FoundWeights:
    """Where the weights were found (``key`` is a dotted path, ``""`` for the object itself) and the layout."""

    key: str
    layout: str
    state: dict[str, torch.Tensor]
    stripped: tuple[str, ...] = ()


def is_state_dict(obj: Any) -> bool:
    """A non-empty mapping of str -> tensor (a few non-tensor entries such as ``n_averaged``-style ints allowed)."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    tensors = sum(1 for k, v in obj.items() if isinstance(k, str) and is_tensor(v))
    return tensors > 0 and tensors == len(obj)


def resolve_key_path(obj: Any, path: str) -> Any:
    """Follow a dotted key path. A segment with ``*`` is a glob over the keys at that level and may match keys
    that themselves contain dots (Lightning's ``callbacks.ModelCheckpoint*.current_score``).
    Raises KeyError naming the failing segment."""
    if path in ("", "."):
        return obj
    if isinstance(obj, Mapping) and path in obj:
        return obj[path]
    head, _, rest = path.partition(".")
    if isinstance(obj, Mapping):
        if "*" in head or "?" in head:
            # the glob may span dots: try the longest pattern prefix that matches exactly one key
            parts = path.split(".")
            for cut in range(len(parts), 0, -1):
                pattern = ".".join(parts[:cut])
                matches = [k for k in obj if isinstance(k, str) and fnmatch.fnmatchcase(k, pattern)]
                if len(matches) == 1:
                    return resolve_key_path(obj[matches[0]], ".".join(parts[cut:]))
            raise KeyError(head)
        # a key that contains dots itself
        for key in obj:
            if isinstance(key, str) and path.startswith(key + "."):
                try:
                    return resolve_key_path(obj[key], path[len(key) + 1:])
                except KeyError:
                    continue
        raise KeyError(head)
    if isinstance(obj, Sequence) and not isinstance(obj, str) and head.isdigit() and int(head) < len(obj):
        return resolve_key_path(obj[int(head)], rest)
    if hasattr(obj, head) and not head.startswith("_"):
        return resolve_key_path(getattr(obj, head), rest)
    raise KeyError(head)


def strip_prefixes(state: Mapping[str, Any], prefixes: Sequence[str]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Strip each prefix that *every* key carries, repeatedly (``module._orig_mod.x`` -> ``x``)."""
    out = dict(state)
    stripped: list[str] = []
    changed = True
    while changed and out:
        changed = False
        for prefix in prefixes:
            if prefix and all(k.startswith(prefix) for k in out):
                out = {k[len(prefix):]: v for k, v in out.items()}
                stripped.append(prefix)
                changed = True
    return out, tuple(stripped)


def _averaged_model(state: Mapping[str, Any]) -> dict[str, Any] | None:
    """``torch.optim.swa_utils.AveragedModel.state_dict()``: ``module.*`` plus an ``n_averaged`` counter."""
    if "n_averaged" in state and all(k == "n_averaged" or k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items() if k != "n_averaged"}
    return None


def _lightning_prefix(state: Mapping[str, Any]) -> str | None:
    """The LightningModule attribute holding the net (``model.``) when all weights sit under one attribute."""
    firsts = {k.split(".", 1)[0] for k in state if "." in k}
    if len(firsts) == 1 and all("." in k for k in state):
        return firsts.pop() + "."
    return None


def _lightning_ema(obj: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """EMA / weight-averaging callbacks keep their averaged weights in the callback state."""
    callbacks = obj.get("callbacks")
    if not isinstance(callbacks, Mapping):
        return None
    for cb_name, cb_state in callbacks.items():
        if not isinstance(cb_state, Mapping):
            continue
        name = str(cb_name).lower()
        if "ema" not in name and "averag" not in name and "swa" not in name:
            continue
        for key, value in cb_state.items():
            if is_state_dict(value) or (isinstance(value, Mapping) and _averaged_model(value)):
                return f"callbacks.{cb_name}.{key}", dict(value)
    return None


def find_model_weights(
    obj: Any,
    *,
    key: str = "auto",
    prefer_ema: bool = False,
    strip: Sequence[str] = DEFAULT_STRIP_PREFIXES,
) -> FoundWeights:
    """Locate the model weights in ``obj``. Raises LookupError with a readable reason when there are none."""
    if key not in ("", "auto"):
        try:
            value = resolve_key_path(obj, key)
        except KeyError as exc:
            raise LookupError(f"key path {key!r} not found (missing segment {exc.args[0]!r}); "
                              f"top-level keys: {_keys_preview(obj)}") from None
        if not isinstance(value, Mapping) or not any(is_tensor(v) for v in value.values()):
            raise LookupError(f"key path {key!r} does not hold a state dict of tensors")
        # an explicit key in a Lightning checkpoint (state_dict, current_model_state, an EMA callback's weights)
        # holds the LightningModule's weights: its attribute prefix goes, as in the auto-detected case
        lightning = isinstance(obj, Mapping) and any(m in obj for m in _LIGHTNING_MARKERS)
        return _finish(key, "explicit", value, strip, lightning=lightning)

    if is_state_dict(obj):
        return _finish("", "plain", obj, strip, lightning=False)
    if not isinstance(obj, Mapping):
        raise LookupError(f"the checkpoint holds a {type(obj).__name__}, not a dict of weights")

    lightning = any(m in obj for m in _LIGHTNING_MARKERS)
    candidates = (*EMA_KEYS, *MAIN_KEYS) if prefer_ema else (*MAIN_KEYS, *EMA_KEYS)
    if prefer_ema and lightning:
        found = _lightning_ema(obj)
        if found is not None:
            return _finish(found[0], "lightning-ema", found[1], strip, lightning=True)
    for candidate in candidates:
        value = obj.get(candidate)
        if isinstance(value, Mapping) and value and (is_state_dict(value) or _averaged_model(value)):
            layout = _layout_name(candidate, lightning, obj)
            return _finish(candidate, layout, value, strip, lightning=lightning and candidate == "state_dict")
    # a mapping with tensors mixed with other entries (e.g. a state dict plus an 'epoch' int)
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and is_tensor(v)}
    if tensors and len(tensors) >= len(obj) / 2:
        return _finish("", "plain-mixed", tensors, strip, lightning=False)
    raise LookupError(f"no model weights found; top-level keys: {_keys_preview(obj)} "
                      "(pass an explicit key path, e.g. weights.key: model_state_dict)")


def _layout_name(candidate: str, lightning: bool, obj: Mapping[str, Any]) -> str:
    if lightning:
        return "lightning"
    return {
        "model_state_dict": "training-state",
        "ema_state_dict": "training-state-ema",
        "state_dict_ema": "timm-ema",
        "model": "fairseq" if "cfg" in obj or "args" in obj else "model",
        "module": "deepspeed" if "ds_version" in obj or "ds_config" in obj else "module",
        "state_dict": "timm" if "arch" in obj else "state_dict",
    }.get(candidate, candidate)


def _finish(key: str, layout: str, state: Mapping[str, Any], strip: Sequence[str], *, lightning: bool) -> FoundWeights:
    averaged = _averaged_model(state)
    stripped: tuple[str, ...] = ()
    if averaged is not None:
        state, stripped = averaged, ("module.",)
    tensors = {k: v for k, v in state.items() if is_tensor(v)}
    if not tensors:
        raise LookupError(f"{key or 'the checkpoint'} holds no tensors")
    if lightning:
        prefix = _lightning_prefix(tensors)
        if prefix is not None:
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
            stripped += (prefix,)
    tensors, more = strip_prefixes(tensors, strip)
    return FoundWeights(key=key, layout=layout, state=tensors, stripped=stripped + more)


def _keys_preview(obj: Any, limit: int = 12) -> str:
    if not isinstance(obj, Mapping):
        return f"<{type(obj).__name__}>"
    keys = [str(k) for k in obj]
    more = f", … (+{len(keys) - limit})" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
