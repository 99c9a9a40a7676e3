"""The ``export.coreml`` section of a policy: its frozen policy objects and their validation.

Split from ``config.py`` to keep modules small; ``ckptd.daemon.config`` re-exports everything here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from ckptd.daemon.config_checks import (
    Problems,
    Section,
    check_bool,
    check_choice,
    check_int,
    check_mapping,
    check_shape,
    check_str,
    check_str_list,
)
from ckptd.units import parse_duration


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
    executor: str = "local"  # policies.<p>.export.executor: local (a child of the daemon) | queue (ckptd worker)
    capability: str = ""  # policies.<p>.export.capability: "" (any worker) | macos (CoreML predict parity)


EXECUTORS = ("local", "queue")
CAPABILITIES = ("", "macos")
EXPORT_KEYS = ("coreml", "executor", "capability")  # the keys of policies.<p>.export


def with_executor(policy: CoremlPolicy, export: Section) -> CoremlPolicy:
    """``policies.<p>.export.executor`` and ``.capability`` (siblings of ``coreml``): where the export runs."""
    executor = export.get("executor", "local", check_choice(*EXECUTORS),
                          "local (a child process of the daemon) or queue (a `ckptd worker`, needs a PostgreSQL "
                          "ledger)")
    capability = export.get("capability", "", lambda v: check_choice(*CAPABILITIES)("" if v is None else v),
                            "'' (any worker) or macos (a `ckptd worker --capability macos`)")
    if capability and executor != "queue":
        export.problems.add(export.key("capability"), "only applies to executor: queue (workers have capabilities)")
    return replace(policy, executor=executor, capability=capability)


def check_queue_needs(policies: Mapping[str, CoremlPolicy], ledger_is_pg: bool, problems: Problems) -> None:
    """``executor: queue`` needs the PostgreSQL ledger: the queue (procrastinate) lives in that database."""
    if ledger_is_pg:
        return
    for name, policy in policies.items():
        if policy.enabled and policy.executor == "queue":
            problems.add(f"policies.{name}.export.executor",
                         "queue needs a PostgreSQL ledger (top-level `ledger: postgresql://user@host:port/db`): "
                         "the export queue lives in that database, shared by the daemons and `ckptd worker`")


def parse_coreml(data: Any, path: str, problems: Problems) -> CoremlPolicy:
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
        source=sec.get("source", "best", check_choice("best", "average", "winner"),
                       "best, average or winner (whichever of the two evaluated better)"),
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
