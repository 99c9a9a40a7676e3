"""Read a checkpoint's metric and step from the places trainers put them.

Sources (tried in order, the first that yields a number wins):
``checkpoint: dotted.key.path`` inside the loaded object (globs allowed per segment, e.g.
``callbacks.ModelCheckpoint*.current_score`` for Lightning) or safetensors metadata;
``filename: REGEX`` with a named group ``metric`` (or ``step``); ``sidecar: '{stem}.json'`` a JSON file next to
the checkpoint (key ``metric`` unless ``key`` is given); ``trainer_state: eval_loss`` for Hugging Face
``checkpoint-N/trainer_state.json`` (the ``log_history`` entry of ``global_step``, not ``best_metric``);
``lightning: val_acc`` for the ``current_score`` of the Lightning ModelCheckpoint callback that monitors ``val_acc``
(not ``best_model_score``, the best so far).

Every reader says *where* it found the value (:func:`find_value`), so ``ckptd check --explain`` can show it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.errors import MetricError
from ckptd.file_checks import read_json
from ckptd.layouts import is_tensor, resolve_key_path

KINDS = ("checkpoint", "filename", "sidecar", "trainer_state", "lightning")


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
    if is_tensor(value):
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
    return read_source_where(source, path, obj, metadata, group)[0]


def read_source_where(source: ValueSource, path: str | Path, obj: Any = None,
                      metadata: Mapping[str, str] | None = None, group: str = "metric") -> tuple[float, str]:
    """(number, where exactly it was found) for checkpoint ``path``; MetricError with the reason if none."""
    p = Path(path)
    if source.kind == "filename":
        m = re.search(source.spec, p.name)
        if not m:
            raise MetricError(f"file name does not match {source.spec!r}")
        gd = m.groupdict()
        raw = gd.get(group) if group in gd else (m.group(1) if m.groups() else None)
        if raw is None:
            raise MetricError(f"regex {source.spec!r} has no group '{group}'")
        return _number(raw.rstrip("."), f"file name group '{group}'"), f"file name {p.name!r}"
    if source.kind == "checkpoint":
        for container, label in ((obj, "checkpoint key"), (metadata, "safetensors metadata key")):
            if container is None:
                continue
            try:
                value = resolve_key_path(container, source.spec)
            except KeyError:
                continue
            return _number(value, f"{label} {source.spec!r}"), f"{label} {source.spec!r}"
        raise MetricError(f"checkpoint has no key {source.spec!r}")
    if source.kind == "sidecar":
        side = p.parent / source.spec.format(stem=p.name if p.is_dir() else p.stem, name=p.name)
        try:
            data = read_json(side)
        except FileNotFoundError:
            raise MetricError(f"sidecar {side.name} not found") from None
        except (OSError, ValueError) as exc:
            raise MetricError(f"sidecar {side.name} unreadable: {exc}") from None
        key = source.key or group
        try:
            where = f"sidecar {side.name} key {key!r}"
            return _number(resolve_key_path(data, key), where), where
        except KeyError:
            raise MetricError(f"sidecar {side.name} has no key {key!r}") from None
    if source.kind == "trainer_state":
        return _hf_trainer_state(p, source.spec, group)
    if source.kind == "lightning":
        return _lightning_current_score(obj, p, source.spec)
    raise MetricError(f"unknown source kind {source.kind!r}")


def _hf_trainer_state(p: Path, key: str, group: str) -> tuple[float, str]:
    """HF Trainer: the ``log_history`` entry whose ``step`` is this checkpoint's own ``global_step`` (the top-level
    ``best_metric`` is the best so far and is never used)."""
    state_file = (p if p.is_dir() else p.parent) / "trainer_state.json"
    try:
        state = read_json(state_file)
    except (OSError, ValueError) as exc:
        raise MetricError(f"{state_file.name} unreadable: {exc}") from None
    step = state.get("global_step")
    if group == "step":
        return _number(step, "trainer_state global_step"), f"{state_file.parent.name}/trainer_state.json global_step"
    for entry in reversed(state.get("log_history") or []):
        if entry.get("step") == step and key in entry:
            where = f"{state_file.parent.name}/trainer_state.json log_history[step={step}].{key}"
            return _number(entry[key], where), where
    raise MetricError(f"{state_file.name} has no log_history entry for step {step} with {key!r}")


def _lightning_current_score(obj: Any, p: Path, monitor: str) -> tuple[float, str]:
    """Lightning: ``current_score`` of the ModelCheckpoint callback that monitors ``monitor``.

    The callback state key looks like ``ModelCheckpoint{'monitor': 'val_acc', 'mode': 'max', ...}`` and the state
    has a ``monitor`` field (recent versions). When several callbacks monitor the same name, the one that saved
    this file has it in its ``best_k_models`` (Lightning records the path before saving); the others' scores may
    be stale. ``best_model_score`` is the best so far and is never used.
    """
    callbacks = obj.get("callbacks") if isinstance(obj, Mapping) else None
    if not isinstance(callbacks, Mapping):
        raise MetricError("checkpoint has no Lightning 'callbacks' state")
    matches: list[tuple[str, Mapping[str, Any]]] = []
    monitored: list[str] = []
    for key, state in callbacks.items():
        if not isinstance(state, Mapping) or "current_score" not in state or "best_k_models" not in state:
            continue
        mon = state.get("monitor")
        if mon is None:
            found = re.search(r"'monitor': '([^']*)'", str(key))
            mon = found.group(1) if found else None
        monitored.append(str(mon))
        if mon == monitor:
            matches.append((str(key), state))
    if not matches:
        raise MetricError(f"no ModelCheckpoint callback monitors {monitor!r} (monitored: "
                          f"{', '.join(monitored) or 'none'})")
    own = [m for m in matches if any(Path(str(f)).name == p.name for f in (m[1].get("best_k_models") or {}))]
    if not own and any(m[1].get("best_k_models") for m in matches):
        # the callback lists the file it saves before saving it: this file was saved by another callback (or
        # is a save_last copy), so the current_score here belongs to an earlier save
        raise MetricError(f"this file is not in the best_k_models of the callback monitoring {monitor!r}: it was "
                          "saved by another callback, whose copy of that score may be stale")
    chosen = own or matches
    values = {str(s.get("current_score")) for _, s in chosen}
    if len(values) > 1:
        raise MetricError(f"{len(chosen)} ModelCheckpoint callbacks monitor {monitor!r} with different "
                          "current_score values and none lists this file in best_k_models")
    key, state = chosen[0]
    where = f"callbacks[{key}].current_score"
    if state.get("current_score") is None:
        raise MetricError(f"{where} is None (the callback had not saved a top-k checkpoint)")
    return _number(state["current_score"], where), where


@dataclass(frozen=True)
class Found:
    """A value and where it came from, or None with every source's reason (for logs and ``--explain``)."""

    value: float | None
    source: str  # the ValueSource that yielded it ("" when none did)
    where: str  # e.g. "file name 'checkpoint_score_0.7812.pt'", or the reasons each source failed


