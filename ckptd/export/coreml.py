"""Build -> load weights strictly -> capture -> convert -> save -> verify, in the current process.

The daemon and ``ckptd export-coreml`` run this in a child process (``ckptd.export.runner``) with a timeout;
library users may call :func:`export_coreml` directly. coremltools is imported here, lazily.

Verification without Core ML's runtime (macOS only): (1) eager PyTorch vs the captured graph, (2) the saved
package's spec (input/output names, shapes, types), (3) the saved program run by our reference interpreter vs
eager PyTorch, within the precision's tolerance. On macOS, ``predict`` parity is added.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ckptd import __version__
from ckptd.errors import CheckpointError, CkptdError, ExportError, WeightsMismatchError
from ckptd.export.request import ExportRequest, ExportResult
from ckptd.model_state import load_model_weights

log = logging.getLogger("ckptd.export")


def import_factory(spec: str, python_path: list[str]) -> Callable[..., nn.Module]:
    for entry in reversed(python_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ExportError(f"cannot import factory {spec!r}: {exc}") from None
    if not callable(obj):
        raise ExportError(f"factory {spec!r} is not callable")
    return obj


class OutputAdapter(nn.Module):
    """Normalises outputs to a tuple of tensors (dicts by key order), so every capture path sees the same."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.keys: list[str] | None = None

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(*args)
        if isinstance(out, dict):
            self.keys = list(out)
        return _as_tuple(out)


def build_model(req: ExportRequest, weights: str) -> nn.Module:
    factory = import_factory(req.factory, req.python_path)
    try:
        model = factory(**req.factory_kwargs)
    except Exception as exc:  # user code: report whatever it raised  # noqa: BLE001
        raise ExportError(f"factory {req.factory}({req.factory_kwargs}) failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ExportError(f"factory {req.factory} returned {type(model).__name__}, not an nn.Module")
    if not Path(weights).exists():  # say so plainly: neither a model mismatch nor anyone else's fault
        raise ExportError(f"the weights to export do not exist: {weights}")
    try:
        load_model_weights(model, weights, strict=True)
    except WeightsMismatchError as exc:  # only a real key/shape/dtype mismatch is "does not fit"
        raise ExportError(f"weights {weights} do not fit the factory's model: {exc}") from None
    except CheckpointError as exc:
        raise ExportError(f"cannot read the weights to export: {exc}") from None
    except CkptdError as exc:
        raise ExportError(f"cannot load the weights to export ({weights}): {exc}") from None
    return model.eval()


def _default_shape(spec: dict[str, Any]) -> list[int]:
    if spec.get("enumerated_shapes"):
        return [int(d) for d in spec["enumerated_shapes"][0]]
    return [int(d[0]) if isinstance(d, (list, tuple)) else int(d) for d in spec["shape"]]


def _is_flexible(spec: dict[str, Any]) -> bool:
    return bool(spec.get("enumerated_shapes")) or any(isinstance(d, (list, tuple)) for d in spec["shape"])


def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32}[name]


def make_inputs(req: ExportRequest, gen: torch.Generator, shapes: list[list[int]] | None = None
                ) -> tuple[list[torch.Tensor], dict[str, np.ndarray]]:
    """(eager inputs, package inputs). Images: pixels 0..255 for the package, scale*x+bias for eager."""
    eager, package = [], {}
    for i, spec in enumerate(req.inputs):
        shape = shapes[i] if shapes else _default_shape(spec)
        if spec.get("kind") == "image":
            pixels = torch.randint(0, 256, shape, generator=gen).float()
            bias = torch.tensor(spec.get("bias") or [0.0] * shape[1]).reshape(1, -1, *([1] * (len(shape) - 2)))
            eager.append(pixels * float(spec.get("scale", 1.0)) + bias)
            package[spec["name"]] = pixels.numpy()
        elif spec.get("dtype") == "int32":
            value = torch.randint(0, 10, shape, generator=gen, dtype=torch.int32)
            eager.append(value)
            package[spec["name"]] = value.numpy()
        else:
            value = torch.randn(shape, generator=gen)
            eager.append(value)
            package[spec["name"]] = value.numpy()
    return eager, package


