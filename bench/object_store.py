"""Benchmark: an object-store watch root (``root: s3://…``) against moto's S3 server on 127.0.0.1.

(a) Ranged reads: a training-state checkpoint (``torch.save`` zip of the model, Adam's two moments per
    parameter, i.e. 2x the parameters more, epoch and metric) read through the mirror stub exactly as the daemon
    reads a candidate (completeness check, then the reader picking the model tensors). Printed: bytes fetched
    against the object's size and against the model tensors plus the zip headers any reader needs (central
    directory, ``data.pkl``, ``byteorder``, the local headers of the storage records).
(b) Listing cost: one refresh of a watch holding N objects (default 10,000: 100 runs x 100 checkpoints) the first
    time (every stub created), in the steady state (nothing changed: one listing, no writes) and after 100 new
    uploads. Requests are counted on the S3 client (botocore events); moto answers from memory on this host, so
    the seconds are a floor: against AWS each LIST page adds a round trip (~20-50 ms).
    The listed objects are 1 KiB, treated as large (stubs) by lowering ``mirror.WHOLE_LIMIT`` for this part,
    so what is measured is the listing and the stub bookkeeping, not N downloads.

    python bench/object_store.py                       # 10M-parameter model (40 MiB; 120 MiB with Adam), 10,000 objects
    python bench/object_store.py --params 2e6 --objects 1000   # quick
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def start_moto() -> str:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    os.environ.update({"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
    return url


class Quiet:
    def __getattr__(self, level: str) -> Any:
        return lambda *a, **kw: None


def count_requests(fs: Any) -> Counter[str]:
    """Every S3 API call the filesystem's client makes, by operation name."""
    counts: Counter[str] = Counter()
    if getattr(fs, "_s3", None) is None:
        fs.connect()
    fs.s3.meta.events.register("before-call.s3", lambda model, **kw: counts.update([model.name]))
    return counts


def training_state(params: int) -> tuple[bytes, int]:
    """A torch.save training state of ~``params`` parameters with Adam's state; (bytes, model tensor bytes)."""
    import torch

    width = 1024
    depth = max(1, round(params / (width * width + width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    buf = io.BytesIO()
    torch.save({"epoch": 3, "metric": 0.5, "model_state_dict": model.state_dict(),
                "optimizer_state_dict": opt.state_dict()}, buf)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return buf.getvalue(), model_bytes


def header_bytes(data: bytes) -> int:
    zf = zipfile.ZipFile(io.BytesIO(data))
    infos = zf.infolist()
    return (len(data) - zf.start_dir) + sum(30 + len(i.filename) for i in infos) \
        + sum(i.file_size for i in infos if "/data/" not in i.filename)


def mirror_for(work: Path, url: str) -> Any:
    from ckptd.remote.mirror import ObjectMirror

    watch = SimpleNamespace(name="w", root=work / "state" / "mirror" / "w", remote=url, storage_options={})
    return ObjectMirror(watch, Quiet())


def ranged_reads(s3: Any, work: Path, params: int) -> dict[str, Any]:
    from ckptd.formats import check_complete
    from ckptd.reader import read_checkpoint
    from ckptd.remote.object_source import STATS

    data, model_bytes = training_state(params)
    s3.create_bucket(Bucket="bench-reads")
    s3.put_object(Bucket="bench-reads", Key="runs/exp/epoch3.pt", Body=data)
    mirror = mirror_for(work / "a", "s3://bench-reads/runs")
    mirror.refresh()
    stub = mirror.root / "exp/epoch3.pt"
    STATS.reset()
    started = time.perf_counter()
    check_complete(stub)
    with read_checkpoint(stub) as reader:
        weights = reader.weights()
    seconds = time.perf_counter() - started
    assert sum(t.numel() * t.element_size() for t in weights.state.values()) == model_bytes
    return {"object": len(data), "model": model_bytes, "headers": header_bytes(data), "fetched": STATS.bytes,
            "gets": STATS.gets, "heads": STATS.heads, "seconds": seconds}


def listing(work: Path, objects: int) -> list[dict[str, Any]]:
    from ckptd.remote import mirror as mirror_mod

    mirror_mod.WHOLE_LIMIT = -1  # every object a stub (see the module docstring)
    m = mirror_for(work / "b", "s3://bench-listing/runs")
    fs, _ = m.filesystem()
    fs.mkdir("bench-listing")
    runs = max(1, objects // 100)
    body = b"\0" * 1024
    fs.pipe({f"bench-listing/runs/run{r:03d}/ckpt{i:04d}.pt": body for r in range(runs)
             for i in range(objects // runs)})
    counts = count_requests(fs)
    rows = []
    for label, before in (("first (creates every stub)", None), ("steady (nothing changed)", None),
                          ("after 100 new objects", "upload")):
        if before == "upload":
            fs.pipe({f"bench-listing/runs/run000/new{i:03d}.pt": body for i in range(100)})
        counts.clear()
        started = time.perf_counter()
        change = m.refresh()
        rows.append({"case": label, "objects": change.objects, "seconds": time.perf_counter() - started,
                     "list_seconds": change.seconds, "changed": len(change.changed),
                     "LIST": counts.get("ListObjectsV2", 0), "GET": counts.get("GetObject", 0),
                     "other": sum(v for k, v in counts.items() if k not in ("ListObjectsV2", "GetObject"))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=10e6, help="model parameters of the checkpoint in (a)")
    parser.add_argument("--objects", type=int, default=10_000, help="objects under the watched prefix in (b)")
    args = parser.parse_args()
    start_moto()
    import boto3

    s3 = boto3.client("s3")
    with tempfile.TemporaryDirectory(prefix="ckptd-bench-s3-") as tmp:
        work = Path(tmp)
        r = ranged_reads(s3, work, int(args.params))
        mb = 1 << 20
        print("(a) ranged reads of a training-state checkpoint (model + Adam state), read as the daemon reads it\n")
        print("| object | model tensors | zip headers | fetched | fetched / (model + headers) | fetched / object "
              "| GETs | HEADs | seconds |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        print(f"| {r['object'] / mb:.1f} MiB | {r['model'] / mb:.1f} MiB | {r['headers'] / 1024:.1f} KiB "
              f"| {r['fetched'] / mb:.2f} MiB | {r['fetched'] / (r['model'] + r['headers']):.4f} "
              f"| {r['fetched'] / r['object']:.3f} | {r['gets']} | {r['heads']} | {r['seconds']:.2f} |")
        rows = listing(work, args.objects)
        print(f"\n(b) listing cost per refresh, {args.objects:,} objects under the prefix (moto on 127.0.0.1)\n")
        print("| refresh | objects listed | seconds (total) | seconds (listing) | stubs written | LIST | GET "
              "| other requests |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            print(f"| {row['case']} | {row['objects']:,} | {row['seconds']:.2f} | {row['list_seconds']:.2f} "
                  f"| {row['changed']:,} | {row['LIST']} | {row['GET']} | {row['other']} |")


if __name__ == "__main__":
    main()
