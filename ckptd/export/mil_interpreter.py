"""A small reference interpreter for Core ML MIL programs, so an exported package can be *run* on Linux.

Core ML's runtime (``MLModel.predict``) exists only on macOS. We load the saved package's program with
coremltools' ``milproto`` loader (weights included) and execute it op by op with torch implementations of the
ops our models use. fp16 programs are emulated by rounding every fp16 op result to fp16. Ops without an
implementation are reported by name: verification then says "partial", never "ok".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


class UnsupportedOps(Exception):
    def __init__(self, ops: list[str]) -> None:
        self.ops = ops
        super().__init__("unsupported MIL ops: " + ", ".join(ops))


def load_program(package: str | Path) -> Any:
    """The MIL program of a saved .mlpackage, weights included."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    package = Path(package)
    spec = ct.utils.load_spec(str(package))
    weights = package / "Data" / "com.apple.CoreML" / "weights"
    return load(spec, spec.specificationVersion, str(weights))


def _np_dtype_is_half(var: Any) -> bool:
    try:
        from coremltools.converters.mil.mil import types

        return var.dtype == types.fp16
    except Exception:  # a missing dtype just means not fp16  # noqa: BLE001
        return False


class Interpreter:
    def __init__(self, program: Any, function: str = "main") -> None:
        self.function = program.functions[function]
        self.env: dict[str, torch.Tensor] = {}

    def unsupported(self) -> list[str]:
        return sorted({op.op_type for op in self._ops()
                       if op.op_type not in OPS and op.op_type != "const" and not _is_constexpr(op)})

    def _ops(self) -> list[Any]:
        return list(self.function.operations)

    def run(self, inputs: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = self.unsupported()
        if missing:
            raise UnsupportedOps(missing)
        env = self.env = {}
        for name, var in self.function.inputs.items():
            value = torch.as_tensor(np.asarray(inputs[name]))
            env[var.name] = value.to(torch.float16 if _np_dtype_is_half(var) else value.dtype)
        for op in self._ops():
            if op.op_type == "const" or _is_constexpr(op):
                value = op.outputs[0].val
                if value is None and hasattr(op, "materialized_val_inference"):
                    value = op.materialized_val_inference()
                env[op.outputs[0].name] = _tensor(value)
                continue
            results = OPS[op.op_type](_Args(op, env))
            if not isinstance(results, (tuple, list)):
                results = [results]
            for var, res in zip(op.outputs, results):
                res = res if isinstance(res, torch.Tensor) else torch.as_tensor(res)
                env[var.name] = res.half() if _np_dtype_is_half(var) and res.is_floating_point() else \
                    (res.float() if res.dtype == torch.float16 else res)
        return {v.name: env[v.name].float() for v in self.function.outputs}


def _is_constexpr(op: Any) -> bool:
    return op.op_type.startswith("constexpr_")


def _tensor(value: Any) -> torch.Tensor:
    arr = np.asarray(value)
    if arr.dtype == np.float16:
        return torch.from_numpy(arr.copy())
    if arr.dtype.kind == "U" or arr.dtype == object:
        return arr  # type: ignore[return-value]  # strings (pad_type etc.) are read from op attributes
    return torch.from_numpy(np.ascontiguousarray(arr))


class _Args:
    """Op inputs: runtime tensors from the environment, constants from the op itself."""

    def __init__(self, op: Any, env: dict[str, torch.Tensor]) -> None:
        self.op, self.env = op, env

    def has(self, name: str) -> bool:
        return self.op.inputs.get(name) is not None

    def t(self, name: str) -> torch.Tensor:
        var = self.op.inputs[name]
        if isinstance(var, (list, tuple)):
            raise TypeError(name)
        value = self.env[var.name] if var.name in self.env else _tensor(var.val)
        return value.float() if isinstance(value, torch.Tensor) and value.dtype == torch.float16 else value

    def ts(self, name: str) -> list[torch.Tensor]:
        out = []
        for var in self.op.inputs[name]:
            value = self.env.get(var.name)
            if value is None:
                value = _tensor(var.val)
            out.append(value.float() if value.dtype == torch.float16 else value)
        return out

    def v(self, name: str, default: Any = None) -> Any:
        var = self.op.inputs.get(name)
        if var is None:
            return default
        if var.val is not None:
            val = var.val
            return val.tolist() if isinstance(val, np.ndarray) else (val.item() if hasattr(val, "item") else val)
        return self.env[var.name].tolist()


def _axes(a: _Args, name: str = "axes") -> list[int] | None:
    axes = a.v(name)
    return None if axes is None else [int(x) for x in (axes if isinstance(axes, list) else [axes])]


def _conv(a: _Args) -> torch.Tensor:
    x, w = a.t("x"), a.t("weight")
    bias = a.t("bias") if a.has("bias") else None
    strides = a.v("strides", [1] * (x.dim() - 2))
    dil = a.v("dilations", [1] * (x.dim() - 2))
    groups = int(a.v("groups", 1))
    pad_type = a.v("pad_type", "valid")
    pad = a.v("pad", [0] * 2 * (x.dim() - 2))
    if pad_type == "same":
        pads = []
        for i, k in enumerate(w.shape[2:]):
            total = max((math.ceil(x.shape[2 + i] / strides[i]) - 1) * strides[i] + (k - 1) * dil[i] + 1
                        - x.shape[2 + i], 0)
            pads.append((total // 2, total - total // 2))
    elif pad_type == "custom":
        pads = [(pad[2 * i], pad[2 * i + 1]) for i in range(x.dim() - 2)]
    else:
        pads = [(0, 0)] * (x.dim() - 2)
    flat = [p for pair in reversed(pads) for p in pair]
    x = F.pad(x, flat)
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.dim()]
    return conv(x, w, bias, stride=strides, dilation=dil, groups=groups)


def _pool(kind: str) -> Callable[[_Args], torch.Tensor]:
    def run(a: _Args) -> torch.Tensor:
        x = a.t("x")
        k, s = a.v("kernel_sizes"), a.v("strides")
        pad_type, pad = a.v("pad_type", "valid"), a.v("pad", [0, 0, 0, 0])
        if pad_type == "custom":
            x = F.pad(x, [p for i in reversed(range(len(k))) for p in (pad[2 * i], pad[2 * i + 1])],
                      value=-math.inf if kind == "max" else 0.0)
        if kind == "max":
            return F.max_pool2d(x, k, s, ceil_mode=bool(a.v("ceil_mode", False)))
        return F.avg_pool2d(x, k, s, ceil_mode=bool(a.v("ceil_mode", False)),
                            count_include_pad=not bool(a.v("exclude_padding_from_average", False)))

    return run


def _reduce(fn: Callable[..., torch.Tensor]) -> Callable[[_Args], torch.Tensor]:
    def run(a: _Args) -> torch.Tensor:
        x = a.t("x")
        axes = _axes(a) or list(range(x.dim()))
        return fn(x, dim=axes, keepdim=bool(a.v("keep_dims", False)))

    return run


def _layer_norm(a: _Args) -> torch.Tensor:
    x = a.t("x")
    axes = [ax % x.dim() for ax in (_axes(a) or [x.dim() - 1])]
    mean = x.mean(dim=axes, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
    y = (x - mean) / torch.sqrt(var + float(a.v("epsilon", 1e-5)))
    if a.has("gamma"):
        y = y * a.t("gamma")
    if a.has("beta"):
        y = y + a.t("beta")
    return y


def _batch_norm(a: _Args) -> torch.Tensor:
    x = a.t("x")
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (x - a.t("mean").reshape(shape)) / torch.sqrt(a.t("variance").reshape(shape) + float(a.v("epsilon", 1e-5)))
    if a.has("gamma"):
        y = y * a.t("gamma").reshape(shape)
    if a.has("beta"):
        y = y + a.t("beta").reshape(shape)
    return y


def _slice_by_index(a: _Args) -> torch.Tensor:
    x = a.t("x")
    begin, end = list(a.v("begin")), list(a.v("end"))
    stride = a.v("stride") or [1] * x.dim()
    bm = a.v("begin_mask") or [False] * x.dim()
    em = a.v("end_mask") or [False] * x.dim()
    sm = a.v("squeeze_mask") or [False] * x.dim()
    idx: list[Any] = []
    for i in range(x.dim()):
        if sm[i]:
            idx.append(int(begin[i]))
            continue
        b = None if bm[i] else int(begin[i])
        e = None if em[i] else int(end[i])
        idx.append(slice(b, e, int(stride[i])))
    return x[tuple(idx)]


def _gelu(a: _Args) -> torch.Tensor:
    mode, x = a.v("mode", "EXACT"), a.t("x")
    if mode == "SIGMOID_APPROXIMATION":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x, approximate="tanh" if mode == "TANH_APPROXIMATION" else "none")


def _matmul(a: _Args) -> torch.Tensor:
    x, y = a.t("x"), a.t("y")
    if a.v("transpose_x", False):
        x = x.transpose(-1, -2)
    if a.v("transpose_y", False):
        y = y.transpose(-1, -2)
    return torch.matmul(x, y)


def _cast(a: _Args) -> torch.Tensor:
    dtype = {"fp16": torch.float16, "fp32": torch.float32, "int32": torch.int32, "int16": torch.int16,
             "bool": torch.bool, "fp64": torch.float64}[a.v("dtype")]
    return a.t("x").to(dtype)


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[_Args], torch.Tensor]:
    return lambda a: fn(a.t("x"), a.t("y"))


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[_Args], torch.Tensor]:
    return lambda a: fn(a.t("x"))


