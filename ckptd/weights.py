"""Open any supported checkpoint and get its model-only weights; write them out with provenance.

This is the one entry point both the CLI and the daemon use to read a checkpoint. :mod:`ckptd.reader` does the
work: ordinary reads (never a memory map of a trainer's file), only the model's bytes, and a content hash of them.
:func:`open_checkpoint` is the one-call form that returns a :class:`Checkpoint` with real tensors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckptd import __version__
from ckptd.atomic import atomic_torch_save
from ckptd.formats import CheckpointFormat
from ckptd.layouts import DEFAULT_STRIP_PREFIXES
from ckptd.reader import read_checkpoint
from ckptd.safetensors_io import save_safetensors


@dataclass
class Checkpoint:
    """A checkpoint read for its weights. ``obj`` is the whole loaded object (for metric/step lookup; tensors
    other than the weights may be ``meta`` placeholders); ``weights`` are real CPU tensors; ``content_sha256``
    identifies them (see :func:`ckptd.reader.content_sha256`)."""

    path: Path
    format: CheckpointFormat
    obj: Any
    weights: dict[str, torch.Tensor]
    key: str = ""
    layout: str = ""
    stripped: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    content_sha256: str = ""


def open_checkpoint(
    path: str | Path,
    *,
    key: str = "auto",
    prefer_ema: bool = False,
    strip_prefixes: Sequence[str] = DEFAULT_STRIP_PREFIXES,
    allow_globals: Sequence[str | Any] = (),
    map_location: Any = "cpu",
) -> Checkpoint:
    """Load ``path`` safely and read its model weights. Raises :class:`CheckpointError` subclasses."""
    p = Path(path)
    with read_checkpoint(p, allow_globals=allow_globals, map_location=map_location) as reader:
        found = reader.weights(key=key, prefer_ema=prefer_ema, strip_prefixes=strip_prefixes)
        return Checkpoint(path=p, format=reader.format, obj=reader.obj, weights=found.state, key=found.key,
                          layout=found.layout, stripped=found.stripped, metadata=reader.metadata,
                          content_sha256=found.content_sha256)


def load_object(path: str | Path, *, allow_globals: Sequence[str | Any] = (),
                map_location: Any = "cpu") -> tuple[CheckpointFormat, Any, dict[str, str]]:
    """(format, the whole loaded object, safetensors metadata) for any supported checkpoint, loaded safely.
    Only tiny tensors are read (enough for metrics); the others are ``meta`` placeholders."""
    with read_checkpoint(path, allow_globals=allow_globals, map_location=map_location) as reader:
        return reader.format, reader.obj, reader.metadata


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
                             extra={"layout": ckpt.layout, "key": ckpt.key or ".",
                                    "source_content_sha256": ckpt.content_sha256})
    write_weights(output, cast_floating(ckpt.weights, dtype), metadata=md, progress=writing)
    return ckpt
