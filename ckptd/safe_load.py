"""Load whole torch files without running pickle code, and turn loader failures into one clear error.

``load_torch`` is ``torch.load(weights_only=True)`` with ordinary reads (never ``mmap``: a trainer rewriting a
mapped file in place kills the reader with SIGBUS). It is for callers that want the whole object with real tensors,
such as resuming training; reading a trainer's checkpoint for its model weights goes through
:func:`ckptd.reader.read_checkpoint`, which reads only the model's bytes. Extra types are allowed only through an
explicit allowlist (plus the data-only ``argparse.Namespace`` that timm stores); there is no unsafe fallback.

All failures (truncated, corrupt, foreign, unsafe) surface as :class:`~ckptd.errors.CheckpointError` naming
the file and the reason; raw zipfile/pickle tracebacks never reach the user.
"""

from __future__ import annotations

import importlib
import pickle
import re
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ckptd.errors import CheckpointError, UnsafeCheckpointError
from ckptd.formats import CheckpointFormat, check_complete

_UNSUPPORTED_GLOBAL = re.compile(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)")
_GLOBAL_ANY = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")


def resolve_globals(names: Iterable[str | Any]) -> list[Any]:
    """Turn ``"pkg.mod.Name"`` strings (or objects) into objects for ``torch.serialization.safe_globals``."""
    out: list[Any] = []
    for item in names:
        if not isinstance(item, str):
            out.append(item)
            continue
        module, _, attr = item.rpartition(".")
        if not module:
            raise CheckpointError(item, "allow_globals entries must be dotted names like 'pkg.module.Class'")
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError) as exc:
            raise CheckpointError(item, f"cannot allowlist {item!r}: {exc}") from exc
    return out


def load_torch(
    path: str | Path,
    *,
    allow_globals: Sequence[str | Any] = (),
    map_location: Any = "cpu",
    mmap: bool = False,
) -> Any:
    """``torch.load(weights_only=True)`` of a whole file with clear errors. ``mmap=True`` maps zip files: only
    for files ckptd itself wrote and nobody rewrites."""
    from ckptd.restricted_pickle import DATA_ONLY_GLOBALS

    p = Path(path)
    fmt = check_complete(p)
    if fmt not in (CheckpointFormat.TORCH_ZIP, CheckpointFormat.TORCH_LEGACY):
        raise CheckpointError(p, f"is {fmt}, not a torch.save file")
    use_mmap = mmap and fmt is CheckpointFormat.TORCH_ZIP
    try:
        with torch.serialization.safe_globals([*DATA_ONLY_GLOBALS, *resolve_globals(allow_globals)]):
            return torch.load(p, map_location=map_location, weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        raise unsafe_or_corrupt(p, exc) from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, KeyError, IndexError, TypeError,
            MemoryError, UnicodeDecodeError, struct.error, AssertionError, NotImplementedError) as exc:
        raise CheckpointError(p, f"could not be loaded: {first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` — enough for a log line, never a traceback."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def unsafe_or_corrupt(p: str | Path, exc: BaseException, detail: str = "") -> CheckpointError:
    """An unpickling failure as UnsafeCheckpointError (naming the refused globals) or a corrupt-file error."""
    text = str(exc)
    names = sorted(set(_UNSUPPORTED_GLOBAL.findall(text)) | set(_GLOBAL_ANY.findall(text)))
    if names or "Weights only load failed" in text:
        summary = "" if names else _summarise_weights_only(text)
        return UnsafeCheckpointError(p, names, "; ".join(x for x in (detail, summary) if x))
    return CheckpointError(p, f"is corrupt{f' ({detail})' if detail else ''}: {first_line(exc)}")


def _summarise_weights_only(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("Weights only load failed", "(1)", "(2)", "Please", "WeightsUnpickler")):
            return line[:200]
    return "the weights-only unpickler rejected it"


def load_dcp(path: str | Path, *, allow_globals: Sequence[str | Any] = ()) -> dict[str, Any]:
    """A whole ``torch.distributed.checkpoint`` folder as one nested dict with real tensors, loaded safely
    (see :mod:`ckptd.dcp_reader`)."""
    from ckptd.dcp_reader import load_dcp_folder

    return load_dcp_folder(path, allow_globals=allow_globals)
