"""Our own restricted unpickler for the ``data.pkl`` that ``torch.save`` writes: data in, never code.

Why not ``torch.load(weights_only=True)``: we need placeholder storages (no tensor bytes read while unpickling, so
a 1 GB training checkpoint costs only its model's bytes) and torch's weights-only unpickler is private API.
:meth:`RestrictedUnpickler.find_class` maps the *names* torch.save writes (``torch._utils._rebuild_tensor_v2``, …)
to our own functions; anything not on the list is refused by name before it is even imported. Subclasses say
where storages come from (``persistent_load``) and how a tensor is made of one (``make_tensor``).

The allowlist: containers (``OrderedDict``, ``Counter``, set/frozenset/bytearray/complex), torch dtypes,
``torch.Size``, ``torch.device``, bytes (``_codecs.encode``, latin-1 only), tensors and parameters, the
data-only attribute bags ``argparse.Namespace`` (timm's ``args``) and ``types.SimpleNamespace``, plus what the
caller allowlists explicitly.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import pickle
import types
from collections.abc import Iterable
from typing import IO, Any

import torch

# data-only attribute bags: construct with __new__ and fill __dict__, nothing else runs
DATA_ONLY_GLOBALS: tuple[type, ...] = (argparse.Namespace, types.SimpleNamespace)

LEGACY_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16,
    "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "BFloat16Storage": torch.bfloat16, "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64,
}


class RefusedGlobal(pickle.UnpicklingError):
    """A global outside the allowlist. ``torch_internal`` ones (sparse/quantized tensor rebuilders, …) are safe
    for torch's own weights-only loader, which the caller may fall back to; anything else is refused."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.torch_internal = name.startswith("torch.")
        super().__init__(f"Unsupported global: GLOBAL {name}")


class NeedsTorchLoader(pickle.UnpicklingError):
    """Valid and safe, but outside what the lazy reader implements (e.g. conjugate-bit metadata)."""


class StorageType:
    """What ``GLOBAL torch FloatStorage`` (or ``torch.storage UntypedStorage``) unpickles to here. ``__slots__``
    here and below: a pickle's BUILD opcode cannot set attributes on what our find_class hands out."""

    __slots__ = ("dtype", "name", "untyped")

    def __init__(self, name: str, dtype: torch.dtype, untyped: bool = False) -> None:
        self.name, self.dtype, self.untyped = name, dtype, untyped

    def __repr__(self) -> str:
        return f"StorageType({self.name})"


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


TENSOR_TYPE, PARAMETER_TYPE = _Marker("torch.Tensor"), _Marker("torch.nn.parameter.Parameter")


