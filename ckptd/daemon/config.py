"""YAML config -> validated, frozen policy objects. Every problem is reported at once, with its key path.

Shape (contract, DESIGN.md §3): ``state_dict``, ``log``, ``watches[]``, ``policies{}``; unknown keys are errors.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
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
    check_regex_safe_sources,
    check_str,
    check_str_list,
)
from ckptd.daemon.config_coreml import (  # noqa: F401 (re-exported)
    EXPORT_KEYS,
    CoremlPolicy,
    InputSpec,
    check_queue_needs,
    parse_coreml,
    with_executor,
)
from ckptd.daemon.config_evaluate import (
    STRATEGIES,
    EvaluatePolicy,
    check_evaluation_needs,
    check_margin,
    parse_evaluate,
)
from ckptd.daemon.ledger_db import LEDGER_NAME, is_pg
from ckptd.daemon.ledger_db import check_target as check_ledger_target
from ckptd.errors import ConfigError
from ckptd.metric_sources import ValueSource, parse_source
from ckptd.remote.urls import EXTRAS, is_remote, local_path, scheme
from ckptd.remote.watch_config import (
    check_local_only,
    check_outputs,
    check_retain_grace,
    check_url,
    mirrored_root,
    remote_watch,
)
from ckptd.trainers import PRESETS, STREAM_NAMES, TRAINERS, PlanSettings, RunPlan, plan_run
from ckptd.trainers.presets import PLAIN_INCLUDE, PLAIN_METRIC, PLAIN_STEP
from ckptd.units import parse_duration

# the generic defaults are the plain preset's (one source of truth: ckptd/trainers/presets.py)
DEFAULT_METRIC_SOURCES = PLAIN_METRIC
DEFAULT_STEP_SOURCES = PLAIN_STEP
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
    name: str = ""  # the metric as the user knows it; the trainer preset says where it lives


@dataclass(frozen=True)
class AveragePolicy:
    top_k: int = 5
    min_members: int = 2
    dtype: str = "keep"
    strategy: str = "uniform"  # or greedy (a greedy soup, evaluated)
    gate: bool = False  # uniform: publish a new average only when it evaluates at least as well as the best
    margin: float = 0.0  # how much worse than the best member a gated average may evaluate and still win

    @property
    def evaluated(self) -> bool:
        """Is the published average decided by evaluations (not published as soon as the top-k changes)?"""
        return self.gate or self.strategy == "greedy"


@dataclass(frozen=True)
class ModelOnlyPolicy:
    dtype: str = "keep"
    formats: tuple[str, ...] = ("safetensors",)


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
    """``metrics:``. ``listen`` (``host:port``, off when empty) serves ``/metrics`` and, by default only on a
    loopback address, the read-only status page (``/``, ``/run``). ``status_page``: ``auto`` (None, the default:
    served when ``listen`` is a loopback address such as 127.0.0.1 or [::1], else only /metrics), ``true`` (served on
    any address: anyone who can reach the port sees run names, metrics and reasons), ``false`` (never served). The
    listener answers only requests whose Host is localhost, 127.0.0.1, [::1], the configured host or (on a
    non-loopback address) an IP address or the machine's hostname/FQDN: anything else is 421 (DNS rebinding)."""

    listen: str = ""
    textfile: str = ""
    status_page: bool | None = None  # None: auto


@dataclass(frozen=True)
class Policy:
    name: str
    weights: WeightsPolicy = WeightsPolicy()
    metric: MetricPolicy = MetricPolicy()
    step_sources: tuple[ValueSource, ...] = ()
    average: AveragePolicy = AveragePolicy()
    model_only: ModelOnlyPolicy = ModelOnlyPolicy()
    coreml: CoremlPolicy = field(default_factory=CoremlPolicy)
    evaluate: EvaluatePolicy = field(default_factory=EvaluatePolicy)
    hooks: HooksPolicy = HooksPolicy()
    retention: RetentionPolicy = RetentionPolicy()
    streams_off: tuple[str, ...] = ()  # streams: {ema: false}
    explicit: frozenset[str] = frozenset()  # keys the user set ("metric.sources", "weights.key", …): they win


