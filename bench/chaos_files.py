"""Fault classes on the trainer's side of the files: writers killed mid-file, files truncated or deleted after the
daemon validated them, replaced under the same name, and rewritten in place in a loop while the daemon reads
them (plain ``torch.save`` to the same path, and ``open(path, "r+b")`` truncate + rewrite: the SIGBUS class)."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path

from bench.chaos_data import checkpoint, serialize
from bench.chaos_harness import ClassResult, Scenario, WriterProc
from bench.chaos_kill import settle

Trial = tuple[bool, "str | None"]


def _scenario(work: Path, name: str, kb: int, seed: int, settle_s: str = "1s") -> tuple[Scenario, Path]:
    sc = Scenario(work, name, kb=kb, seed=seed, watch={"settle": settle_s})
    run = sc.run_dir("exp")
    for i in range(3):  # >= k final files: an orphaned version can never stay in the top-k
        sc.write(run / f"base_{i}.pt", seed * 1000 + i, sc.metrics.final())
    sc.start()
    return sc, run


def _alive(sc: Scenario) -> Trial:
    why = sc.check_alive()
    return (why is None, why)


def _restore(path: Path, data: bytes) -> None:
    """The trainer writes the file again, atomically, with the same content (a new identity, same bytes)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def run_writer_killed(work: Path, trials: int, *, kb: int = 2048, seed: int = 11) -> ClassResult:
    """A writer process is SIGKILLed while writing a checkpoint in place; half of the partial files stay (the
    daemon must wait, logging once), half are written again whole by a 'restarted trainer'."""
    res = ClassResult("writer killed mid-file")
    rng = random.Random(seed)
    sc, run = _scenario(work, "writer_killed", kb, seed)
    out: list[Trial] = []
    for t in range(trials):
        path = run / f"wk_{t:03d}.pt"
        sc.registry[str(path)]
        s = seed * 1000 + 100 + t
        full = len(serialize(checkpoint(s, 0.0, 0, kb)))
        writer = WriterProc()
        writer.send(op="save", path=str(path), seed=s, metric=sc.metrics.orphan(), step=sc.next_step(), kb=kb,
                    how="slow", chunk_delay=0.02)
        if writer.until("started", 60) is None:
            writer.kill()
            out.append((False, "writer did not start"))
            continue
        time.sleep(rng.uniform(0.02, 0.02 * full / 65536 * 0.8))
        writer.kill()
        size = path.stat().st_size
        since = len(sc.events())
        time.sleep(2.5)  # settle (1 s) passes: the daemon looks at the partial file
        ok, why = _alive(sc)
        lines = [e for e in sc.lines_naming(path, since) if e.get("level") in ("warning", "error")]
        if ok and len(lines) > 1:
            ok, why = False, f"partial file logged {len(lines)} times (expected once): {lines[-1].get('reason')}"
        if size >= full:
            why = "info: a writer finished before its kill (no fault injected)"
        if t % 2 == 0:
            sc.write(path, s + 50, sc.metrics.final(), how="inplace")
        out.append((ok, why))
    return settle(res, out, sc.finish(timeout=90))


def _after_write_fault(work: Path, name: str, title: str, trials: int, kb: int, seed: int,
                       fault: Callable[[Path, bytes, random.Random], None], heal_every: int) -> ClassResult:
    """Write a checkpoint (renamed into place: ready at once), then hit it 0-0.4 s later, i.e. before, during
    or after the daemon's validation and read. Healed trials get the same bytes back later (final band)."""
    res = ClassResult(title)
    rng = random.Random(seed)
    sc, run = _scenario(work, name, kb, seed)
    out: list[Trial] = []
    for t in range(trials):
        path = run / f"{name}_{t:03d}.pt"
        heal = heal_every > 0 and t % heal_every == 0
        sc.write(path, seed * 1000 + 100 + t, sc.metrics.final() if heal else sc.metrics.orphan())
        data = path.read_bytes()
        time.sleep(rng.uniform(0.0, 0.4))
        fault(path, data, rng)
        time.sleep(rng.uniform(0.5, 2.0))
        if heal:
            _restore(path, data)
        out.append(_alive(sc))
    return settle(res, out, sc.finish(timeout=90))