class _Encode:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``: str -> bytes, nothing else."""

    __slots__ = ()

    def __call__(self, text: Any, encoding: str = "utf-8") -> bytes:
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
            raise pickle.UnpicklingError("_codecs.encode used for something other than bytes")
        return text.encode(encoding)


_encode = _Encode()


def allowlist_names(objects: Iterable[Any]) -> dict[str, Any]:
    """``{"module.qualname": obj}`` for caller-allowlisted objects (as ``resolve_globals`` returns them);
    a ``(obj, "name")`` pair allowlists ``obj`` under that name, as ``torch.serialization.safe_globals`` does."""
    out: dict[str, Any] = {}
    for item in objects:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], str):
            out[item[1]] = item[0]
            continue
        module = getattr(item, "__module__", None)
        name = getattr(item, "__qualname__", None) or getattr(item, "__name__", None)
        if module and name:
            out[f"{module}.{name}"] = item
    return out


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickle torch.save's ``data.pkl`` allowing only data. Subclasses implement ``persistent_load`` (returning
    a storage placeholder) and :meth:`make_tensor`."""

    def __init__(self, file: IO[bytes], *, allowed: dict[str, Any] | None = None) -> None:
        super().__init__(file)
        self._rebuilders = (self._rebuild_tensor_v2, self._rebuild_tensor_v3, self._rebuild_parameter,
                            self._rebuild_parameter_with_state)
        table: dict[str, Any] = {
            "collections.OrderedDict": collections.OrderedDict, "collections.Counter": collections.Counter,
            "builtins.set": set, "builtins.frozenset": frozenset, "builtins.bytearray": bytearray,
            "builtins.complex": complex, "_codecs.encode": _encode,
            "torch.Size": torch.Size, "torch.device": torch.device,
            "torch.Tensor": TENSOR_TYPE, "torch.nn.parameter.Parameter": PARAMETER_TYPE,
            "torch._utils._rebuild_tensor_v2": self._rebuild_tensor_v2,
            "torch._utils._rebuild_tensor_v3": self._rebuild_tensor_v3,
            "torch._utils._rebuild_parameter": self._rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": self._rebuild_parameter_with_state,
            "torch._tensor._rebuild_from_type_v2": self._rebuild_from_type_v2,
            "torch.UntypedStorage": StorageType("UntypedStorage", torch.uint8, untyped=True),
            "torch.storage.UntypedStorage": StorageType("UntypedStorage", torch.uint8, untyped=True),
        }
        table.update({f"torch.{n}": StorageType(n, dt) for n, dt in LEGACY_STORAGE_DTYPES.items()})
        table.update({f"{c.__module__}.{c.__qualname__}": c for c in DATA_ONLY_GLOBALS})
        self._allowed = dict(allowed or {})
        self._table = table

    def find_class(self, module: str, name: str) -> Any:
        # protocol 2 writes some names as Python 2 spelled them (__builtin__.set, commands.Popen): map them back
        # exactly as pickle itself does, so lookups and refusals use the real name
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if full in self._table:
            return self._table[full]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if full in self._allowed:
            return self._allowed[full]
        raise RefusedGlobal(full)

    # --- what torch.save's reduce functions are rebuilt with ---------------------------------------------------
    def make_tensor(self, storage: Any, storage_offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def _tensor(self, storage: Any, storage_offset: Any, size: Any, stride: Any, dtype: Any,
                metadata: Any) -> torch.Tensor:
        if metadata:
            raise NeedsTorchLoader("tensor metadata (conjugate/negative bits)")
        if not (isinstance(storage_offset, int) and _int_tuple(size) and _int_tuple(stride)):
            raise pickle.UnpicklingError(f"malformed tensor record: offset {storage_offset!r}, size {size!r}, "
                                         f"stride {stride!r}")
        if dtype is None:
            dtype = getattr(storage, "dtype", None)
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"malformed tensor record: dtype {dtype!r}")
        return self.make_tensor(storage, storage_offset, tuple(size), tuple(stride), dtype)

    def _rebuild_tensor_v2(self, storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                           backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
        return self._tensor(storage, storage_offset, size, stride, None, metadata)

    def _rebuild_tensor_v3(self, storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                           backward_hooks: Any, dtype: Any, metadata: Any = None) -> torch.Tensor:
        return self._tensor(storage, storage_offset, size, stride, dtype, metadata)

    def _rebuild_parameter(self, data: Any, requires_grad: Any, backward_hooks: Any) -> torch.Tensor:
        """A Parameter comes back as its plain tensor: weights are data, not module state."""
        if not isinstance(data, torch.Tensor):
            raise pickle.UnpicklingError("Parameter rebuilt from something that is not a tensor")
        return data

    def _rebuild_parameter_with_state(self, data: Any, requires_grad: Any, backward_hooks: Any,
                                      state: Any) -> torch.Tensor:
        return self._rebuild_parameter(data, requires_grad, backward_hooks)  # Python attributes are dropped

    def _rebuild_from_type_v2(self, func: Any, new_type: Any, args: Any, state: Any) -> torch.Tensor:
        """A tensor or Parameter with Python attributes: rebuild the tensor, drop the attributes."""
        own = getattr(func, "__self__", None) is self and any(
            getattr(func, "__func__", None) is r.__func__ for r in self._rebuilders)
        if not own or (new_type is not TENSOR_TYPE and new_type is not PARAMETER_TYPE) or not isinstance(args, tuple):
            raise pickle.UnpicklingError(f"tensor subclass {new_type!r} is not supported")
        return func(*args)


def _int_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
