"""A run's plan: the trainer preset merged with what the user set explicitly. Pure logic, no I/O.

Precedence, for every field: what the user wrote in the config wins over the preset; the preset wins over the
generic defaults. Concretely: ``watches[].include`` replaces the preset's include globs (derived copies and resume
states are still recognised by name); ``metric.sources`` / ``step.sources`` replace the preset's sources for every
stream; ``weights.key`` / ``weights.prefer_ema`` apply to the ``model`` stream; ``streams: {ema: false}`` switches
a stream off; ``metric.name`` fills the preset's source templates.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from ckptd.errors import MetricError
from ckptd.layouts import EMA_KEYS, find_model_weights, resolve_key_path
from ckptd.metric_sources import ValueSource, parse_source
from ckptd.trainers.presets import NAMED_METRIC, PRESETS, Preset, WeightsSource


@dataclass(frozen=True)
class PlanSettings:
    """What the user set explicitly (None = not set: the preset decides). Built by the daemon from its config
    (:func:`ckptd.daemon.config.plan_settings`) or by a library caller."""

    trainer: str = "auto"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    max_depth: int = 3
    metric_name: str = ""
    metric_sources: tuple[ValueSource, ...] | None = None
    step_sources: tuple[ValueSource, ...] | None = None
    weights_key: str | None = None
    prefer_ema: bool | None = None
    streams_off: tuple[str, ...] = ()
    allow_globals: tuple[str, ...] = ()
    where: str = "policy"  # config key path of the policy, for messages


@dataclass(frozen=True)
class StreamPlan:
    """One weight stream of a run: its own candidates, metric, best, top-k and outputs (``model`` at the output
    root, any other stream S under ``{output}/S/``). Streams never mix."""

    name: str
    files: tuple[str, ...]
    weights: tuple[WeightsSource, ...]
    optional: bool
    metric_sources: tuple[ValueSource, ...]
    step_sources: tuple[ValueSource, ...]
    prefer_ema: bool = False
    about: str = ""

    @property
    def weights_key(self) -> str:
        """The first weights source's key (``auto`` when the stream takes the detected model weights)."""
        return self.weights[0].key if self.weights else "auto"

    def feeds(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, g) for g in self.files)


class Verdict(NamedTuple):
    """What a name in a run directory is: ``candidate`` (with the streams it feeds), ``ignored`` or ``resume``."""

    kind: str
    reason: str
    streams: tuple[str, ...] = ()


@dataclass(frozen=True)
class WeightsPick:
    """Where one stream's weights are in one loaded checkpoint: pass ``key``/``prefer_ema`` to the reader."""

    key: str
    prefer_ema: bool
    why: str


@dataclass(frozen=True)
class RunPlan:
    trainer: str
    detected_because: str
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    ignore: tuple[tuple[str, str], ...]  # (glob, reason)
    resume_states: tuple[tuple[str, str], ...]  # (glob, reason)
    streams: tuple[StreamPlan, ...]  # enabled streams only
    disabled: tuple[tuple[str, str], ...] = ()  # (stream, why it is off)
    allow_globals: tuple[str, ...] = ()
    metric_where: str = ""
    problems: tuple[str, ...] = ()  # e.g. a detected trainer needs metric.name: candidates stay unranked

    def stream(self, name: str) -> StreamPlan:
        for s in self.streams:
            if s.name == name:
                return s
        raise KeyError(name)

    def classify(self, rel: str, is_dir: bool = False) -> Verdict:
        """What ``rel`` (a path relative to the run directory, or a bare name) is under this plan.

        Order: temp names (``exclude``) → the trainer's derived copies → resume states → ``include`` (files) → the
        streams' file globs. A file inside a checkpoint folder is part of that folder, not a checkpoint itself.
        """
        parts = rel.strip("/").split("/")
        name = parts[-1]
        for i, part in enumerate(parts[:-1]):
            if any(s.feeds(part) and s.files != ("*",) for s in self.streams) and not self._ignored(part):
                return Verdict("ignored", f"part of checkpoint folder {'/'.join(parts[:i + 1])} (read as a whole)")
        by_name = self.by_name(name)
        if by_name is not None:
            return by_name
        if not is_dir and not any(fnmatch.fnmatchcase(name, g) for g in self.include):
            return Verdict("ignored", f"does not match include {list(self.include)}")
        streams = tuple(s.name for s in self.streams if s.feeds(name))
        if streams:
            return Verdict("candidate", "feeds " + ", ".join(streams), streams)
        off = [s for s, why in self.disabled if PRESETS.get(self.trainer) and _preset_feeds(self.trainer, s, name)]
        if off:
            return Verdict("ignored", "feeds only switched-off stream(s): " + ", ".join(off))
        globs = "; ".join(f"{s.name} ← {', '.join(s.files)}" for s in self.streams)
        return Verdict("ignored", f"feeds no stream ({globs})")

    def by_name(self, name: str) -> Verdict | None:
        """The verdict the name alone gives (a temp name, a derived copy, a resume state), or None: such a folder
        is not descended into."""
        for pattern in self.exclude:
            if fnmatch.fnmatchcase(name, pattern):
                return Verdict("ignored", f"temp name (matches {pattern!r})")
        reason = self._ignored(name)
        if reason:
            return Verdict("ignored", reason)
        for pattern, why in self.resume_states:
            if fnmatch.fnmatchcase(name, pattern):
                return Verdict("resume", why)
        return None

    def _ignored(self, name: str) -> str:
        for pattern, why in self.ignore:
            if fnmatch.fnmatchcase(name, pattern):
                return why
        return ""


