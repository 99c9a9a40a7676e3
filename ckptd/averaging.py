"""Average checkpoints into model-only weights, streamed tensor by tensor (and chunk by chunk).

Floating tensors are accumulated in float64 and cast back to each tensor's own dtype (or a requested one);
integer/bool buffers such as ``num_batches_tracked`` are never averaged: they come from the reference (best)
checkpoint. Peak memory is one float64 chunk plus one output chunk, independent of the number of inputs and of
the model size: a trainer's file is read chunk by chunk with ordinary reads (``StreamedWeights.read_flat``; never
memory-mapped, so a file rewritten in place cannot kill the process), and only its weight bytes are read;
ckptd's own immutable files (the daemon's member copies) may be passed mapped.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckptd.atomic import atomic_open, atomic_torch_save
from ckptd.errors import NonFiniteError, WeightsMismatchError
from ckptd.layouts import DEFAULT_STRIP_PREFIXES
from ckptd.reader import read_checkpoint
from ckptd.safetensors_io import SafetensorsStreamWriter, TensorSpec
from ckptd.weights import Checkpoint

DEFAULT_CHUNK_ELEMS = 1 << 18  # 2 MiB of float64 accumulator
Progress = Callable[[int, int], None]


@dataclass
class AverageResult:
    output: Path
    sources: list[str]
    reference: str
    averaged: int = 0
    copied: int = 0
    keys: list[str] = field(default_factory=list)


def check_compatible(names: Sequence[str], states: Sequence[Mapping[str, torch.Tensor]], reference: int = 0) -> None:
    """Same keys and shapes everywhere, and floating-ness agreeing; the error names the key and both files."""
    ref_name, ref = names[reference], states[reference]
    for name, state in zip(names, states):
        if state is ref:
            continue
        missing = [k for k in ref if k not in state]
        if missing:
            raise WeightsMismatchError(f"key {missing[0]!r} is in {ref_name} but not in {name}"
                                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = [k for k in state if k not in ref]
        if extra:
            raise WeightsMismatchError(f"key {extra[0]!r} is in {name} but not in {ref_name}"
                                       + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        for k, t in ref.items():
            other = state[k]
            if tuple(other.shape) != tuple(t.shape):
                raise WeightsMismatchError(f"key {k!r} has shape {list(t.shape)} in {ref_name} "
                                           f"but {list(other.shape)} in {name}")
            if other.is_floating_point() != t.is_floating_point():
                raise WeightsMismatchError(f"key {k!r} is {t.dtype} in {ref_name} but {other.dtype} in {name}")


def average_states(names: Sequence[str], states: Sequence[Mapping[str, torch.Tensor]],
                   write: Callable[[str, torch.Tensor], None], *, reference: int = 0, dtype: torch.dtype | None = None,
                   chunk_elems: int = DEFAULT_CHUNK_ELEMS, progress: Progress | None = None) -> tuple[int, int]:
    """Stream the average of ``states`` to ``write(key, chunk)`` in the reference's key order.

    Returns (averaged, copied) tensor counts. Raises NonFiniteError naming the key and the offending input.
    """
    if not states:
        raise ValueError("nothing to average")
    check_compatible(names, states, reference)
    ref = states[reference]
    n = len(states)
    total = sum(t.numel() for t in ref.values())
    done = 0
    # All scratch memory is allocated once: the accumulator, a staging buffer (so adding an fp32/fp16 input
    # into float64 never allocates a promoted temporary), and one output buffer per output dtype.
    size = max(1, min(chunk_elems, max((t.numel() for t in ref.values()), default=1)))
    acc_buf = torch.empty(size, dtype=torch.float64)
    stage_buf = torch.empty(size, dtype=torch.float64)
    out_bufs: dict[torch.dtype, torch.Tensor] = {}
    scratch: dict[torch.dtype, torch.Tensor] = {}  # read buffers for streamed inputs, one per dtype
    averaged = copied = 0
    for key, ref_t in ref.items():
        if not ref_t.is_floating_point():
            write(key, _FlatReader(ref, key).chunk(0, ref_t.numel()).reshape(ref_t.shape))
            copied += 1
            done += ref_t.numel()
            continue
        out_dtype = dtype or ref_t.dtype
        out_buf = out_bufs.get(out_dtype)
        if out_buf is None:
            out_buf = out_bufs[out_dtype] = torch.empty(size, dtype=out_dtype)
        flats = [_FlatReader(s, key, scratch) for s in states]
        numel = ref_t.numel()
        for start in range(0, numel, chunk_elems):
            stop = min(start + chunk_elems, numel)
            acc, stage = acc_buf[: stop - start], stage_buf[: stop - start]
            acc.copy_(flats[0].chunk(start, stop))
            for f in flats[1:]:
                stage.copy_(f.chunk(start, stop))
                acc.add_(stage)
            # NaN/Inf anywhere propagate into the sum: one scalar check instead of a mask per chunk
            if not math.isfinite(float(acc.sum())):
                raise _non_finite(key, names, flats, start, stop)
            acc.div_(n)
            out = out_buf[: stop - start]
            out.copy_(acc)
            write(key, out)
            done += stop - start
            if progress is not None:
                progress(done, total)
        if numel == 0:
            write(key, ref_t.to(out_dtype))
        averaged += 1
    return averaged, copied


class _FlatReader:
    """Chunks of one tensor, flattened row-major: sliced from a real (or ckptd-mapped) tensor, or read from a
    trainer's file on demand (``StreamedWeights``), so k inputs never mean k models in memory."""

    def __init__(self, state: Mapping[str, torch.Tensor], key: str,
                 scratch: dict[torch.dtype, torch.Tensor] | None = None) -> None:
        self._read = getattr(state, "read_flat", None)
        self._key = key
        self._dtype = state[key].dtype
        self._scratch = scratch  # shared per dtype, so streamed reads allocate nothing per chunk
        self._flat = None if self._read is not None else state[key].reshape(-1)

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        if self._flat is not None:
            return self._flat[start:stop]
        assert self._read is not None
        out = None
        if self._scratch is not None:
            buf = self._scratch.get(self._dtype)
            if buf is None or buf.numel() < stop - start:
                buf = self._scratch[self._dtype] = torch.empty(max(stop - start, 1), dtype=self._dtype)
            out = buf[: stop - start]
        return self._read(self._key, start, stop, out)


