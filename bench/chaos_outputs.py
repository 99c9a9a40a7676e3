"""Independent checks of the daemon's published outputs (no ckptd code is used to judge ckptd).

- :class:`OutputValidator` watches every run's output directory while faults happen: any file under an output
  name (``best.safetensors``, ``average.safetensors``, ``manifest.json``, ``members/*``) must be whole whenever
  it is visible, and a member or best file must hold exactly the weights of a version of its source checkpoint
  that a writer really wrote (a torn read of a file being replaced would publish weights nobody wrote).
- :func:`compare_outputs` compares two output trees bitwise (tensors) and semantically (manifest).
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load as st_load

from bench.chaos_data import fingerprint

TEMP_PREFIX = ".ckptd-tmp-"
TENSOR_OUTPUTS = ("best.safetensors", "average.safetensors")


def safetensors_problem(data: bytes) -> str | None:
    """Why ``data`` is not a whole safetensors file (None when it is)."""
    if len(data) < 8:
        return f"{len(data)} bytes: no header length"
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        return f"header of {n} bytes exceeds the file ({len(data)} bytes)"
    try:
        header = json.loads(data[8:8 + n])
    except ValueError as exc:
        return f"header is not JSON ({exc})"
    end = 0
    for name, info in header.items():
        if name != "__metadata__":
            end = max(end, int(info["data_offsets"][1]))
    if 8 + n + end != len(data):
        return f"size {len(data)} != {8 + n + end} declared: partial file"
    return None


def _read_whole(path: Path) -> bytes | None:
    """Read one inode completely (a rename over it while we read does not mix two files)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        chunks, got = [], 0
        while got < size:
            chunk = os.read(fd, size - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class OutputValidator(threading.Thread):
    def __init__(self, out_root: Path, registry: Mapping[str, set[str]], interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.out_root, self.registry, self.interval = out_root, registry, interval
        self.violations: list[str] = []
        self.checked = 0
        self.stopped = False
        self._seen: set[tuple[int, int, int, int]] = set()
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self._halt.is_set():
            self.scan()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.stopped = True
        if self.is_alive():
            self.join(timeout=30)
        self.scan()

    def _violation(self, text: str) -> None:
        if text not in self.violations:
            self.violations.append(text)

    def scan(self) -> list[str]:
        """Check every output file once per version (inode, size, mtime); returns the violations so far."""
        with self._lock:
            for run in sorted(self.out_root.glob("*/*")):
                if not run.is_dir():
                    continue
                for name in TENSOR_OUTPUTS:
                    self._check(run / name, provenance=name == "best.safetensors")
                members = run / "members"
                if members.is_dir():
                    for f in sorted(members.iterdir()):
                        if not f.name.startswith(".") and f.suffix == ".safetensors":
                            self._check(f, provenance=True)
                self._check_manifest(run / "manifest.json")
        return self.violations

    def _key(self, path: Path) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _unseen(self, path: Path) -> tuple[tuple[int, int, int, int], bytes] | None:
        """(identity, bytes) of a file version not checked yet, or None (gone, unreadable, or already seen)."""
        key = self._key(path)
        if key is None or key in self._seen:
            return None
        data = _read_whole(path)
        if data is None:
            return None
        self.checked += 1
        return key, data

    def _check(self, path: Path, provenance: bool) -> None:
        fresh = self._unseen(path)
        if fresh is None:
            return
        key, data = fresh
        problem = safetensors_problem(data)
        if problem is not None:
            # published files only ever appear by rename, complete: any partial view of one is a violation
            self._violation(f"{path}: {problem}")
            return
        self._seen.add(key)
        if not provenance:
            return
        try:
            (n,) = struct.unpack("<Q", data[:8])
            source = json.loads(data[8:8 + n]).get("__metadata__", {}).get("source", "")
            tensors = st_load(data)
        except Exception as exc:  # noqa: BLE001 - anything unreadable is a violation
            self._violation(f"{path}: unreadable by the safetensors package ({type(exc).__name__}: {exc})")
            return
        known = self.registry.get(source)
        if known is not None and fingerprint(tensors) not in known:
            self._violation(f"{path}: weights match no version ever written to {source} (torn or mixed read)")

    def _check_manifest(self, path: Path) -> None:
        fresh = self._unseen(path)
        if fresh is None:
            return
        key, data = fresh
        try:
            doc = json.loads(data)
            assert isinstance(doc, dict) and "best" in doc
        except (ValueError, AssertionError):
            self._violation(f"{path}: not a whole manifest ({len(data)} bytes)")
            return
        self._seen.add(key)


def manifest_view(run: Path) -> dict[str, Any] | None:
    """The parts of manifest.json an uninterrupted run must agree on (not timestamps or processing order)."""
    try:
        m = json.loads((run / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    best = m.get("best") or {}
    avg = m.get("average") or {}
    return {
        "best": (best.get("source"), best.get("metric"), best.get("step")) if best else None,
        "members": sorted((x.get("source"), x.get("metric")) for x in avg.get("members", [])),
        "average": bool(avg.get("path")),
    }


def tensor_files(run: Path) -> dict[str, Path]:
    """Published tensor files by a name independent of processing details: best, average, and the member copies
    the manifest names, keyed by source and metric (member file names carry a content hash whose definition
    may change). Member files the manifest does not name (kept for readers of the previous generation until the
    next cleanup) are not part of what a run publishes."""
    files = {n: run / n for n in TENSOR_OUTPUTS if (run / n).is_file()}
    try:
        manifest = json.loads((run / "manifest.json").read_text())
    except (OSError, ValueError):
        manifest = {}
    for m in (manifest.get("average") or {}).get("members", []):
        f = run / m["path"] if m.get("path") else None
        if f is None or not f.is_file():
            files[f"member {m.get('source')} @ {m.get('metric')}"] = run / "missing"
            continue
        md = _metadata(f)
        files[f"member {md.get('source')} @ {md.get('metric')}"] = f
    return files


def _metadata(path: Path) -> dict[str, str]:
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            return json.loads(fh.read(n)).get("__metadata__", {}) or {}
    except (OSError, ValueError, struct.error):
        return {}


def _tensors_differ(a: Path, b: Path) -> str | None:
    try:
        ta, tb = st_load(a.read_bytes()), st_load(b.read_bytes())
    except Exception as exc:  # noqa: BLE001
        return f"unreadable ({type(exc).__name__}: {exc})"
    if sorted(ta) != sorted(tb):
        return f"keys differ: {sorted(set(ta) ^ set(tb))[:4]}"
    for k in ta:
        if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape or not ta[k].equal(tb[k]):
            return f"tensor {k!r} differs"
    return None


def compare_outputs(got_root: Path, ref_root: Path) -> list[str]:
    """Differences between the daemon's outputs and the reference's, per run (empty: identical)."""
    def runs(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.glob("*/*") if p.is_dir()} if root.is_dir() else set()

    diffs: list[str] = []
    for rel in sorted(runs(got_root) | runs(ref_root)):
        got, ref = got_root / rel, ref_root / rel
        gm, rm = manifest_view(got), manifest_view(ref)
        if gm != rm:
            diffs.append(f"{rel}: manifest {gm} != reference {rm}")
            continue
        gf, rf = tensor_files(got), tensor_files(ref)
        if set(gf) != set(rf):
            diffs.append(f"{rel}: files {sorted(set(gf) ^ set(rf))[:4]} only on one side")
            continue
        for name in sorted(gf):
            why = _tensors_differ(gf[name], rf[name])
            if why:
                diffs.append(f"{rel}/{name}: {why}")
    return diffs


def snapshot(root: Path) -> dict[str, bytes]:
    """Bytes of every output file under ``root`` (small test outputs): to prove 'previous outputs intact'."""
    out: dict[str, bytes] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith(".") and "coreml" not in p.parts:
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def stale_temps(root: Path) -> list[Path]:
    return [p for p in root.rglob(f"{TEMP_PREFIX}*")] if root.is_dir() else []


def wait_until(predicate: Any, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
