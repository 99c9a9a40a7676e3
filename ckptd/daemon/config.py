"""YAML config -> validated, frozen policy objects. Every problem is reported at once, with its key path.

Shape (contract, DESIGN.md §3): ``state_dict``, ``log``, ``watches[]``, ``policies{}``; unknown keys are errors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from ckptd.errors import ConfigError, MetricError
from ckptd.metrics import ValueSource, parse_source
from ckptd.units import parse_duration

DEFAULT_METRIC_SOURCES = (
    {"checkpoint": "metric"},
    {"filename": r"score_(?P<metric>[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"},
)
DEFAULT_STEP_SOURCES = (
    {"checkpoint": "iterations"}, {"checkpoint": "global_step"}, {"checkpoint": "step"},
    {"filename": r"step[=_-]?(?P<step>[0-9]+)"},
)
DTYPES = ("keep", "float32", "float16", "bfloat16")
TEMP_EXCLUDES = ("*.tmp", ".*", "tmp-*", "*.orbax-checkpoint-tmp-*", "*.partial", "*~")


@dataclass(frozen=True)
class LogConfig:
    format: str = "auto"
    level: str = "info"


@dataclass(frozen=True)
class WeightsPolicy:
    key: str = "auto"
    strip_prefixes: tuple[str, ...] = ("module.", "_orig_mod.")
    prefer_ema: bool = False
    allow_globals: tuple[str, ...] = ()


@dataclass(frozen=True)
class MetricPolicy:
    mode: str = "max"
    sources: tuple[ValueSource, ...] = ()


@dataclass(frozen=True)
class AveragePolicy:
    top_k: int = 5
    min_members: int = 2
    dtype: str = "keep"


@dataclass(frozen=True)
class ModelOnlyPolicy:
    dtype: str = "keep"
    formats: tuple[str, ...] = ("safetensors",)


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[Any, ...]
    kind: str = "tensor"
    dtype: str = "float32"
    scale: float = 1.0
    bias: tuple[float, ...] = ()
    color_layout: str = "RGB"
    enumerated_shapes: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class CoremlPolicy:
    enabled: bool = False
    source: str = "best"
    factory: str = ""
    factory_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    python_path: tuple[str, ...] = ()
    inputs: tuple[InputSpec, ...] = ()
    outputs: tuple[str, ...] = ()
    precision: str = "float16"
    minimum_deployment_target: str = "iOS17"
    timeout: float = 600.0
    keep: int = 3
    compression: str = "none"
    publish_partial: bool = False
    author: str = ""
    version: str = ""
    description: str = ""


@dataclass(frozen=True)
class HooksPolicy:
    on_new_best: tuple[tuple[str, ...], ...] = ()
    on_average: tuple[tuple[str, ...], ...] = ()
    on_export: tuple[tuple[str, ...], ...] = ()
    timeout: float = 60.0


@dataclass(frozen=True)
class RetentionPolicy:
    enabled: bool = False
    keep_last: int = 3
    min_age: float = 3600.0
    dry_run: bool = False


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""
    textfile: str = ""


@dataclass(frozen=True)
class Policy:
    name: str
    weights: WeightsPolicy = WeightsPolicy()
    metric: MetricPolicy = MetricPolicy()
    step_sources: tuple[ValueSource, ...] = ()
    average: AveragePolicy = AveragePolicy()
    model_only: ModelOnlyPolicy = ModelOnlyPolicy()
    coreml: CoremlPolicy = CoremlPolicy()
    hooks: HooksPolicy = HooksPolicy()
    retention: RetentionPolicy = RetentionPolicy()


@dataclass(frozen=True)
class Watch:
    name: str
    root: Path
    runs: str = "*"
    include: tuple[str, ...] = ("*.pt", "*.pth", "*.ckpt", "*.bin", "*.safetensors")
    exclude: tuple[str, ...] = TEMP_EXCLUDES
    mode: str = "auto"
    poll_interval: float = 30.0
    settle: float = 5.0
    output: str = ""
    policy: str = "default"
    max_depth: int = 3
    allow_output_in_root: bool = False

    @property
    def output_root(self) -> Path:
        """The static part of the output template: nothing is ever written outside it."""
        return Path(self.output.split("{", 1)[0] or ".")


@dataclass(frozen=True)
class Config:
    source: str
    state_dir: Path
    log: LogConfig
    watches: tuple[Watch, ...]
    policies: Mapping[str, Policy]
    max_parallel_runs: int = 2
    rescan_interval: float = 300.0
    shutdown_deadline: float = 30.0
    metrics: MetricsConfig = MetricsConfig()

    def policy_for(self, watch: Watch) -> Policy:
        return self.policies[watch.policy]


class _Problems:
    """Collects problems with their key paths (borgmatic style: ``At 'watches[0].root': …``)."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")