def find_value(sources: Iterable[ValueSource], path: str | Path, obj: Any = None,
               metadata: Mapping[str, str] | None = None, group: str = "metric") -> Found:
    """The first source that yields a number wins; otherwise every source's reason."""
    reasons = []
    for source in sources:
        try:
            value, where = read_source_where(source, path, obj, metadata, group)
            return Found(value, source.describe(), where)
        except MetricError as exc:
            reasons.append(f"{source.describe()}: {exc}")
    return Found(None, "", "; ".join(reasons) or "no sources configured")


def first_value(sources: Iterable[ValueSource], path: str | Path, obj: Any = None,
                metadata: Mapping[str, str] | None = None, group: str = "metric") -> tuple[float | None, str]:
    """(value, which source) from the first source that yields; (None, reasons) when none does."""
    found = find_value(sources, path, obj, metadata, group)
    return (found.value, found.source) if found.value is not None else (None, found.where)


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
            if is_tensor(value) and value.numel() == 1:
                value = value.item()
            if isinstance(value, (int, float, str)) or (isinstance(value, Mapping) and len(value) < 20):
                found[place] = value
            break
    numbers = re.findall(r"([A-Za-z_]+)[=_-]?([0-9]+\.[0-9]+(?:[eE][-+]?[0-9]+)?)", Path(path).name)
    for name, num in numbers:
        label = re.sub(r"^(checkpoint|ckpt|model)_(ema_)?", "", name.strip("_-="))
        found[f"filename:{label}"] = float(num)
    return found