def _non_finite(key: str, names: Sequence[str], flats: Sequence[_FlatReader], start: int, stop: int) -> NonFiniteError:
    for name, f in zip(names, flats):
        if not bool(torch.isfinite(f.chunk(start, stop)).all()):
            return NonFiniteError(f"key {key!r} holds NaN/Inf in {name}: refusing to average it")
    return NonFiniteError(f"key {key!r} overflows to Inf when averaged (values too large)")


def average_checkpoints(
    sources: Sequence[str | Path | Checkpoint],
    output: str | Path,
    *,
    reference: int = 0,
    dtype: torch.dtype | None = None,
    key: str = "auto",
    prefer_ema: bool = False,
    strip_prefixes: Sequence[str] = DEFAULT_STRIP_PREFIXES,
    allow_globals: Sequence[str | Any] = (),
    metadata: Mapping[str, str] | None = None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    progress: Progress | None = None,
) -> AverageResult:
    """Average checkpoints (any supported layout) into ``output`` (``.safetensors`` streamed, or ``.pt``).

    ``reference`` is the index of the checkpoint integer buffers are taken from: pass the best one.
    """
    if not sources:
        raise ValueError("no checkpoints to average")
    if not 0 <= reference < len(sources):
        raise ValueError(f"reference index {reference} out of range for {len(sources)} checkpoints")
    with contextlib.ExitStack() as stack:
        names: list[str] = []
        states: list[Mapping[str, torch.Tensor]] = []
        for s in sources:
            if isinstance(s, Checkpoint):
                names.append(str(s.path))
                states.append(s.weights)
                continue
            reader = stack.enter_context(read_checkpoint(s, allow_globals=allow_globals))
            names.append(str(reader.path))
            states.append(reader.stream_weights(key=key, prefer_ema=prefer_ema, strip_prefixes=strip_prefixes))

        def verify() -> None:
            """A file rewritten while it was averaged: raise before the output is published (the caller retries)."""
            for st in states:
                check = getattr(getattr(st, "reader", None), "verify_unchanged", None)
                if check is not None:
                    check()

        return _average_into(names, states, output, reference=reference, dtype=dtype, metadata=metadata,
                             chunk_elems=chunk_elems, progress=progress, verify=verify)


def _average_into(names: list[str], states: list[Mapping[str, torch.Tensor]], output: str | Path, *,
                  reference: int, dtype: torch.dtype | None, metadata: Mapping[str, str] | None,
                  chunk_elems: int, progress: Progress | None, verify: Callable[[], None]) -> AverageResult:
    check_compatible(names, states, reference)
    out = Path(output)
    result = AverageResult(output=out, sources=names, reference=names[reference], keys=list(states[reference]))
    md = dict(metadata or {})
    if out.suffix == ".safetensors":
        ref = states[reference]
        specs = [TensorSpec(k, (dtype or t.dtype) if t.is_floating_point() else t.dtype, tuple(t.shape))
                 for k, t in ref.items()]
        with atomic_open(out, "wb") as fh:
            writer = SafetensorsStreamWriter(fh, specs, md)
            result.averaged, result.copied = average_states(names, states, writer.write, reference=reference,
                                                            dtype=dtype, chunk_elems=chunk_elems, progress=progress)
            writer.close()
            verify()
    else:
        parts: dict[str, list[torch.Tensor]] = {}
        result.averaged, result.copied = average_states(
            names, states, lambda k, t: parts.setdefault(k, []).append(t.clone()), reference=reference,
            dtype=dtype, chunk_elems=chunk_elems, progress=progress)
        verify()
        ref = states[reference]
        atomic_torch_save({k: torch.cat(v).reshape(ref[k].shape) if len(v) > 1 else v[0].reshape(ref[k].shape)
                           for k, v in parts.items()}, out)
    return result