@dataclass(frozen=True)
class Watch:
    name: str
    root: Path
    runs: str = "*"
    include: tuple[str, ...] = PLAIN_INCLUDE
    exclude: tuple[str, ...] = TEMP_EXCLUDES
    mode: str = "auto"
    poll_interval: float = 30.0
    settle: float = 5.0
    output: str = ""
    policy: str = "default"
    max_depth: int = 3
    allow_output_in_root: bool = False
    trainer: str = "auto"  # a preset name (ckptd/trainers/presets.py) or auto
    explicit: frozenset[str] = frozenset()  # keys the user set ("include"): they win over the preset
    # ``output: s3://bucket/out/{run}``: the URL template (``output`` is then the local staging template
    # ``<state_dir>/staging/<watch>/{run}``, published to the URL by ckptd.daemon.remote_publish)
    remote_output: str = ""
    # fsspec options of the watch's object store (root and output), e.g. {endpoint_url: ...}; never logged
    storage_options: Mapping[str, Any] = field(default_factory=dict, hash=False, repr=False)
    # ``root: s3://bucket/prefix``: the URL (``root`` is then the mirror ``<state_dir>/mirror/<watch>``, see
    # ckptd.remote.mirror; the mode is poll) and the SQS queue whose notifications trigger earlier listings
    remote: str = ""
    sqs_queue: str = ""
    # object-store outputs: superseded objects stay at least this long (and one publication) for slow readers
    retain_grace: float = 60.0

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
    ledger: str = ""  # a postgresql:// URL or a SQLite file path; parse_config fills in state_dir/ledger.sqlite3
    lease_ttl: float = 30.0  # seconds a run's lease lasts without a heartbeat (several daemons, one ledger)

    def policy_for(self, watch: Watch) -> Policy:
        return self.policies[watch.policy]