def _preset_feeds(trainer: str, stream: str, name: str) -> bool:
    return any(s.name == stream and any(fnmatch.fnmatchcase(name, g) for g in s.files)
               for s in PRESETS[trainer].streams)


def expand(templates: tuple[str, ...], name: str) -> tuple[ValueSource, ...]:
    """Fill ``{name}``/``{eval_name}``/``{name_re}`` in source templates; those needing a name are dropped
    when there is none."""
    eval_name = name if name.startswith("eval_") else f"eval_{name}"
    out = []
    for t in templates:
        if any(tok in t for tok in ("{name}", "{eval_name}", "{name_re}")):
            if not name:
                continue
            t = t.replace("{name}", name).replace("{eval_name}", eval_name).replace("{name_re}", re.escape(name))
        out.append(parse_source(t))
    return tuple(out)


def build_plan(trainer: str, detected_because: str, settings: PlanSettings) -> RunPlan:
    """Merge the preset of ``trainer`` (already resolved from ``auto``) with the explicit settings."""
    preset: Preset = PRESETS[trainer]
    problems: list[str] = []
    if settings.metric_sources is not None:
        metric = settings.metric_sources
    else:
        templates = preset.metric
        if trainer == "plain" and settings.metric_name:
            templates = NAMED_METRIC
        metric = expand(templates, settings.metric_name)
        if preset.needs_name and not settings.metric_name:
            problems.append(f"trainer {trainer} needs {settings.where}.metric.name ({preset.needs_name}); "
                            "until it is set its checkpoints are recorded unranked")
    step = settings.step_sources if settings.step_sources is not None else expand(preset.step, settings.metric_name)
    streams: list[StreamPlan] = []
    disabled: list[tuple[str, str]] = []
    for spec in preset.streams:
        if spec.name in settings.streams_off:
            disabled.append((spec.name, f"switched off by {settings.where}.streams.{spec.name}: false"))
            continue
        weights, prefer_ema = spec.weights, False
        if spec.name == "model":
            if settings.weights_key not in (None, "auto"):
                weights = (WeightsSource(str(settings.weights_key)),)
            if settings.prefer_ema:
                prefer_ema = True  # the legacy single-stream way to take EMA weights (plain runs)
        streams.append(StreamPlan(name=spec.name, files=spec.files, weights=weights, optional=spec.optional,
                                  metric_sources=metric, step_sources=step, prefer_ema=prefer_ema,
                                  about=spec.about))
    if not streams:
        problems.append(f"every stream of trainer {trainer} is switched off in {settings.where}.streams")
    include = settings.include if settings.include is not None else preset.include
    return RunPlan(trainer=trainer, detected_because=detected_because, include=tuple(include),
                   exclude=tuple(settings.exclude), ignore=preset.ignore, resume_states=preset.resume,
                   streams=tuple(streams), disabled=tuple(disabled),
                   allow_globals=tuple(dict.fromkeys((*preset.allow_globals, *settings.allow_globals))),
                   metric_where=preset.metric_where if settings.metric_sources is None else "explicit metric.sources",
                   problems=tuple(problems))


def pick_weights(stream: StreamPlan, obj: Any) -> WeightsPick | None:
    """Which weights in the loaded checkpoint object ``obj`` feed ``stream``; None when this file has none for it
    (an optional stream then simply does not get this file). Works on objects whose tensors are placeholders.

    ``auto-ema`` accepts only EMA weights (an EMA key or an EMA/averaging callback): a file without EMA weights never
    feeds the EMA stream with the model's weights.
    """
    for source in stream.weights:
        if source.requires and not (isinstance(obj, Mapping) and source.requires in obj):
            continue
        if source.key == "auto":
            if obj is None or stream.prefer_ema or _has_weights(obj):
                return WeightsPick("auto", stream.prefer_ema, "detected model weights")
            continue
        if source.key == "auto-ema":
            try:
                found = find_model_weights(obj, prefer_ema=True)
            except LookupError:
                continue
            if found.key in EMA_KEYS or found.layout == "lightning-ema":
                return WeightsPick(found.key, False, f"EMA weights at '{found.key}'")
            continue
        try:
            value = resolve_key_path(obj, source.key) if source.key else obj
        except (KeyError, MetricError):
            continue
        if _has_weights(value):
            return WeightsPick(source.key or "", False, f"weights at '{source.key or '.'}'")
    return None


EMA_ANYWHERE = (WeightsSource("state_dict", requires="current_model_state"), WeightsSource("auto-ema"))


def ema_weights_key(obj: Any) -> str | None:
    """The key path of the EMA weights in ``obj`` (Lightning WeightAveraging's ``state_dict``, an EMA key such as
    ``ema_state_dict``/``state_dict_ema``, an EMA/averaging callback's weights), or None: never the model's."""
    stream = StreamPlan("ema", ("*",), EMA_ANYWHERE, True, (), ())
    pick = pick_weights(stream, obj)
    return None if pick is None else pick.key


def _has_weights(value: Any) -> bool:
    try:
        find_model_weights(value)
    except LookupError:
        return False
    return True