OPS: dict[str, Callable[[_Args], Any]] = {
    "conv": _conv,
    "linear": lambda a: F.linear(a.t("x"), a.t("weight"), a.t("bias") if a.has("bias") else None),
    "matmul": _matmul,
    "add": _binary(torch.add), "sub": _binary(torch.sub), "mul": _binary(torch.mul),
    "real_div": _binary(torch.div), "floor_div": _binary(torch.floor_divide), "pow": _binary(torch.pow),
    "maximum": _binary(torch.maximum), "minimum": _binary(torch.minimum),
    "equal": _binary(torch.eq), "greater": _binary(torch.gt), "less": _binary(torch.lt),
    "relu": _unary(torch.relu), "sigmoid": _unary(torch.sigmoid), "tanh": _unary(torch.tanh),
    "silu": _unary(F.silu), "exp": _unary(torch.exp), "log": _unary(torch.log), "sqrt": _unary(torch.sqrt),
    "rsqrt": lambda a: torch.rsqrt(a.t("x") + float(a.v("epsilon", 0.0) or 0.0)),
    "erf": _unary(torch.erf), "abs": _unary(torch.abs), "square": _unary(torch.square),
    "identity": _unary(lambda x: x), "neg": _unary(torch.neg),
    "inverse": lambda a: 1.0 / (a.t("x") + float(a.v("epsilon", 0.0) or 0.0)),
    "relu6": _unary(F.relu6),
    "leaky_relu": lambda a: F.leaky_relu(a.t("x"), float(a.v("alpha", 0.01))),
    "clip": lambda a: torch.clamp(a.t("x"), float(a.v("alpha")), float(a.v("beta"))),
    "gelu": _gelu,
    "softmax": lambda a: torch.softmax(a.t("x"), dim=int(a.v("axis", -1))),
    "layer_norm": _layer_norm,
    "batch_norm": _batch_norm,
    "reduce_mean": _reduce(torch.mean), "reduce_sum": _reduce(torch.sum),
    "reduce_max": _reduce(lambda x, dim, keepdim: torch.amax(x, dim=dim, keepdim=keepdim)),
    "reduce_min": _reduce(lambda x, dim, keepdim: torch.amin(x, dim=dim, keepdim=keepdim)),
    "reshape": lambda a: a.t("x").reshape([int(s) for s in a.v("shape")]),
    "transpose": lambda a: a.t("x").permute([int(p) for p in a.v("perm")]),
    "squeeze": lambda a: a.t("x").squeeze(_axes(a)) if _axes(a) is not None else a.t("x").squeeze(),
    "expand_dims": lambda a: _expand_dims(a.t("x"), _axes(a) or [0]),
    "concat": lambda a: torch.cat(a.ts("values"), dim=int(a.v("axis"))),
    "slice_by_index": _slice_by_index,
    "cast": _cast,
    "max_pool": _pool("max"), "avg_pool": _pool("avg"),
    "split": lambda a: _split(a),
    "tile": lambda a: a.t("x").repeat([int(r) for r in a.v("reps")]),
    "shape": lambda a: torch.tensor(list(a.t("x").shape), dtype=torch.int32),
    "gather": lambda a: torch.index_select(a.t("x"), int(a.v("axis", 0)), a.t("indices").long().reshape(-1))
    .reshape(list(a.t("x").shape[: int(a.v("axis", 0)) % a.t("x").dim()]) + list(a.t("indices").shape)
             + list(a.t("x").shape[int(a.v("axis", 0)) % a.t("x").dim() + 1:])),
}


def _expand_dims(x: torch.Tensor, axes: list[int]) -> torch.Tensor:
    rank = x.dim() + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        x = x.unsqueeze(ax)
    return x


def _split(a: _Args) -> list[torch.Tensor]:
    x, axis = a.t("x"), int(a.v("axis"))
    sizes = a.v("split_sizes")
    if sizes is None:
        n = int(a.v("num_splits"))
        sizes = [x.shape[axis] // n] * n
    return list(torch.split(x, [int(s) for s in sizes], dim=axis))