def _policy(name: str, data: Any, problems: Problems) -> Policy:
    path = f"policies.{name}"
    sec = Section(data, path, problems, ("weights", "metric", "step", "average", "model_only", "export", "hooks",
                                          "retention", "streams", "evaluate"))
    w = Section(sec.data.get("weights"), f"{path}.weights", problems,
                 ("key", "strip_prefixes", "prefer_ema", "allow_globals"))
    weights = WeightsPolicy(
        key=w.get("key", "auto", check_str, "a key path or 'auto'"),
        strip_prefixes=w.get("strip_prefixes", WeightsPolicy.strip_prefixes, check_str_list, "a list of prefixes"),
        prefer_ema=w.get("prefer_ema", False, check_bool, "true or false"),
        allow_globals=w.get("allow_globals", (), check_str_list, "a list of dotted names"),
    )
    m = Section(sec.data.get("metric"), f"{path}.metric", problems, ("name", "mode", "sources"))
    metric = MetricPolicy(
        name=m.get("name", "", check_str, "the metric's name, e.g. eval_loss or val_acc"),
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
    a = Section(sec.data.get("average"), f"{path}.average", problems, ("top_k", "min_members", "dtype", "strategy",
                                                                         "gate", "margin"))
    average = AveragePolicy(
        top_k=a.get("top_k", 5, check_int(1), "an integer >= 1"),
        min_members=a.get("min_members", 2, check_int(1), "an integer >= 1"),
        dtype=a.get("dtype", "keep", check_choice(*DTYPES), " or ".join(DTYPES)),
        strategy=a.get("strategy", "uniform", check_choice(*STRATEGIES), " or ".join(STRATEGIES)),
        gate=a.get("gate", False, check_bool, "true or false"),
        margin=a.get("margin", 0.0, check_margin, "a number (how much worse than the best the average may be)"),
    )
    if average.min_members > average.top_k:
        problems.add(f"{path}.average.min_members", f"cannot exceed top_k ({average.top_k})")
    mo = Section(sec.data.get("model_only"), f"{path}.model_only", problems, ("dtype", "formats"))
    model_only = ModelOnlyPolicy(
        dtype=mo.get("dtype", "keep", check_choice(*DTYPES), " or ".join(DTYPES)),
        formats=mo.get("formats", ("safetensors",), check_formats, "a list of safetensors and/or pt"),
    )
    ex = Section(sec.data.get("export"), f"{path}.export", problems, EXPORT_KEYS)
    coreml = with_executor(parse_coreml(ex.data.get("coreml"), f"{path}.export.coreml", problems), ex)
    evaluate = parse_evaluate(sec.data.get("evaluate"), f"{path}.evaluate", problems)
    check_evaluation_needs(path, evaluate, average.strategy, average.gate, coreml.source, problems)
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
    st = Section(sec.data.get("streams"), f"{path}.streams", problems, STREAM_NAMES)
    streams_off = tuple(n for n in STREAM_NAMES if not st.get(n, True, check_bool, "true or false"))
    if streams_off == STREAM_NAMES:
        problems.add(f"{path}.streams", "switches every stream off; keep at least one")
    explicit = frozenset(f"{part}.{key}" for part in ("weights", "metric", "step")
                         if isinstance(sec.data.get(part), Mapping) for key in sec.data[part])
    return Policy(name=name, weights=weights, metric=metric, step_sources=step_sources, average=average,
                  model_only=model_only, coreml=coreml, evaluate=evaluate, hooks=hooks, retention=retention,
                  streams_off=streams_off, explicit=explicit)


def _watch(i: int, data: Any, problems: Problems, policies: Mapping[str, Any],
           check_paths: bool = True) -> Watch | None:
    path = f"watches[{i}]"
    sec = Section(data, path, problems, ("name", "root", "runs", "include", "exclude", "mode", "poll_interval",
                                          "settle", "output", "policy", "max_depth", "allow_output_in_root",
                                          "trainer", "storage_options", "events", "retain_grace"))
    name = sec.required("name", check_str, "a name")
    root = sec.required("root", check_str, "a directory path")
    root = local_path(root) if root else root  # file:///srv/train is a plain path
    output = sec.required("output", check_str, "a path template like /srv/ckptd/{watch}/{run}")
    output = local_path(output) if output else output  # file:///srv/out/{run} is a plain path
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
        trainer=sec.get("trainer", "auto", check_choice(*TRAINERS), " | ".join(TRAINERS)),
        explicit=frozenset(k for k in ("include",) if k in sec.data),
        storage_options=sec.get("storage_options", {}, _check_options, "a mapping of fsspec options"),
        retain_grace=sec.get("retain_grace", 60.0, parse_duration, "a duration like 60s"),
    )
    check_retain_grace(watch, sec.data, path, problems)
    if name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        problems.add(f"{path}.name", "use letters, digits, '.', '_' or '-' (it is used in paths)")
    if root and is_remote(root):  # listed through a mirror; nothing is listed (no network) at config time
        _check_store(root, f"{path}.root", problems)
        watch = remote_watch(watch, root, sec.data, path, problems)
    else:
        check_local_only(sec.data, path, problems)
    if root and not watch.remote:
        if not Path(root).is_absolute():
            problems.add(f"{path}.root", f"must be an absolute path, not {root!r}")
        elif check_paths and not Path(root).is_dir():
            problems.add(f"{path}.root", f"directory {root} does not exist")
    if output:
        placeholders = set(re.findall(r"{([^}]*)}", output))
        if placeholders - {"watch", "run"}:
            problems.add(f"{path}.output", f"only {{watch}} and {{run}} may be used, not {sorted(placeholders)}")
        if watch.runs != "." and "run" not in placeholders:
            problems.add(f"{path}.output", "must contain {run} when runs is a glob (each run needs its own outputs)")
        if is_remote(output):
            check_url(output, f"{path}.output", problems)
            _check_store(output, f"{path}.output", problems)
        elif not Path(output).is_absolute():
            problems.add(f"{path}.output", "must be an absolute path template")
        elif root and not watch.remote and not watch.allow_output_in_root:
            out_root = Path(output.split("{", 1)[0]).resolve()
            if out_root == Path(root).resolve() or Path(root).resolve() in out_root.parents:
                problems.add(f"{path}.output", "is inside the training root; set allow_output_in_root: true if meant")
    if watch.policy not in policies and watch.policy != "default":
        problems.add(f"{path}.policy", f"no policy named {watch.policy!r} (defined: {', '.join(policies) or 'none'})")
    return watch


