"""The ``ckptd`` command. Exit codes: 0 ok, 1 runtime failure, 2 usage or config error."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ckptd import __version__
from ckptd.errors import CkptdError, ConfigError

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

    p = sub.add_parser("average", help="average checkpoints (optionally the top-k by a metric)")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--top-k", type=int, default=None, help="average only the best K (needs --metric)")
    p.add_argument("--metric", action="append", default=[], metavar="SRC",
                   help="metric source: checkpoint:KEY.PATH, filename:REGEX, sidecar:{stem}.json[#key], "
                        "trainer_state:KEY (repeatable; first that yields wins)")
    p.add_argument("--mode", choices=["max", "min"], default="max")
    _add_weight_options(p)

    from ckptd.cli_daemon import add_daemon_commands

    add_daemon_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args)) if hasattr(args, "func") else _dispatch(args)
    except MemoryError:
        print("ckptd: error: out of memory", file=sys.stderr)
        return EXIT_FAILURE
    except ConfigError as exc:
        print(f"ckptd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CkptdError as exc:
        print(f"ckptd: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("ckptd: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    return {"inspect": cmd_inspect, "extract": cmd_extract, "average": cmd_average}[args.command](args)


def _strip(args: argparse.Namespace) -> tuple[str, ...]:
    from ckptd.layouts import DEFAULT_STRIP_PREFIXES

    return tuple(args.strip_prefix) if args.strip_prefix else DEFAULT_STRIP_PREFIXES


def cmd_inspect(args: argparse.Namespace) -> int:
    from ckptd.metrics import metric_candidates
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
    from ckptd.weights import extract_weights

    ckpt = extract_weights(args.checkpoint, args.output, key=args.key, prefer_ema=args.ema,
                           strip_prefixes=_strip(args), dtype=_dtype(args.dtype), allow_globals=args.allow_global)
    print(f"wrote {args.output}: {len(ckpt.weights)} tensors from '{ckpt.key or '.'}' ({ckpt.layout})")
    return EXIT_OK


def cmd_average(args: argparse.Namespace) -> int:
    from ckptd.averaging import average_checkpoints
    from ckptd.progress import Progress
    from ckptd.selection import select_top_k
    from ckptd.weights import provenance_metadata

    paths = list(args.checkpoints)
    reference = 0
    chosen_desc = ""
    if args.top_k is not None or args.metric:
        if not args.metric:
            print("ckptd average: --top-k needs --metric", file=sys.stderr)
            return EXIT_USAGE
        if args.top_k is not None and args.top_k < 1:
            print("ckptd average: --top-k must be >= 1", file=sys.stderr)
            return EXIT_USAGE
        ranked = select_top_k(paths, args.metric, args.top_k or len(paths), args.mode)
        paths = [c.path for c in ranked]
        chosen_desc = ", ".join(f"{Path(c.path).name} ({c.metric:g})" for c in ranked)
    progress = Progress(f"averaging {len(paths)} checkpoints")
    md = provenance_metadata(extra={"averaged_from": json.dumps([str(Path(p).resolve()) for p in paths]),
                                    "reference": str(Path(paths[reference]).resolve())})
    result = average_checkpoints(paths, args.output, reference=reference, dtype=_dtype(args.dtype), key=args.key,
                                 prefer_ema=args.ema, strip_prefixes=_strip(args), allow_globals=args.allow_global,
                                 metadata=md, progress=progress)
    progress.finish()
    print(f"wrote {args.output}: mean of {len(paths)} checkpoints ({result.averaged} tensors averaged, "
          f"{result.copied} integer/bool buffers taken from {Path(result.reference).name})")
    if chosen_desc:
        print(f"  top-{len(paths)} by {args.metric[0]} ({args.mode}): {chosen_desc}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
