"""The ``ckptd`` command. Exit codes: 0 ok, 1 runtime failure, 2 usage or config error."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ckptd import __version__
from ckptd.errors import CkptdError, ConfigError, UnsafeCheckpointError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

_DTYPES = {"keep": None, "float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _dtype(name: str):
    import torch

    value = _DTYPES.get(name)
    return None if value is None else getattr(torch, value)


def _add_weight_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key", default="auto", help="key path of the weights inside the checkpoint (default: auto)")
    p.add_argument("--ema", action="store_true", help="prefer EMA weights when the checkpoint has them")
    p.add_argument("--strip-prefix", action="append", default=None, metavar="PREFIX",
                   help="prefix to strip from every key (repeatable; default: module. and _orig_mod.)")
    p.add_argument("--allow-global", action="append", default=[], metavar="DOTTED.NAME",
                   help="allowlist one extra pickle global for weights-only loading (only for files you trust)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="keep", help="cast floating tensors (default: keep)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckptd", description="Checkpoint daemon and tools for PyTorch runs.")
    parser.add_argument("--version", action="version", version=f"ckptd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("inspect", help="format, sizes, weight keys, metric/step candidates of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true")
    p.add_argument("--key", default="auto")
    p.add_argument("--ema", action="store_true")
    p.add_argument("--allow-global", action="append", default=[])

    p = sub.add_parser("extract", help="write the model-only weights of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", required=True, help="output .safetensors (default format) or .pt")
    _add_weight_options(p)

    p = sub.add_parser("average", help="average checkpoints (optionally the top-k by a metric); integer buffers "
                                       "come from the best file by --metric, else from the first file given")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--top-k", type=int, default=None, help="average only the best K (needs --metric)")
    p.add_argument("--metric", action="append", default=[], metavar="SRC",
                   help="metric source: checkpoint:KEY.PATH, filename:REGEX, sidecar:{stem}.json[#key], "
                        "trainer_state:KEY (repeatable; first that yields wins)")
    p.add_argument("--mode", choices=["max", "min"], default="max")
    p.add_argument("--skip-unranked", action="store_true",
                   help="leave out files that yield no metric (default: such a file is an error naming it)")
    _add_weight_options(p)

    p = sub.add_parser("export-coreml", help="convert weights to a verified CoreML .mlpackage")
    p.add_argument("--weights", required=True, help="weights file or checkpoint (any layout ckptd reads)")
    p.add_argument("--factory", required=True, help="module:callable that returns the nn.Module")
    p.add_argument("--factory-kwargs", default="{}", help="JSON object of keyword arguments for the factory")
    p.add_argument("--python-path", action="append", default=[], help="directory to add to sys.path (repeatable)")
    p.add_argument("--input", action="append", required=True, metavar="NAME:SHAPE[:image]",
                   help="e.g. image:1x3x224x224 or image:1x3x64-512x64-512:image (a-b = flexible range)")
    p.add_argument("--output-name", action="append", default=[], help="name of each output, in order")
    p.add_argument("--precision", choices=["float16", "float32"], default="float16")
    p.add_argument("--target", default="iOS17", help="minimum deployment target (default iOS17)")
    p.add_argument("--compression", choices=["none", "int8", "palettize4", "palettize8"], default="none")
    p.add_argument("--timeout", default="10m")
    p.add_argument("--keep", type=int, default=3, help="previous versions kept next to OUT")
    p.add_argument("-o", "--output", required=True, help="OUT.mlpackage (a symlink to a verified version)")

    from ckptd.cli_daemon import add_daemon_commands

    add_daemon_commands(sub)
    from ckptd.cli_worker import add_worker_command

    add_worker_command(sub)
    return parser


# commands that run for long and log as they go: a closed log pipe must not kill them (Python's default: SIGPIPE
# ignored, a write raises BrokenPipeError, which they handle or report)
LONG_RUNNING = frozenset({"run", "once", "demo", "worker"})


def main(argv: Sequence[str] | None = None) -> int:
    """One-shot commands behave like Unix tools on a closed pipe (``ckptd status | head -1``): SIGPIPE takes its
    default action, so the process ends quietly, killed by SIGPIPE (exit status 141 in a shell, -13 from
    ``subprocess``). ``run``, ``once`` and ``demo`` keep Python's default (SIGPIPE ignored); should their stdout
    close, the command ends with status 1 and no traceback. The previous handler is restored on return, for
    callers that run ``main`` in-process.

    Closed standard streams (``ckptd status >&-``, ``ckptd run 2>&-``): a closed descriptor 0, 1 or 2 is first
    pointed at the null device, so that no file the command opens later takes its number (a hook or an export
    child would inherit, say, the ledger as its stderr). With standard error closed, messages and log lines are
    dropped (not sent to standard output). With standard output closed, the command runs, its output is
    dropped, and it exits with status 1 (or its own failure status) and one line on standard error, like a Unix
    tool's write error: what it printed was lost."""
    _reopen_closed_std_fds()
    # Python sets sys.stdout / sys.stderr to None when descriptor 1 / 2 was closed when it started
    lost = _Sink() if sys.stdout is None else None
    dropped = _Sink() if sys.stderr is None else None
    if lost is not None:
        sys.stdout = lost
    if dropped is not None:
        sys.stderr = dropped
    try:
        code = _main(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        if lost is None or not lost.written:
            raise
        code = exc.code if isinstance(exc.code, int) else EXIT_FAILURE
    finally:  # as found, for in-process callers
        if lost is not None:
            sys.stdout = None  # type: ignore[assignment]
        if dropped is not None:
            sys.stderr = None  # type: ignore[assignment]
    if lost is not None and lost.written:
        if sys.stderr is not None:
            with contextlib.suppress(OSError, ValueError):
                print("ckptd: error: standard output is closed: the output was lost", file=sys.stderr)
        return code or EXIT_FAILURE
    return code


class _Sink(io.TextIOBase):
    """``sys.stdout`` or ``sys.stderr`` while the command runs with that stream closed: writes are dropped, and
    whether anything was written is noted."""

    written = False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if text:
            self.written = True
        return len(text)


def _reopen_closed_std_fds() -> None:
    """Point a closed descriptor 0, 1 or 2 at the null device (the classic precaution of daemons)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            with contextlib.suppress(OSError):
                null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd itself
                if null != fd:
                    os.dup2(null, fd)
                    os.close(null)


def _main(argv: Sequence[str] | None) -> int:
    previous = _default_sigpipe()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command in LONG_RUNNING:
            _restore_sigpipe(previous)
        code = _run(args)
        sys.stdout.flush()  # here, not at interpreter exit, so that a closed pipe is handled below
        return code
    except SystemExit:  # --help, --version, usage errors: written while SIGPIPE still has its default action
        sys.stdout.flush()
        raise
    except BrokenPipeError:
        # the Python docs' recipe: point stdout at devnull so that the flush at exit does not fail again
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        with contextlib.suppress(OSError, ValueError):
            print("ckptd: error: broken pipe (the reader of the output went away)", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        _restore_sigpipe(previous)


def _default_sigpipe() -> object:
    if not hasattr(signal, "SIGPIPE"):  # Windows
        return None
    try:
        return signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    except ValueError:  # not the main thread: leave signals alone
        return None


def _restore_sigpipe(previous: object) -> None:
    if previous is not None:
        signal.signal(signal.SIGPIPE, previous)  # type: ignore[arg-type]


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args)) if hasattr(args, "func") else _dispatch(args)
    except MemoryError:
        print("ckptd: error: out of memory", file=sys.stderr)
        return EXIT_FAILURE
    except ConfigError as exc:
        _error(f"ckptd: {exc}")
        return EXIT_USAGE
    except UnsafeCheckpointError as exc:  # refused by policy, like a bad argument: nothing was executed
        _error(f"ckptd: error: {exc}")
        return EXIT_USAGE
    except CkptdError as exc:
        _error(f"ckptd: error: {exc}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("ckptd: interrupted", file=sys.stderr)
        return 130


def _error(message: str) -> None:
    """An error message on stderr, each of its lines terminal-safe: messages quote file and run names, pickle
    global names and reasons that a hostile trainer chooses."""
    from ckptd.daemon.status import terminal_safe

    print("\n".join(terminal_safe(line) for line in message.split("\n")), file=sys.stderr)


def _dispatch(args: argparse.Namespace) -> int:
    return {"inspect": cmd_inspect, "extract": cmd_extract, "average": cmd_average,
            "export-coreml": cmd_export_coreml}[args.command](args)


def _parse_input(text: str) -> dict:
    parts = text.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("image", "tensor")):
        raise ValueError(f"--input {text!r}: expected NAME:SHAPE[:image]")
    dims: list = []
    for d in parts[1].split("x"):
        lo, sep, hi = d.partition("-")
        dims.append([int(lo), int(hi)] if sep else int(d))
    return {"name": parts[0], "shape": dims, "kind": parts[2] if len(parts) == 3 else "tensor"}


def cmd_export_coreml(args: argparse.Namespace) -> int:
    from ckptd.export.request import ExportRequest
    from ckptd.export.runner import publish_package, run_export, staging_path
    from ckptd.units import parse_duration

    try:
        inputs = [_parse_input(t) for t in args.input]
        kwargs = json.loads(args.factory_kwargs)
        timeout = parse_duration(args.timeout)
    except ValueError as exc:
        print(f"ckptd export-coreml: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.output)
    if out.suffix != ".mlpackage":
        print("ckptd export-coreml: -o must end in .mlpackage", file=sys.stderr)
        return EXIT_USAGE
    parent = out.parent.resolve()
    parent.mkdir(parents=True, exist_ok=True)
    weights = str(Path(args.weights).resolve())
    req = ExportRequest(weights=weights, factory=args.factory, output=str(staging_path(parent)), inputs=inputs,
                        factory_kwargs=kwargs, python_path=[str(Path(p).resolve()) for p in args.python_path],
                        outputs=args.output_name, precision=args.precision, minimum_deployment_target=args.target,
                        compression=args.compression, metadata={"source": weights})
    print(f"exporting {args.weights} with {args.factory} (in a subprocess, timeout {timeout:g}s) …", file=sys.stderr)
    result = run_export(req, timeout)
    for key in ("capture", "graph_parity", "spec", "package_run", "predict"):
        if key in result.verification:
            print(f"  {key:13} {result.verification[key]}", file=sys.stderr)
    if result.status != "ok":
        import shutil

        shutil.rmtree(req.output, ignore_errors=True)
        print(f"ckptd: error: export failed: {result.reason or result.status}", file=sys.stderr)
        return EXIT_FAILURE
    version = publish_package(Path(req.output), parent, label=Path(weights).stem, keep=args.keep, name=out.name)
    print(f"wrote {out} -> {version.relative_to(parent)} ({result.seconds:.1f}s, verified)")
    return EXIT_OK


def _strip(args: argparse.Namespace) -> tuple[str, ...]:
    from ckptd.layouts import DEFAULT_STRIP_PREFIXES

    return tuple(args.strip_prefix) if args.strip_prefix else DEFAULT_STRIP_PREFIXES


def cmd_inspect(args: argparse.Namespace) -> int:
    from ckptd.metric_sources import metric_candidates
    from ckptd.weights import open_checkpoint

    path = Path(args.checkpoint)
    ckpt = open_checkpoint(path, key=args.key, prefer_ema=args.ema, allow_globals=args.allow_global)
    by_dtype: Counter[str] = Counter()
    params = 0
    for t in ckpt.weights.values():
        by_dtype[str(t.dtype).replace("torch.", "")] += t.numel() * t.element_size()
        params += t.numel()
    size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    top_keys = list(ckpt.obj)[:30] if isinstance(ckpt.obj, dict) and ckpt.layout != "plain" else []
    info = {
        "path": str(path), "format": str(ckpt.format), "file_bytes": size, "layout": ckpt.layout,
        "weights_key": ckpt.key or ".", "stripped_prefixes": list(ckpt.stripped), "tensors": len(ckpt.weights),
        "parameters": params, "weight_bytes_by_dtype": dict(by_dtype), "top_level_keys": [str(k) for k in top_keys],
        "metric_candidates": metric_candidates(ckpt.obj, path, ckpt.metadata),
        "weight_keys": list(ckpt.weights)[:20],
    }
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return EXIT_OK
    print(f"{path}\n  format     {info['format']}  ({_human(size)})")
    print(f"  weights    {info['tensors']} tensors, {params:,} values, found at '{info['weights_key']}' "
          f"(layout: {ckpt.layout}" + (f", stripped {', '.join(ckpt.stripped)}" if ckpt.stripped else "") + ")")
    print("  dtypes     " + ", ".join(f"{k} {_human(v)}" for k, v in by_dtype.items()))
    if top_keys:
        print("  top keys   " + ", ".join(info["top_level_keys"]))
    for k in info["weight_keys"][:8]:
        t = ckpt.weights[k]
        print(f"    {k}: {str(t.dtype).replace('torch.', '')}{list(t.shape)}")
    if len(ckpt.weights) > 8:
        print(f"    … {len(ckpt.weights) - 8} more")
    cands = info["metric_candidates"]
    print("  metric/step candidates: " + (", ".join(f"{k}={v}" for k, v in cands.items()) if cands else "none found"))
    return EXIT_OK


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def cmd_extract(args: argparse.Namespace) -> int:
    from ckptd.progress import Progress
    from ckptd.weights import extract_weights

    bars: dict[str, Progress] = {}

    def progress(phase: str, done: int, total: int) -> None:
        bars.setdefault(phase, Progress(f"extract: {phase}"))(done, total)

    key = args.key
    if args.ema and key in ("", "auto"):
        # --ema takes EMA weights or fails: a silent fallback to the model's weights would hand out the wrong model
        from ckptd.trainers import ema_weights_key
        from ckptd.weights import load_object

        _, obj, _ = load_object(args.checkpoint, allow_globals=args.allow_global)
        found = ema_weights_key(obj)
        if found is None:
            print(f"ckptd extract: {args.checkpoint} has no EMA weights (looked for ema_state_dict, state_dict_ema, "
                  "Lightning WeightAveraging / EMA callback state); drop --ema for the model weights", file=sys.stderr)
            return EXIT_USAGE
        key = found
    ckpt = extract_weights(args.checkpoint, args.output, key=key, prefer_ema=args.ema and key in ("", "auto"),
                           strip_prefixes=_strip(args), dtype=_dtype(args.dtype), allow_globals=args.allow_global,
                           progress=progress)
    for bar in bars.values():
        bar.finish()
    print(f"wrote {args.output}: {len(ckpt.weights)} tensors from '{ckpt.key or '.'}' ({ckpt.layout})")
    return EXIT_OK


def cmd_average(args: argparse.Namespace) -> int:
    """Average checkpoints. With ``--metric`` they are ranked (``--top-k`` keeps the best K) and integer/bool
    buffers come from the best; without, every file given is averaged and buffers come from the first one.
    A file without a metric is an error naming it unless ``--skip-unranked``: averaging fewer files than asked
    without saying so would publish a different model than the user thinks."""
    from ckptd.averaging import average_checkpoints
    from ckptd.metric_sources import find_value, parse_source
    from ckptd.progress import Progress
    from ckptd.ranking import Candidate, rank
    from ckptd.weights import open_checkpoint, provenance_metadata

    if (args.top_k is not None or args.skip_unranked) and not args.metric:
        print("ckptd average: --top-k and --skip-unranked need --metric", file=sys.stderr)
        return EXIT_USAGE
    if args.top_k is not None and args.top_k < 1:
        print("ckptd average: --top-k must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        sources = [parse_source(m) for m in args.metric]
    except CkptdError as exc:
        print(f"ckptd average: --metric: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # each file is opened (mapped) once: the metric is read from the same object the average then streams
    ckpts = [open_checkpoint(p, key=args.key, prefer_ema=args.ema, strip_prefixes=_strip(args),
                             allow_globals=args.allow_global) for p in args.checkpoints]
    chosen_desc, reference_why = "", "the first file given (no --metric to rank by)"
    if sources:
        candidates, unranked = [], []
        for c in ckpts:
            found = find_value(sources, c.path, c.obj, c.metadata, "metric")
            if found.value is None:
                unranked.append(f"{c.path}: {found.where}")
            candidates.append(Candidate(path=str(c.path), metric=found.value, mtime=c.path.stat().st_mtime))
        if unranked and not args.skip_unranked:
            print("ckptd average: no metric in " + "; ".join(unranked)
                  + " (fix --metric, or pass --skip-unranked to leave such files out)", file=sys.stderr)
            return EXIT_USAGE
        ranked = rank(candidates, args.mode)
        if not ranked:
            print("ckptd average: no file yielded a metric from " + ", ".join(args.metric), file=sys.stderr)
            return EXIT_USAGE
        want = args.top_k or len(ckpts)
        if unranked:
            print(f"ckptd average: skipped {len(unranked)} file(s) without a metric: "
                  + ", ".join(u.split(": ", 1)[0] for u in unranked), file=sys.stderr)
        if len(ranked) < want:
            print(f"ckptd average: averaging {len(ranked)} ranked file(s), fewer than the {want} asked for",
                  file=sys.stderr)
        ranked = ranked[:want]
        by_path = {str(c.path): c for c in ckpts}
        ckpts = [by_path[c.path] for c in ranked]
        chosen_desc = ", ".join(f"{Path(c.path).name} ({c.metric:g})" for c in ranked)
        reference_why = f"the best by {args.metric[0]} ({args.mode})"
    reference = 0
    progress = Progress(f"averaging {len(ckpts)} checkpoints")
    md = provenance_metadata(extra={"averaged_from": json.dumps([str(c.path.resolve()) for c in ckpts]),
                                    "reference": str(ckpts[reference].path.resolve())})
    result = average_checkpoints(ckpts, args.output, reference=reference, dtype=_dtype(args.dtype),
                                 metadata=md, progress=progress)
    progress.finish()
    print(f"wrote {args.output}: mean of {len(ckpts)} checkpoints ({result.averaged} tensors averaged, "
          f"{result.copied} integer/bool buffers taken from {Path(result.reference).name}: {reference_why})")
    if chosen_desc:
        print(f"  top-{len(ckpts)} by {args.metric[0]} ({args.mode}): {chosen_desc}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