def _check_options(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError("expected a mapping")
    return {str(k): v for k, v in value.items()}


def _check_store(url: str, key: str, problems: Problems) -> None:
    """An object-store URL needs its fsspec package (found without importing it: config checks stay fast)."""
    extra = EXTRAS.get(scheme(url) or "")
    module = {"s3": "s3fs", "gcs": "gcsfs"}.get(extra or "")
    if module and importlib.util.find_spec(module) is None:
        problems.add(key, f"{scheme(url)}:// needs the object-store support: pip install 'ckptd[{extra}]'")


def _staged_output(watch: Watch, state_dir: Path) -> Watch:
    """An object-store ``output`` is staged locally (generations and links as for a local output) and published
    from there: the pipeline sees the staging template, ``remote_output`` keeps the URL."""
    if not is_remote(watch.output):
        return watch
    staging = str(state_dir / "staging" / watch.name / "{run}")
    return replace(watch, output=staging, remote_output=watch.output)


def _check_trainer_needs(i: int, watch: Watch, policies: Mapping[str, Policy], problems: Problems) -> None:
    """A preset whose trainer logs several metrics (HF, Lightning) needs ``metric.name`` unless the policy
    gives explicit ``metric.sources``; the problem is reported at the policy key, naming the watch."""
    policy = policies.get(watch.policy)
    preset = PRESETS.get(watch.trainer)
    if policy is None or preset is None or not preset.needs_name:
        return
    if not policy.metric.name and "metric.sources" not in policy.explicit:
        problems.add(f"policies.{policy.name}.metric.name",
                     f"is required by watches[{i}] (trainer: {watch.trainer}): {preset.needs_name}")


def plan_settings(watch: Watch, policy: Policy) -> PlanSettings:
    """What the user set explicitly for this watch and policy, for :func:`ckptd.trainers.plan_run`."""
    ex = policy.explicit
    return PlanSettings(
        trainer=watch.trainer,
        include=watch.include if "include" in watch.explicit else None,
        exclude=watch.exclude,
        max_depth=watch.max_depth,
        metric_name=policy.metric.name,
        metric_sources=policy.metric.sources if "metric.sources" in ex else None,
        step_sources=policy.step_sources if "step.sources" in ex else None,
        weights_key=policy.weights.key if "weights.key" in ex else None,
        prefer_ema=policy.weights.prefer_ema if "weights.prefer_ema" in ex else None,
        streams_off=policy.streams_off,
        allow_globals=policy.weights.allow_globals,
        where=f"policies.{policy.name}",
    )


def run_plan(watch: Watch, policy: Policy, run_dir: Path) -> RunPlan:
    """The trainer plan of one run (detects the trainer when ``trainer: auto``): what the daemon calls per run."""
    return plan_run(run_dir, plan_settings(watch, policy))


def parse_config(data: Any, source: str = "<config>", *, check_paths: bool = True) -> Config:
    """Validate a parsed YAML tree; raises ConfigError listing every problem.

    ``check_paths=False`` skips the checks that ask the filesystem (does each watch root exist?) and keeps every
    structural one: for the read-only commands (``ckptd status``, ``ckptd history``), which must answer while a
    watch root is away (an unmounted share)."""
    problems = Problems()
    top = Section(data, "", problems, ("state_dir", "log", "watches", "policies", "max_parallel_runs",
                                        "rescan_interval", "shutdown_deadline", "metrics", "ledger",
                                        "lease_ttl"))
    mt = Section(top.data.get("metrics"), "metrics", problems, ("listen", "textfile", "status_page"))
    metrics = MetricsConfig(listen=mt.get("listen", "", check_listen, "host:port, e.g. 127.0.0.1:9478"),
                            textfile=mt.get("textfile", "", lambda v: "" if v in ("", None) else check_str(v),
                                            "a file path ending in .prom"),
                            status_page=mt.get("status_page", None,  # auto: None
                                                lambda v: None if v in (None, "auto") else check_bool(v),
                                                "true, false or auto"))
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
    watches = [w for i, item in enumerate(raw_watches)
               if (w := _watch(i, item, problems, raw_policies, check_paths))]
    watches = [_staged_output(w, Path(state_dir or ".")) for w in watches]
    watches = [mirrored_root(w, Path(state_dir or ".")) for w in watches]
    check_outputs(watches, problems)
    for i, w in enumerate(watches):
        _check_trainer_needs(i, w, policies, problems)
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
        ledger=(top.get("ledger", "", check_ledger_target, "a postgresql://user@host/db URL or an absolute path")
                or str(Path(state_dir or ".") / LEDGER_NAME)),
        lease_ttl=top.get("lease_ttl", 30.0, parse_duration, "a duration like 30s"),
    )
    if config.lease_ttl <= 0:
        problems.add("lease_ttl", "must be longer than 0s")
    check_queue_needs({n: p.coreml for n, p in policies.items()}, is_pg(config.ledger), problems)
    if state_dir and not Path(state_dir).is_absolute():
        problems.add("state_dir", "must be an absolute path")
    if problems.items:
        raise ConfigError(source, problems.items)
    return config


def load_config(path: str | Path, *, check_paths: bool = True) -> Config:
    """Read and validate a YAML config file (``check_paths``: see :func:`parse_config`)."""
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
    return parse_config(data, str(p), check_paths=check_paths)