_MISSING = object()


class _Section:
    """Typed access to one mapping of the YAML tree; records unknown keys and type errors."""

    def __init__(self, data: Any, path: str, problems: _Problems, known: tuple[str, ...]) -> None:
        self.path, self.problems = path, problems
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            problems.add(path, f"expected a mapping, got {type(data).__name__}")
            data = {}
        self.data = data
        for key in data:
            if key not in known:
                problems.add(f"{path}.{key}" if path else str(key),
                             f"unknown key (known: {', '.join(known)})")

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, default: Any, check: Callable[[Any], Any], expected: str) -> Any:
        value = self.data.get(name, _MISSING)
        if value is _MISSING:
            return default
        try:
            return check(value)
        except (ValueError, TypeError, MetricError) as exc:
            detail = str(exc) if str(exc) and not str(exc).startswith("expected") else ""
            self.problems.add(self.key(name), f"expected {expected}" + (f" ({detail})" if detail else ""))
            return default

    def required(self, name: str, check: Callable[[Any], Any], expected: str) -> Any:
        if name not in self.data:
            self.problems.add(self.key(name), "is required")
            return None
        return self.get(name, None, check, expected)


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError("expected")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("expected")
    return v


def _int(minimum: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError("expected")
        return v

    return check


def _choice(*options: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in options:
            raise ValueError("expected")
        return v

    return check


def _str_list(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError("expected")
    return tuple(v)


def _regex_safe_sources(v: Any) -> tuple[ValueSource, ...]:
    if not isinstance(v, list):
        raise ValueError("expected")
    return tuple(parse_source(item) for item in v)


def _commands(v: Any) -> tuple[tuple[str, ...], ...]:
    if not isinstance(v, list) or not all(isinstance(c, list) and c and all(isinstance(a, str) for a in c) for c in v):
        raise ValueError("expected")
    return tuple(tuple(c) for c in v)


def _policy(name: str, data: Any, problems: _Problems) -> Policy:
    path = f"policies.{name}"
    sec = _Section(data, path, problems, ("weights", "metric", "step", "average", "model_only", "export", "hooks",
                                          "retention"))
    w = _Section(sec.data.get("weights"), f"{path}.weights", problems,
                 ("key", "strip_prefixes", "prefer_ema", "allow_globals"))
    weights = WeightsPolicy(
        key=w.get("key", "auto", _str, "a key path or 'auto'"),
        strip_prefixes=w.get("strip_prefixes", WeightsPolicy.strip_prefixes, _str_list, "a list of prefixes"),
        prefer_ema=w.get("prefer_ema", False, _bool, "true or false"),
        allow_globals=w.get("allow_globals", (), _str_list, "a list of dotted names"),
    )
    m = _Section(sec.data.get("metric"), f"{path}.metric", problems, ("mode", "sources"))
    metric = MetricPolicy(
        mode=m.get("mode", "max", _choice("max", "min"), "max or min"),
        sources=m.get("sources", tuple(parse_source(s) for s in DEFAULT_METRIC_SOURCES), _regex_safe_sources,
                      "a list of sources like {checkpoint: key.path}, {filename: REGEX}, {sidecar: '{stem}.json'}"),
    )
    s = _Section(sec.data.get("step"), f"{path}.step", problems, ("sources",))
    step_sources = s.get("sources", tuple(parse_source(x) for x in DEFAULT_STEP_SOURCES), _regex_safe_sources,
                         "a list of sources")
    for i, src in enumerate(metric.sources):
        if src.kind == "filename" and "(?P<metric>" not in src.spec and re.compile(src.spec).groups == 0:
            problems.add(f"{path}.metric.sources[{i}]", "the filename regex needs a group, ideally (?P<metric>...)")
    a = _Section(sec.data.get("average"), f"{path}.average", problems, ("top_k", "min_members", "dtype"))
    average = AveragePolicy(
        top_k=a.get("top_k", 5, _int(1), "an integer >= 1"),
        min_members=a.get("min_members", 2, _int(1), "an integer >= 1"),
        dtype=a.get("dtype", "keep", _choice(*DTYPES), " or ".join(DTYPES)),
    )
    if average.min_members > average.top_k:
        problems.add(f"{path}.average.min_members", f"cannot exceed top_k ({average.top_k})")
    mo = _Section(sec.data.get("model_only"), f"{path}.model_only", problems, ("dtype", "formats"))
    model_only = ModelOnlyPolicy(
        dtype=mo.get("dtype", "keep", _choice(*DTYPES), " or ".join(DTYPES)),
        formats=mo.get("formats", ("safetensors",), _formats, "a list of safetensors and/or pt"),
    )
    ex = _Section(sec.data.get("export"), f"{path}.export", problems, ("coreml",))
    coreml = _coreml(ex.data.get("coreml"), f"{path}.export.coreml", problems)
    h = _Section(sec.data.get("hooks"), f"{path}.hooks", problems,
                 ("on_new_best", "on_average", "on_export", "timeout"))
    hooks = HooksPolicy(
        on_new_best=h.get("on_new_best", (), _commands, "a list of argv lists, e.g. [[notify, --best]]"),
        on_average=h.get("on_average", (), _commands, "a list of argv lists"),
        on_export=h.get("on_export", (), _commands, "a list of argv lists"),
        timeout=h.get("timeout", 60.0, parse_duration, "a duration like 30s"),
    )
    rt = _Section(sec.data.get("retention"), f"{path}.retention", problems, ("enabled", "keep_last", "min_age",
                                                                              "dry_run"))
    retention = RetentionPolicy(
        enabled=rt.get("enabled", False, _bool, "true or false"),
        keep_last=rt.get("keep_last", 3, _int(1), "an integer >= 1"),
        min_age=rt.get("min_age", 3600.0, parse_duration, "a duration like 1h"),
        dry_run=rt.get("dry_run", False, _bool, "true or false"),
    )
    return Policy(name=name, weights=weights, metric=metric, step_sources=step_sources, average=average,
                  model_only=model_only, coreml=coreml, hooks=hooks, retention=retention)


def _formats(v: Any) -> tuple[str, ...]:
    items = _str_list(v)
    if not items or any(x not in ("safetensors", "pt") for x in items):
        raise ValueError("expected")
    return items


def _shape(v: Any) -> tuple[Any, ...]:
    """Fixed dims are ints; a flexible dim is [min, max] (max -1 = unbounded)."""
    if not isinstance(v, list) or not v:
        raise ValueError("expected")
    out: list[Any] = []
    for d in v:
        if isinstance(d, int) and not isinstance(d, bool) and d > 0:
            out.append(d)
        elif isinstance(d, list) and len(d) == 2 and all(isinstance(x, int) for x in d) and d[0] > 0 \
                and (d[1] == -1 or d[1] >= d[0]):
            out.append((d[0], d[1]))
        else:
            raise ValueError("expected")
    return tuple(out)


def _coreml(data: Any, path: str, problems: _Problems) -> CoremlPolicy:
    sec = _Section(data, path, problems, (
        "enabled", "source", "factory", "factory_kwargs", "python_path", "inputs", "outputs", "precision",
        "minimum_deployment_target", "timeout", "keep", "compression", "publish_partial", "author", "version",
        "description"))
    if data is None:
        return CoremlPolicy()
    inputs: list[InputSpec] = []
    raw_inputs = sec.data.get("inputs", [])
    if not isinstance(raw_inputs, list):
        problems.add(f"{path}.inputs", "expected a list of inputs")
        raw_inputs = []
    for i, item in enumerate(raw_inputs):
        s = _Section(item, f"{path}.inputs[{i}]", problems,
                     ("name", "shape", "kind", "dtype", "scale", "bias", "color_layout", "enumerated_shapes"))
        inputs.append(InputSpec(
            name=s.required("name", _str, "a name") or f"input_{i}",
            shape=s.required("shape", _shape, "a list of positive ints or [min, max] ranges") or (1,),
            kind=s.get("kind", "tensor", _choice("tensor", "image"), "tensor or image"),
            dtype=s.get("dtype", "float32", _choice("float32", "float16", "int32"), "float32, float16 or int32"),
            scale=s.get("scale", 1.0, float, "a number"),
            bias=s.get("bias", (), lambda v: tuple(float(x) for x in v), "a list of numbers"),
            color_layout=s.get("color_layout", "RGB", _choice("RGB", "BGR", "G"), "RGB, BGR or G"),
            enumerated_shapes=s.get("enumerated_shapes", (), lambda v: tuple(tuple(_shape(x)) for x in v),
                                    "a list of shapes"),
        ))
    factory = sec.get("factory", "", _str, "'package.module:callable'")
    policy = CoremlPolicy(
        enabled=sec.get("enabled", True, _bool, "true or false"),
        source=sec.get("source", "best", _choice("best", "average"), "best or average"),
        factory=factory,
        factory_kwargs=MappingProxyType(dict(sec.get("factory_kwargs", {}, _mapping, "a mapping"))),
        python_path=sec.get("python_path", (), _str_list, "a list of directories"),
        inputs=tuple(inputs),
        outputs=sec.get("outputs", (), _str_list, "a list of output names"),
        precision=sec.get("precision", "float16", _choice("float16", "float32"), "float16 or float32"),
        minimum_deployment_target=sec.get("minimum_deployment_target", "iOS17", _str, "a target like iOS17"),
        timeout=sec.get("timeout", 600.0, parse_duration, "a duration like 10m"),
        keep=sec.get("keep", 3, _int(1), "an integer >= 1"),
        compression=sec.get("compression", "none", _choice("none", "int8", "palettize4", "palettize8"),
                            "none, int8, palettize4 or palettize8"),
        publish_partial=sec.get("publish_partial", False, _bool, "true or false"),
        author=sec.get("author", "", str, "a string"),
        version=sec.get("version", "", str, "a string"),
        description=sec.get("description", "", str, "a string"),
    )
    if policy.enabled:
        if not re.fullmatch(r"[\w.]+:[\w.]+", factory or ""):
            problems.add(f"{path}.factory", "is required when export is enabled, as 'package.module:callable'")
        if not inputs:
            problems.add(f"{path}.inputs", "at least one input is required when export is enabled")
    return policy


def _listen(v: Any) -> str:
    if v in ("", None):
        return ""
    _host, sep, port = str(v).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError("expected")
    return str(v)


def _mapping(v: Any) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise ValueError("expected")
    return v


def _watch(i: int, data: Any, problems: _Problems, policies: Mapping[str, Any]) -> Watch | None:
    path = f"watches[{i}]"
    sec = _Section(data, path, problems, ("name", "root", "runs", "include", "exclude", "mode", "poll_interval",
                                          "settle", "output", "policy", "max_depth", "allow_output_in_root"))
    name = sec.required("name", _str, "a name")
    root = sec.required("root", _str, "a directory path")
    output = sec.required("output", _str, "a path template like /srv/ckptd/{watch}/{run}")
    defaults = Watch(name="", root=Path("."))
    watch = Watch(
        name=name or f"watch{i}",
        root=Path(root or "."),
        runs=sec.get("runs", "*", _str, "a glob of run directories or '.'"),
        include=sec.get("include", defaults.include, _str_list, "a list of globs"),
        exclude=tuple(dict.fromkeys(TEMP_EXCLUDES + sec.get("exclude", (), _str_list, "a list of globs"))),
        mode=sec.get("mode", "auto", _choice("auto", "events", "poll"), "auto, events or poll"),
        poll_interval=sec.get("poll_interval", 30.0, parse_duration, "a duration like 30s"),
        settle=sec.get("settle", 5.0, parse_duration, "a duration like 30s"),
        output=output or "",
        policy=sec.get("policy", "default", _str, "a policy name"),
        max_depth=sec.get("max_depth", 3, _int(0), "an integer >= 0"),
        allow_output_in_root=sec.get("allow_output_in_root", False, _bool, "true or false"),
    )
    if name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        problems.add(f"{path}.name", "use letters, digits, '.', '_' or '-' (it is used in paths)")
    if root:
        if not Path(root).is_absolute():
            problems.add(f"{path}.root", f"must be an absolute path, not {root!r}")
        elif not Path(root).is_dir():
            problems.add(f"{path}.root", f"directory {root} does not exist")
    if output:
        placeholders = set(re.findall(r"{([^}]*)}", output))
        if placeholders - {"watch", "run"}:
            problems.add(f"{path}.output", f"only {{watch}} and {{run}} may be used, not {sorted(placeholders)}")
        if watch.runs != "." and "run" not in placeholders:
            problems.add(f"{path}.output", "must contain {run} when runs is a glob (each run needs its own outputs)")
        if not Path(output).is_absolute():
            problems.add(f"{path}.output", "must be an absolute path template")
        elif root and not watch.allow_output_in_root:
            out_root = Path(output.split("{", 1)[0]).resolve()
            if out_root == Path(root).resolve() or Path(root).resolve() in out_root.parents:
                problems.add(f"{path}.output", "is inside the training root; set allow_output_in_root: true if meant")
    if watch.policy not in policies and watch.policy != "default":
        problems.add(f"{path}.policy", f"no policy named {watch.policy!r} (defined: {', '.join(policies) or 'none'})")
    return watch


def parse_config(data: Any, source: str = "<config>") -> Config:
    """Validate a parsed YAML tree; raises ConfigError listing every problem."""
    problems = _Problems()
    top = _Section(data, "", problems, ("state_dir", "log", "watches", "policies", "max_parallel_runs",
                                        "rescan_interval", "shutdown_deadline", "metrics"))
    mt = _Section(top.data.get("metrics"), "metrics", problems, ("listen", "textfile"))
    metrics = MetricsConfig(listen=mt.get("listen", "", _listen, "host:port, e.g. 127.0.0.1:9478"),
                            textfile=mt.get("textfile", "", lambda v: "" if v in ("", None) else _str(v),
                                            "a file path ending in .prom"))
    if metrics.textfile and (not metrics.textfile.endswith(".prom") or not Path(metrics.textfile).is_absolute()):
        problems.add("metrics.textfile", "must be an absolute path ending in .prom")
    state_dir = top.required("state_dir", _str, "a directory path")
    lg = _Section(top.data.get("log"), "log", problems, ("format", "level"))
    log = LogConfig(format=lg.get("format", "auto", _choice("auto", "json", "console"), "auto, json or console"),
                    level=lg.get("level", "info", _choice("debug", "info", "warning", "error"),
                                 "debug, info, warning or error"))
    raw_policies = top.data.get("policies") or {}
    if not isinstance(raw_policies, Mapping):
        problems.add("policies", "expected a mapping of policy names to policies")
        raw_policies = {}
    policies = {str(n): _policy(str(n), p, problems) for n, p in raw_policies.items()}
    policies.setdefault("default", _policy("default", {}, _Problems()))
    raw_watches = top.data.get("watches")
    if not isinstance(raw_watches, list) or not raw_watches:
        problems.add("watches", "expected a non-empty list of watches")
        raw_watches = []
    watches = [w for i, item in enumerate(raw_watches) if (w := _watch(i, item, problems, raw_policies))]
    names = [w.name for w in watches]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.add("watches", f"watch name {dup!r} is used more than once")
    config = Config(
        source=source,
        state_dir=Path(state_dir or "."),
        log=log,
        watches=tuple(watches),
        policies=MappingProxyType(policies),
        max_parallel_runs=top.get("max_parallel_runs", 2, _int(1), "an integer >= 1"),
        rescan_interval=top.get("rescan_interval", 300.0, parse_duration, "a duration like 5m"),
        shutdown_deadline=top.get("shutdown_deadline", 30.0, parse_duration, "a duration like 30s"),
        metrics=metrics,
    )
    if state_dir and not Path(state_dir).is_absolute():
        problems.add("state_dir", "must be an absolute path")
    if problems.items:
        raise ConfigError(source, problems.items)
    return config


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(str(p), [f"cannot read the config: {exc.strerror or exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise ConfigError(str(p), [f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}"]) from None
    return parse_config(data, str(p))