def _truncate(path: Path, data: bytes, rng: random.Random) -> None:
    os.truncate(path, rng.randint(len(data) // 8, len(data) * 7 // 8))


def _delete(path: Path, data: bytes, rng: random.Random) -> None:
    path.unlink()


def run_truncated(work: Path, trials: int, *, kb: int = 2048, seed: int = 12) -> ClassResult:
    return _after_write_fault(work, "truncated", "truncated after validation", trials, kb, seed, _truncate, 2)


def run_deleted(work: Path, trials: int, *, kb: int = 2048, seed: int = 13) -> ClassResult:
    return _after_write_fault(work, "deleted", "deleted while read", trials, kb, seed, _delete, 2)


def run_replaced(work: Path, trials: int, *, kb: int = 2048, seed: int = 14) -> ClassResult:
    """Version A (orphan band) renamed into place, then 0-0.4 s later version B renamed over the same name."""
    res = ClassResult("replaced under the same name")
    rng = random.Random(seed)
    sc, run = _scenario(work, "replaced", kb, seed)
    out: list[Trial] = []
    for t in range(trials):
        path = run / f"rp_{t:03d}.pt"
        sc.write(path, seed * 1000 + 100 + t, sc.metrics.orphan())
        time.sleep(rng.uniform(0.0, 0.4))
        sc.write(path, seed * 1000 + 500 + t, sc.metrics.final())
        time.sleep(rng.uniform(0.3, 1.0))
        out.append(_alive(sc))
    return settle(res, out, sc.finish(timeout=90))


def rchar(pid: int) -> int:
    """Bytes the process has read so far (/proc/PID/io), any file."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def wait_reading(pid: int, since: int, nbytes: int, timeout: float) -> bool:
    """Wait until the process has read ``nbytes`` more than ``since`` (it is reading the new version: nothing
    else is there to read). An open fd or a mapping is no sign: both outlive a read of an in-place file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rchar(pid) - since >= nbytes:
            return True
        time.sleep(0.002)
    return False


def run_rewrite_in_place(work: Path, rewrites: int, *, how: str = "inplace", kb: int = 16384,
                         seed: int = 15) -> ClassResult:
    """A writer process rewrites ``last.pt`` in place, ``rewrites`` times. Each rewrite is triggered while the
    daemon is reading the current version: the harness watches the daemon's read counter (/proc/PID/io) until
    it has read 1 MiB of it, then waits 0-0.12 s more (to land anywhere in the processing: hashing, loading,
    copying weights out) and has the writer truncate and rewrite it. Every version is a new best (metrics increase), so
    a completed read goes all the way to a published member (copying the channels_last conv weight out of the
    file: where a mapped read dies of SIGBUS). At the end three higher-ranked files are renamed in, so no
    version of last.pt but possibly the last one can be in the final top-3 (see Metrics).
    how: inplace (plain torch.save to the same path) | rplus (open r+b, truncate, rewrite)."""
    title = {"inplace": "rewritten in place (torch.save)", "rplus": "rewritten in place (r+b truncate)"}[how]
    res = ClassResult(title)
    rng = random.Random(seed)
    sc = Scenario(work, f"rewrite_{how}", kb=kb, seed=seed, watch={"settle": "0.3s"})
    run = sc.run_dir("exp")
    for i in range(2):
        sc.write(run / f"base_{i}.pt", seed * 1000 + i, sc.metrics.orphan())
    sc.start()
    assert sc.daemon is not None
    path = run / "last.pt"
    metrics = sorted(sc.metrics.orphan() for _ in range(rewrites))
    writer = WriterProc()
    out: list[Trial] = []
    hits = 0
    before = 0
    for i, metric in enumerate(metrics):
        s = seed * 1000 + 100 + i
        sc.register(path, s)
        writer.prepare(path, s, metric, i + 1, kb=kb, how=how)  # built in memory: the save truncates at once
        if i and wait_reading(sc.daemon.proc.pid, before, 1 << 20, 3.0):
            hits += 1
            time.sleep(rng.uniform(0.0, 0.12))
        writer.commit()
        before = rchar(sc.daemon.proc.pid)
        if i:
            why = sc.check_alive()  # the daemon was reading the previous version: did it survive?
            out.append((why is None, why))
    time.sleep(1.5)
    why = sc.check_alive()
    out.append((why is None, why))
    writer.close()
    for i in range(3):  # the final top-3, above every version of last.pt
        sc.write(run / f"final_{i}.pt", seed * 1000 + 900 + i, sc.metrics.final())
    res.note(f"info: the daemon was reading last.pt when {hits} of {rewrites - 1} rewrites began")
    return settle(res, out, sc.finish(timeout=90))
