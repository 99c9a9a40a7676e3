"""YAML config -> validated, frozen policy objects. Every problem is reported at once, with its key path.

Shape (contract, DESIGN.md §3): ``state_dict``, ``log``, ``watches[]``, ``policies{}``; unknown keys are errors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from ckptd.daemon.config_checks import (
    Problems,
    Section,
    check_bool,
    check_choice,
    check_commands,
    check_formats,
    check_int,
    check_listen,
    check_mapping,
    check_regex_safe_sources,
    check_shape,
    check_str,
    check_str_list,
)
from ckptd.errors import ConfigError
from ckptd.metric_sources import ValueSource, parse_source
from ckptd.units import parse_duration

DEFAULT_METRIC_SOURCES = (
    {"checkpoint": "metric"},
    {"filename": r"score_(?P<metric>[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"},
)
DEFAULT_STEP_SOURCES = (
    {"checkpoint": "iterations"}, {"checkpoint": "global_step"}, {"checkpoint": "step"},
    {"trainer_state": "global_step"},
    {"filename": r"(?:step|checkpoint)[=_-]?(?P<step>[0-9]+)"},
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


def _policy(name: str, data: Any, problems: Problems) -> Policy:
    path = f"policies.{name}"
    sec = Section(data, path, problems, ("weights", "metric", "step", "average", "model_only", "export", "hooks",
                                          "retention"))
    w = Section(sec.data.get("weights"), f"{path}.weights", problems,
                 ("key", "strip_prefixes", "prefer_ema", "allow_globals"))
    weights = WeightsPolicy(
        key=w.get("key", "auto", check_str, "a key path or 'auto'"),
        strip_prefixes=w.get("strip_prefixes", WeightsPolicy.strip_prefixes, check_str_list, "a list of prefixes"),
        prefer_ema=w.get("prefer_ema", False, check_bool, "true or false"),
        allow_globals=w.get("allow_globals", (), check_str_list, "a list of dotted names"),
    )
    m = Section(sec.data.get("metric"), f"{path}.metric", problems, ("mode", "sources"))
    metric = MetricPolicy(
        mode=m.get("mode", "max", check_choice("max", "min"), "max or min"),
        sources=m.get("sources", tuple(parse_source(s) for s in DEFAULT_METRIC_SOURCES), check_regex_safe_sources,
                      "a list of sources like {checkpoint: key.path}, {filename: REGEX}, {sidecar: '{stem}.json'}"),
    )
    s = Section(sec.data.get("step"), f"{path}.step", problems, ("sources",))
    step_sources = s.get("sources", tuple(parse_source(x) for x in DEFAULT_STEP_SOURCES), check_regex_safe_sources,
                         "a list of sources")
    for i, src in enumerate(metric.sources):
        if src.kind == "filename" and "(?P<metric>" not in src.spec and re.compile(src.spec).groups == 0:
            problems.add(f"{path}.metric.sources[{i}]", "the filename regex needs a group, ideally (?P<metric>...)")
    a = Section(sec.data.get("average"), f"{path}.average", problems, ("top_k", "min_members", "dtype"))
    average = AveragePolicy(
        top_k=a.get("top_k", 5, check_int(1), "an integer >= 1"),
        min_members=a.get("min_members", 2, check_int(1), "an integer >= 1"),
        dtype=a.get("dtype", "keep", check_choice(*DTYPES), " or ".join(DTYPES)),
    )
    if average.min_members > average.top_k:
        problems.add(f"{path}.average.min_members", f"cannot exceed top_k ({average.top_k})")
    mo = Section(sec.data.get("model_only"), f"{path}.model_only", problems, ("dtype", "formats"))
    model_only = ModelOnlyPolicy(
        dtype=mo.get("dtype", "keep", check_choice(*DTYPES), " or ".join(DTYPES)),
        formats=mo.get("formats", ("safetensors",), check_formats, "a list of safetensors and/or pt"),
    )
    ex = Section(sec.data.get("export"), f"{path}.export", problems, ("coreml",))
    coreml = _coreml(ex.data.get("coreml"), f"{path}.export.coreml", problems)
    h = Section(sec.data.get("hooks"), f"{path}.hooks", problems,
                 ("on_new_best", "on_average", "on_export", "timeout"))
    hooks = HooksPolicy(
        on_new_best=h.get("on_new_best", (), check_commands, "a list of argv lists, e.g. [[notify, --best]]"),
        on_average=h.get("on_average", (), check_commands, "a list of argv lists"),
        on_export=h.get("on_export", (), check_commands, "a list of argv lists"),
        timeout=h.get("timeout", 60.0, parse_duration, "a duration like 30s"),
    )
    rt = Section(sec.data.get("retention"), f"{path}.retention", problems, ("enabled", "keep_last", "min_age",
                                                                              "dry_run"))
    retention = RetentionPolicy(
        enabled=rt.get("enabled", False, check_bool, "true or false"),
        keep_last=rt.get("keep_last", 3, check_int(1), "an integer >= 1"),
        min_age=rt.get("min_age", 3600.0, parse_duration, "a duration like 1h"),
        dry_run=rt.get("dry_run", False, check_bool, "true or false"),
    )
    return Policy(name=name, weights=weights, metric=metric, step_sources=step_sources, average=average,
                  model_only=model_only, coreml=coreml, hooks=hooks, retention=retention)


def _coreml(data: Any, path: str, problems: Problems) -> CoremlPolicy:
    sec = Section(data, path, problems, (
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
        s = Section(item, f"{path}.inputs[{i}]", problems,
                     ("name", "shape", "kind", "dtype", "scale", "bias", "color_layout", "enumerated_shapes"))
        inputs.append(InputSpec(
            name=s.required("name", check_str, "a name") or f"input_{i}",
            shape=s.required("shape", check_shape, "a list of positive ints or [min, max] ranges") or (1,),
            kind=s.get("kind", "tensor", check_choice("tensor", "image"), "tensor or image"),
            dtype=s.get("dtype", "float32", check_choice("float32", "float16", "int32"), "float32, float16 or int32"),
            scale=s.get("scale", 1.0, float, "a number"),
            bias=s.get("bias", (), lambda v: tuple(float(x) for x in v), "a list of numbers"),
            color_layout=s.get("color_layout", "RGB", check_choice("RGB", "BGR", "G"), "RGB, BGR or G"),
            enumerated_shapes=s.get("enumerated_shapes", (), lambda v: tuple(tuple(check_shape(x)) for x in v),
                                    "a list of shapes"),
        ))
    factory = sec.get("factory", "", check_str, "'package.module:callable'")
    policy = CoremlPolicy(
        enabled=sec.get("enabled", True, check_bool, "true or false"),
        source=sec.get("source", "best", check_choice("best", "average"), "best or average"),
        factory=factory,
        factory_kwargs=MappingProxyType(dict(sec.get("factory_kwargs", {}, check_mapping, "a mapping"))),
        python_path=sec.get("python_path", (), check_str_list, "a list of directories"),
        inputs=tuple(inputs),
        outputs=sec.get("outputs", (), check_str_list, "a list of output names"),
        precision=sec.get("precision", "float16", check_choice("float16", "float32"), "float16 or float32"),
        minimum_deployment_target=sec.get("minimum_deployment_target", "iOS17", check_str, "a target like iOS17"),
        timeout=sec.get("timeout", 600.0, parse_duration, "a duration like 10m"),
        keep=sec.get("keep", 3, check_int(1), "an integer >= 1"),
        compression=sec.get("compression", "none", check_choice("none", "int8", "palettize4", "palettize8"),
                            "none, int8, palettize4 or palettize8"),
        publish_partial=sec.get("publish_partial", False, check_bool, "true or false"),
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


def _watch(i: int, data: Any, problems: Problems, policies: Mapping[str, Any]) -> Watch | None:
    path = f"watches[{i}]"
    sec = Section(data, path, problems, ("name", "root", "runs", "include", "exclude", "mode", "poll_interval",
                                          "settle", "output", "policy", "max_depth", "allow_output_in_root"))
    name = sec.required("name", check_str, "a name")
    root = sec.required("root", check_str, "a directory path")
    output = sec.required("output", check_str, "a path template like /srv/ckptd/{watch}/{run}")
    defaults = Watch(name="", root=Path("."))
    watch = Watch(
        name=name or f"watch{i}",
        root=Path(root or "."),
        runs=sec.get("runs", "*", check_str, "a glob of run directories or '.'"),
        include=sec.get("include", defaults.include, check_str_list, "a list of globs"),
        exclude=tuple(dict.fromkeys(TEMP_EXCLUDES + sec.get("exclude", (), check_str_list, "a list of globs"))),
        mode=sec.get("mode", "auto", check_choice("auto", "events", "poll"), "auto, events or poll"),
        poll_interval=sec.get("poll_interval", 30.0, parse_duration, "a duration like 30s"),
        settle=sec.get("settle", 5.0, parse_duration, "a duration like 30s"),
        output=output or "",
        policy=sec.get("policy", "default", check_str, "a policy name"),
        max_depth=sec.get("max_depth", 3, check_int(0), "an integer >= 0"),
        allow_output_in_root=sec.get("allow_output_in_root", False, check_bool, "true or false"),
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
    problems = Problems()
    top = Section(data, "", problems, ("state_dir", "log", "watches", "policies", "max_parallel_runs",
                                        "rescan_interval", "shutdown_deadline", "metrics"))
    mt = Section(top.data.get("metrics"), "metrics", problems, ("listen", "textfile"))
    metrics = MetricsConfig(listen=mt.get("listen", "", check_listen, "host:port, e.g. 127.0.0.1:9478"),
                            textfile=mt.get("textfile", "", lambda v: "" if v in ("", None) else check_str(v),
                                            "a file path ending in .prom"))
    if metrics.textfile and (not metrics.textfile.endswith(".prom") or not Path(metrics.textfile).is_absolute()):
        problems.add("metrics.textfile", "must be an absolute path ending in .prom")
    state_dir = top.required("state_dir", check_str, "a directory path")
    lg = Section(top.data.get("log"), "log", problems, ("format", "level"))
    log = LogConfig(format=lg.get("format", "auto", check_choice("auto", "json", "console"), "auto, json or console"),
                    level=lg.get("level", "info", check_choice("debug", "info", "warning", "error"),
                                 "debug, info, warning or error"))
    raw_policies = top.data.get("policies") or {}
    if not isinstance(raw_policies, Mapping):
        problems.add("policies", "expected a mapping of policy names to policies")
        raw_policies = {}
    policies = {str(n): _policy(str(n), p, problems) for n, p in raw_policies.items()}
    policies.setdefault("default", _policy("default", {}, Problems()))
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
        max_parallel_runs=top.get("max_parallel_runs", 2, check_int(1), "an integer >= 1"),
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