def capture(model: nn.Module, args: list[torch.Tensor], flexible: bool) -> tuple[Any, str, str]:
    """torch.export (decomposed, as coremltools needs with torch >= 2.9), else torch.jit.trace.
    Returns (captured, path, why-fallback)."""
    why = ""
    if not flexible:
        try:
            ep = torch.export.export(model, tuple(args))
            return ep.run_decompositions({}), "torch.export", ""
        except Exception as exc:  # any capture failure falls back to tracing  # noqa: BLE001
            why = f"torch.export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    else:
        why = "flexible input shapes: traced"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, tuple(args), strict=False)
    except Exception as exc:  # tracing failed too: report it  # noqa: BLE001
        raise ExportError(f"graph capture failed: {why}; torch.jit.trace failed too: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
    return traced, "torch.jit.trace", why


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().float()
    got = got.detach().float().reshape(ref.shape)
    return float((got - ref).abs().max() / (ref.abs().max() + 1e-12)) if ref.numel() else 0.0


def _ct_inputs(ct: Any, req: ExportRequest) -> list[Any]:
    out = []
    for spec in req.inputs:
        if spec.get("enumerated_shapes"):
            shape: Any = ct.EnumeratedShapes(shapes=[tuple(int(d) for d in s) for s in spec["enumerated_shapes"]],
                                             default=tuple(_default_shape(spec)))
        elif _is_flexible(spec):
            shape = ct.Shape(shape=tuple(
                ct.RangeDim(lower_bound=int(d[0]), upper_bound=int(d[1]), default=int(d[0]))
                if isinstance(d, (list, tuple)) else int(d) for d in spec["shape"]))
        else:
            shape = tuple(int(d) for d in spec["shape"])
        if spec.get("kind") == "image":
            layout = {"RGB": ct.colorlayout.RGB, "BGR": ct.colorlayout.BGR, "G": ct.colorlayout.GRAYSCALE}
            bias = spec.get("bias") or []
            out.append(ct.ImageType(name=spec["name"], shape=shape, scale=float(spec.get("scale", 1.0)),
                                    bias=list(bias) if bias else None,
                                    color_layout=layout[spec.get("color_layout", "RGB")]))
        else:
            dtype = {"float32": np.float32, "float16": np.float16, "int32": np.int32}[spec.get("dtype", "float32")]
            out.append(ct.TensorType(name=spec["name"], shape=shape, dtype=dtype))
    return out


def _compress(ct: Any, mlmodel: Any, mode: str) -> Any:
    from coremltools.optimize import coreml as cto

    if mode == "int8":
        config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric",
                                                                                   dtype="int8"))
        return cto.linear_quantize_weights(mlmodel, config=config)
    nbits = 4 if mode == "palettize4" else 8
    config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(nbits=nbits, mode="kmeans"))
    return cto.palettize_weights(mlmodel, config=config)


