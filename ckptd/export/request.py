"""What an export needs, as plain JSON-able data (it crosses into the export subprocess)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TOLERANCES = {"float32": 1e-4, "float16": 5e-3}
# weight compression changes the numbers on purpose; parity is checked against these looser bounds
COMPRESSION_TOLERANCES = {"int8": 3e-2, "palettize8": 3e-2, "palettize4": 2e-1}


@dataclass
class ExportRequest:
    weights: str
    factory: str
    output: str  # where the worker saves the .mlpackage (a staging path)
    inputs: list[dict[str, Any]]
    factory_kwargs: dict[str, Any] = field(default_factory=dict)
    python_path: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    precision: str = "float16"
    minimum_deployment_target: str = "iOS17"
    compression: str = "none"
    metadata: dict[str, str] = field(default_factory=dict)
    author: str = ""
    version: str = ""
    description: str = ""
    verify_weights: str = ""  # verify against these weights instead (negative controls); "" = the same
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ExportRequest:
        return cls(**json.loads(text))

    @property
    def tolerance(self) -> float:
        if self.compression != "none":
            return COMPRESSION_TOLERANCES[self.compression]
        return TOLERANCES[self.precision]


@dataclass
class ExportResult:
    status: str  # ok | partial | failed
    reason: str = ""
    package: str = ""
    capture: str = ""
    verification: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ExportResult:
        return cls(**json.loads(text))

    @classmethod
    def read(cls, path: Path) -> ExportResult:
        return cls.from_json(path.read_text())
