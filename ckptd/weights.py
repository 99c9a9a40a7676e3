"""Open any supported checkpoint and get its model-only weights, lazily; write them out with provenance.

This is the one entry point both the CLI and the daemon use to read a checkpoint. Tensors come back mapped
(zip files via ``torch.load(mmap=True)``, safetensors via our own zero-copy reader), so callers only pay for the
bytes they touch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckptd import __version__
from ckptd.atomic import atomic_torch_save
from ckptd.errors import CheckpointError, WeightsNotFoundError
from ckptd.formats import CheckpointFormat, detect_format, hf_index_file, hf_shard_files
from ckptd.layouts import DEFAULT_STRIP_PREFIXES, find_model_weights
from ckptd.safe_load import load_dcp, load_torch
from ckptd.safetensors_io import open_safetensors, save_safetensors


@dataclass
class Checkpoint:
    """A checkpoint opened for reading. ``obj`` is the whole loaded object (for metric/step lookup)."""

    path: Path
    format: CheckpointFormat
    obj: Any
    weights: dict[str, torch.Tensor]
    key: str = ""
    layout: str = ""
    stripped: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)


def open_checkpoint(
    path: str | Path,
    *,
    key: str = "auto",
    prefer_ema: bool = False,
    strip_prefixes: Sequence[str] = DEFAULT_STRIP_PREFIXES,
    allow_globals: Sequence[str | Any] = (),
    map_location: Any = "cpu",
) -> Checkpoint:
    """Load ``path`` safely and locate its model weights. Raises :class:`CheckpointError` subclasses."""
    p = Path(path)
    fmt, obj, metadata = load_object(p, allow_globals=allow_globals, map_location=map_location)
    try:
        found = find_model_weights(obj, key=key, prefer_ema=prefer_ema, strip=strip_prefixes)
    except LookupError as exc:
        raise WeightsNotFoundError(p, str(exc)) from None
    return Checkpoint(path=p, format=fmt, obj=obj, weights=found.state, key=found.key, layout=found.layout,
                      stripped=found.stripped, metadata=metadata)


def load_object(path: str | Path, *, allow_globals: Sequence[str | Any] = (),
                map_location: Any = "cpu") -> tuple[CheckpointFormat, Any, dict[str, str]]:
    """(format, the whole loaded object, safetensors metadata) for any supported checkpoint, loaded safely."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt in (CheckpointFormat.TORCH_ZIP, CheckpointFormat.TORCH_LEGACY):
        return fmt, load_torch(p, allow_globals=allow_globals, map_location=map_location), {}
    if fmt is CheckpointFormat.SAFETENSORS:
        mapped = open_safetensors(p)
        return fmt, mapped.tensors, mapped.metadata
    if fmt is CheckpointFormat.HF_SHARDED:
        return fmt, _load_hf_sharded(p, allow_globals, map_location), {}
    return fmt, load_dcp(p), {}


def _load_hf_sharded(directory: Path, allow_globals: Sequence[str | Any], map_location: Any) -> dict[str, Any]:
    merged: dict[str, torch.Tensor] = {}
    for shard in hf_shard_files(directory):
        if detect_format(shard) is CheckpointFormat.SAFETENSORS:
            part: Mapping[str, Any] = open_safetensors(shard).tensors
        else:
            part = load_torch(shard, allow_globals=allow_globals, map_location=map_location)
        for name, tensor in part.items():
            if name in merged:
                raise CheckpointError(directory, f"tensor {name!r} appears in more than one shard")
            merged[name] = tensor
    index = hf_index_file(directory)
    assert index is not None
    expected = set(json.loads(index.read_text())["weight_map"])
    missing = expected - set(merged)
    if missing:
        raise CheckpointError(directory, f"shards lack tensors listed in {index.name}: {sorted(missing)[:5]}")
    return merged


def file_sha256(path: str | Path, chunk: int = 8 << 20, progress: Callable[[int, int], None] | None = None) -> str:
    """sha256 of a file, or of a folder (sorted relative names and their contents)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    total, done = sum(f.stat().st_size for f in files), 0
    for f in files:
        if f is not p:
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
                done += len(block)
                if progress is not None:
                    progress(done, total)
    return h.hexdigest()


def provenance_metadata(source: str | Path | None = None, *, sha256: str | None = None, metric: float | None = None,
                        step: int | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """String metadata carried in every safetensors file ckptd writes."""
    md = {"format": "pt", "ckptd_version": __version__}
    if source is not None:
        md["source"] = str(source)
    if sha256 is not None:
        md["source_sha256"] = sha256
    if metric is not None:
        md["metric"] = repr(float(metric))
    if step is not None:
        md["step"] = str(int(step))
    for k, v in (extra or {}).items():
        md[str(k)] = str(v)
    return md


def cast_floating(weights: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Cast floating tensors to ``dtype`` (None keeps each tensor's own dtype); others stay as they are."""
    if dtype is None:
        return dict(weights)
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in weights.items()}


def write_weights(path: str | Path, weights: Mapping[str, torch.Tensor], *,
                  metadata: Mapping[str, str] | None = None, fmt: str | None = None,
                  progress: Callable[[int, int], None] | None = None) -> Path:
    """Atomically write model-only weights as safetensors (default) or a ``.pt`` torch file."""
    p = Path(path)
    fmt = fmt or ("pt" if p.suffix in (".pt", ".pth", ".bin", ".ckpt") else "safetensors")
    if fmt == "safetensors":
        save_safetensors(p, weights, metadata, progress=progress)
    elif fmt == "pt":
        atomic_torch_save({k: v.detach().contiguous().clone() for k, v in weights.items()}, p)
    else:
        raise ValueError(f"unknown weights format {fmt!r} (safetensors or pt)")
    return p


def extract_weights(source: str | Path, output: str | Path, *, key: str = "auto", prefer_ema: bool = False,
                    strip_prefixes: Sequence[str] = DEFAULT_STRIP_PREFIXES, dtype: torch.dtype | None = None,
                    allow_globals: Sequence[str | Any] = (), metric: float | None = None, step: int | None = None,
                    hash_source: bool = True, progress: Callable[[str, int, int], None] | None = None) -> Checkpoint:
    """Write the model-only weights of ``source`` to ``output`` with provenance metadata.
    ``progress(phase, done, total)`` is called while hashing and writing."""
    ckpt = open_checkpoint(source, key=key, prefer_ema=prefer_ema, strip_prefixes=strip_prefixes,
                           allow_globals=allow_globals)
    hashing = (lambda d, t: progress("hashing", d, t)) if progress else None
    writing = (lambda d, t: progress("writing", d, t)) if progress else None
    sha = file_sha256(source, progress=hashing) if hash_source else None
    md = provenance_metadata(Path(source).resolve(), sha256=sha, metric=metric, step=step,
                             extra={"layout": ckpt.layout, "key": ckpt.key or "."})
    write_weights(output, cast_floating(ckpt.weights, dtype), metadata=md, progress=writing)
    return ckpt