def export_coreml(req: ExportRequest) -> ExportResult:
    """Convert and verify; saves the package at ``req.output``. Raises ExportError on failure (nothing saved
    that claims to be good: the caller publishes only when the result's status is ok)."""
    start = time.monotonic()
    with _quiet():
        import coremltools as ct
    torch.manual_seed(req.seed)
    gen = torch.Generator().manual_seed(req.seed)
    model = OutputAdapter(build_model(req, req.weights))
    reference = OutputAdapter(build_model(req, req.verify_weights)) if req.verify_weights else model
    flexible = any(_is_flexible(s) for s in req.inputs)
    args, _ = make_inputs(req, gen)
    with torch.no_grad():
        try:
            eager_out = model(*args)
        except Exception as exc:  # user model: a shape error etc.  # noqa: BLE001
            raise ExportError(f"the model fails on the configured inputs: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:300]}") from None
        captured, capture_path, why = capture(model, args, flexible)
        graph = captured.module() if capture_path == "torch.export" else captured
        graph_err = max(_rel_err(g, e) for g, e in zip(_as_tuple(graph(*args)), eager_out))
    verification: dict[str, Any] = {"capture": capture_path, "graph_parity": "ok" if graph_err <= 1e-5 else "failed",
                                    "graph_max_rel_err": graph_err}
    if why:
        verification["capture_note"] = why
    if verification["graph_parity"] != "ok":
        raise ExportError(f"captured graph differs from eager PyTorch (max rel err {graph_err:.2e})")
    names = list(req.outputs) or (model.keys or [])
    if names and len(names) != len(eager_out):
        raise ExportError(f"{len(names)} output names configured but the model returns {len(eager_out)} outputs")
    with _quiet():
        try:
            mlmodel = ct.convert(
                captured, inputs=_ct_inputs(ct, req),
                outputs=[ct.TensorType(name=n) for n in names] if names else None,
                convert_to="mlprogram",
                compute_precision=ct.precision.FLOAT16 if req.precision == "float16" else ct.precision.FLOAT32,
                minimum_deployment_target=getattr(ct.target, req.minimum_deployment_target),
            )
            if req.compression != "none":
                mlmodel = _compress(ct, mlmodel, req.compression)
        except Exception as exc:  # coremltools raises many types  # noqa: BLE001
            raise ExportError(f"coremltools conversion failed ({capture_path}): {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from None
    mlmodel.author = req.author or "ckptd"
    mlmodel.version = req.version or __version__
    source = req.metadata.get("source", req.weights)
    mlmodel.short_description = req.description or f"exported by ckptd {__version__} from {source}"
    user = mlmodel.user_defined_metadata
    for k, v in {**req.metadata, "ckptd_version": __version__, "torch_version": torch.__version__,
                 "coremltools_version": ct.__version__, "capture": capture_path}.items():
        user[str(k)] = str(v)
    with _quiet():
        mlmodel.save(req.output)
    verification.update(verify_package(req, reference, gen))
    status = "ok"
    for key in ("spec", "package_run", "predict"):
        value = verification.get(key, "ok")
        if value.startswith("failed"):
            raise _VerificationFailed(key, value, verification)
        if value.startswith("partial"):
            status = "partial"
    return ExportResult(status=status, package=req.output, capture=capture_path, verification=verification,
                        seconds=time.monotonic() - start)


class _VerificationFailed(ExportError):
    def __init__(self, key: str, value: str, verification: dict[str, Any]) -> None:
        self.verification = verification
        super().__init__(f"verification failed: {key}: {value}")


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(out, dict):
        return tuple(out.values())
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def verify_package(req: ExportRequest, reference: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    """Checks 2 and 3 (and macOS predict parity) on the package saved at ``req.output``."""
    import coremltools as ct

    from ckptd.export.mil_interpreter import Interpreter, UnsupportedOps, load_program

    result: dict[str, Any] = {}
    spec = ct.utils.load_spec(req.output)
    problems = []
    got_inputs = {i.name: i for i in spec.description.input}
    for s in req.inputs:
        i = got_inputs.get(s["name"])
        if i is None:
            problems.append(f"input {s['name']!r} missing (package has {sorted(got_inputs)})")
            continue
        kind = i.type.WhichOneof("Type")
        want_kind = "imageType" if s.get("kind") == "image" else "multiArrayType"
        if kind != want_kind:
            problems.append(f"input {s['name']!r} is {kind}, expected {want_kind}")
        elif kind == "multiArrayType" and not _is_flexible(s):
            shape = list(i.type.multiArrayType.shape)
            if shape != [int(d) for d in s["shape"]]:
                problems.append(f"input {s['name']!r} has shape {shape}, expected {s['shape']}")
    out_names = [o.name for o in spec.description.output]
    if req.outputs and out_names != list(req.outputs):
        problems.append(f"outputs are {out_names}, expected {list(req.outputs)}")
    result["spec"] = "ok" if not problems else "failed: " + "; ".join(problems)
    result["outputs"] = out_names

    tol = req.tolerance
    shape_sets = _test_shapes(req)
    try:
        interp = Interpreter(load_program(req.output))
        worst = 0.0
        for shapes in shape_sets:
            eager_args, package_args = make_inputs(req, gen, shapes)
            with torch.no_grad():
                ref = _as_tuple(reference(*eager_args))
            got = interp.run(package_args)
            worst = max(worst, *(_rel_err(got[n], r) for n, r in zip(out_names, ref)))
        result["package_max_rel_err"] = worst
        result["tolerance"] = tol
        result["package_run"] = "ok" if worst <= tol else f"failed: max rel err {worst:.2e} > {tol:g}"
    except UnsupportedOps as exc:
        result["package_run"] = f"partial: the reference interpreter lacks {', '.join(exc.ops)}"
    except Exception as exc:  # interpreter trouble must not pass silently  # noqa: BLE001
        result["package_run"] = f"partial: interpreter error {type(exc).__name__}: {str(exc)[:200]}"
    if platform.system() == "Darwin":
        try:
            mlmodel = ct.models.MLModel(req.output)
            eager_args, package_args = make_inputs(req, gen, shape_sets[0])
            with torch.no_grad():
                ref = _as_tuple(reference(*eager_args))
            pred = mlmodel.predict(package_args)
            err = max(_rel_err(torch.as_tensor(np.asarray(pred[n])), r) for n, r in zip(out_names, ref))
            result["predict"] = "ok" if err <= tol else f"failed: max rel err {err:.2e} > {tol:g}"
        except Exception as exc:  # macOS predict failures are reported, not raised  # noqa: BLE001
            result["predict"] = f"failed: {type(exc).__name__}: {exc}"
    else:
        result["predict"] = "skipped: Core ML predict runs only on macOS"
    return result


def _test_shapes(req: ExportRequest) -> list[list[list[int]] | None]:
    """Default shapes, plus each enumerated shape / the upper end of each range (capped) for flexible inputs."""
    sets: list[list[list[int]] | None] = [None]
    if any(_is_flexible(s) for s in req.inputs):
        alt = []
        for s in req.inputs:
            if s.get("enumerated_shapes"):
                alt.append([int(d) for d in s["enumerated_shapes"][-1]])
            else:
                alt.append([min(int(d[1]) if int(d[1]) > 0 else int(d[0]) * 2, int(d[0]) * 4)
                            if isinstance(d, (list, tuple)) else int(d) for d in s["shape"]])
        sets.append(alt)
    return sets


@contextlib.contextmanager
def _quiet():
    """coremltools prints progress bars and proxy-loading noise on Linux: keep the daemon's logs clean."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        logging.getLogger("coremltools").setLevel(logging.ERROR)
        yield
