"""Read a checkpoint's metric and step from the places trainers put them.

Sources (tried in order, the first that yields a number wins):
``checkpoint: dotted.key.path`` inside the loaded object (globs allowed per segment, e.g.
``callbacks.ModelCheckpoint*.current_score`` for Lightning) or safetensors metadata;
``filename: REGEX`` with a named group ``metric`` (or ``step``); ``sidecar: '{stem}.json'`` a JSON file next to
the checkpoint (key ``metric`` unless ``key`` is given); ``trainer_state: eval_loss`` for Hugging Face
``checkpoint-N/trainer_state.json`` (the ``log_history`` entry of ``global_step``, not ``best_metric``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptd.errors import MetricError
from ckptd.layouts import resolve_key_path

KINDS = ("checkpoint", "filename", "sidecar", "trainer_state")


@dataclass(frozen=True)
class ValueSource:
    kind: str
    spec: str
    key: str = ""

    def describe(self) -> str:
        return f"{self.kind}:{self.spec}" + (f"#{self.key}" if self.key else "")


def parse_source(text: str | Mapping[str, Any]) -> ValueSource:
    """``"checkpoint:metrics.top1"``, ``"filename:score_(?P<metric>[0-9.]+)"``, ``"sidecar:{stem}.json#acc"``
    or the YAML form ``{checkpoint: metrics.top1}`` / ``{sidecar: '{stem}.json', key: acc}``."""
    if isinstance(text, Mapping):
        kinds = [k for k in text if k in KINDS]
        extra = set(text) - set(KINDS) - {"key"}
        if len(kinds) != 1 or extra:
            raise MetricError(f"a source needs exactly one of {', '.join(KINDS)} (optional 'key'); got {dict(text)}")
        kind = kinds[0]
        spec, key = str(text[kind]), str(text.get("key", ""))
    else:
        kind, sep, rest = str(text).partition(":")
        if not sep or kind not in KINDS:
            raise MetricError(f"source {text!r} must look like KIND:SPEC with KIND one of {', '.join(KINDS)}")
        spec, key = rest, ""
        if kind == "sidecar" and "#" in rest:
            spec, _, key = rest.partition("#")
    if kind == "filename":
        try:
            re.compile(spec)
        except re.error as exc:
            raise MetricError(f"filename regex {spec!r} is invalid: {exc}") from None
    if not spec:
        raise MetricError(f"source {kind!r} needs a value")
    return ValueSource(kind, spec, key)


def _number(value: Any, where: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise MetricError(f"{where} is a tensor with {value.numel()} elements, not a scalar")
        value = value.item()
    if isinstance(value, bool):
        raise MetricError(f"{where} is a boolean, not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MetricError(f"{where} is {type(value).__name__} {str(value)[:40]!r}, not a number") from None
    if math.isnan(number) or math.isinf(number):
        raise MetricError(f"{where} is {number}")
    return number


def read_source(source: ValueSource, path: str | Path, obj: Any = None,
                metadata: Mapping[str, str] | None = None, group: str = "metric") -> float:
    """The number ``source`` yields for checkpoint ``path``; MetricError with the reason if none."""
    p = Path(path)
    if source.kind == "filename":
        m = re.search(source.spec, p.name)
        if not m:
            raise MetricError(f"file name does not match {source.spec!r}")
        gd = m.groupdict()
        raw = gd.get(group) if group in gd else (m.group(1) if m.groups() else None)
        if raw is None:
            raise MetricError(f"regex {source.spec!r} has no group '{group}'")
        return _number(raw.rstrip("."), f"file name group '{group}'")
    if source.kind == "checkpoint":
        for container in (obj, metadata):
            if container is None:
                continue
            try:
                return _number(resolve_key_path(container, source.spec), f"checkpoint key {source.spec!r}")
            except KeyError:
                continue
        raise MetricError(f"checkpoint has no key {source.spec!r}")
    if source.kind == "sidecar":
        side = p.parent / source.spec.format(stem=p.name if p.is_dir() else p.stem, name=p.name)
        try:
            data = json.loads(side.read_text())
        except FileNotFoundError:
            raise MetricError(f"sidecar {side.name} not found") from None
        except (OSError, ValueError) as exc:
            raise MetricError(f"sidecar {side.name} unreadable: {exc}") from None
        key = source.key or group
        try:
            return _number(resolve_key_path(data, key), f"sidecar {side.name} key {key!r}")
        except KeyError:
            raise MetricError(f"sidecar {side.name} has no key {key!r}") from None
    if source.kind == "trainer_state":
        return _hf_trainer_state(p, source.spec, group)
    raise MetricError(f"unknown source kind {source.kind!r}")


def _hf_trainer_state(p: Path, key: str, group: str) -> float:
    state_file = (p if p.is_dir() else p.parent) / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as exc:
        raise MetricError(f"{state_file.name} unreadable: {exc}") from None
    step = state.get("global_step")
    if group == "step":
        return _number(step, "trainer_state global_step")
    for entry in reversed(state.get("log_history") or []):
        if entry.get("step") == step and key in entry:
            return _number(entry[key], f"trainer_state log_history[step={step}].{key}")
    raise MetricError(f"{state_file.name} has no log_history entry for step {step} with {key!r}")


def first_value(sources: Iterable[ValueSource], path: str | Path, obj: Any = None,
                metadata: Mapping[str, str] | None = None, group: str = "metric") -> tuple[float | None, str]:
    """(value, which source) from the first source that yields; (None, reasons) when none does."""
    reasons = []
    for source in sources:
        try:
            return read_source(source, path, obj, metadata, group), source.describe()
        except MetricError as exc:
            reasons.append(f"{source.describe()}: {exc}")
    return None, "; ".join(reasons) or "no sources configured"


def metric_candidates(obj: Any, path: str | Path, metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """For ``ckptd inspect``: values found at well-known metric/step places (whether or not they rank right)."""
    places = ["metric", "metrics", "best_metric", "iterations", "epoch", "global_step", "step",
              "callbacks.ModelCheckpoint*.current_score", "callbacks.ModelCheckpoint*.best_model_score"]
    found: dict[str, Any] = {}
    for place in places:
        for container in (obj, metadata):
            if container is None:
                continue
            try:
                value = resolve_key_path(container, place)
            except (KeyError, TypeError):
                continue
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, (int, float, str)) or (isinstance(value, Mapping) and len(value) < 20):
                found[place] = value
            break
    numbers = re.findall(r"([A-Za-z_]+)[=_-]?([0-9]+\.[0-9]+(?:[eE][-+]?[0-9]+)?)", Path(path).name)
    for name, num in numbers:
        label = re.sub(r"^(checkpoint|ckpt|model)_(ema_)?", "", name.strip("_-="))
        found[f"filename:{label}"] = float(num)
    return found
