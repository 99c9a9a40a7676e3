"""Benchmark: the daemon's end-to-end latency and its idle CPU.

1. Latency: a writer renames ~100 MB fp32 checkpoints into a watched run (k = 5, events mode, each a new best so
   every one updates the average); we time rename -> manifest.json listing it (published right after
   average.safetensors). The baseline measured in the same run: one streamed average of 5 such models.
2. Idle CPU: the daemon watching 100 empty runs for 60 s (utime+stime from /proc).

3. Training-state files (``--training-state``): 720 MB checkpoints (240 MB model + 480 MB Adam state), k = 5;
   rename -> published, against the work that cannot be avoided, measured in the same run: one in-process
   streamed average of the k members plus one durable (fsynced) model-size write. ``--src DIR`` runs the daemon
   from another checkout (e.g. a ``git worktree`` of an older commit) to get the "before" figure on the same files.

    python bench/daemon.py                       # full: 50 checkpoints of 100 MiB, 60 s idle
    python bench/daemon.py --mb 20 --n 10 --idle 10   # quick
    python bench/daemon.py --training-state --n 10 [--src /tmp/ckptd-before]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from bench import daemon_process  # noqa: E402

SRC = REPO  # the checkout the daemon runs from (--src)


def start_daemon(cfg: dict, work: Path) -> subprocess.Popen:
    return daemon_process.start_daemon(cfg, work, SRC)


def read_bytes(pid: int) -> int:
    """Bytes the process read through read()-family syscalls (rchar): the hashing and reading it did itself."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def config(work: Path, root: Path, runs: str) -> dict:
    return {"state_dir": str(work / "state"), "log": {"format": "json"},
            "watches": [{"name": "bench", "root": str(root), "runs": runs, "output": str(work / "out/{watch}/{run}"),
                         "mode": "events", "settle": "5s"}],
            "policies": {"default": {"average": {"top_k": 5, "min_members": 2}}}}


def latency(work: Path, mb: int, n: int) -> None:
    root = work / "train"
    run = root / "exp"
    run.mkdir(parents=True)
    proc = start_daemon(config(work, root, "*"), work)
    per = mb * 2**20 // 4 // 8
    base = {f"layer{j}.weight": torch.randn(per // 512, 512) for j in range(8)}
    lat: list[float] = []
    manifest = work / "out/bench/exp/manifest.json"
    try:
        for i in range(n):
            state = {"model_state_dict": {k: v + i * 0.01 for k, v in base.items()}, "metric": float(i),
                     "iterations": i}
            tmp = run / f"ckpt_{i:03d}.pt.tmp"
            final = run / f"ckpt_{i:03d}.pt"
            torch.save(state, tmp)
            os.sync()  # keep the writer's own flush out of the daemon's latency
            t0 = time.perf_counter()
            os.replace(tmp, final)
            while True:
                try:
                    if str(final) in manifest.read_text():
                        break
                except OSError:
                    pass
                if time.perf_counter() - t0 > 120:
                    raise RuntimeError("timed out: " + (work / "daemon.log").read_text()[-2000:])
                time.sleep(0.002)
            lat.append(time.perf_counter() - t0)
            for old in sorted(run.glob("ckpt_*.pt"))[:-6]:
                old.unlink()  # the trainer prunes: keeps disk use bounded
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    import json

    from ckptd.averaging import average_checkpoints

    out_dir = manifest.parent
    members = [out_dir / m["path"] for m in json.loads(manifest.read_text())["average"]["members"]]
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        average_checkpoints(members, work / "baseline_avg.safetensors")
        times.append(time.perf_counter() - t0)
    avg_t = statistics.median(times)
    steady = lat[5:] if len(lat) > 6 else lat
    p95 = statistics.quantiles(steady, n=20)[-1] if len(steady) >= 2 else steady[0]
    print(f"LATENCY rename -> published average ({n} checkpoints of {mb} MiB, k=5, events mode)")
    print(f"  all        median {statistics.median(lat):.3f} s   p95 {statistics.quantiles(lat, n=20)[-1]:.3f} s")
    print(f"  k full     median {statistics.median(steady):.3f} s   p95 {p95:.3f} s   (after the first 5)")
    print(f"  baseline   one streamed average of {len(members)} members: {avg_t:.3f} s")
    print(f"  overhead   median latency - averaging time = {statistics.median(steady) - avg_t:.3f} s "
          "(reading + hashing the model, pinned member copy, fsyncs, generation swap, detection)")


def wait_published(manifest: Path, final: Path, t0: float, work: Path) -> float:
    while True:
        try:
            if str(final) in manifest.read_text():
                return time.perf_counter() - t0
        except OSError:
            pass
        if time.perf_counter() - t0 > 300:
            raise RuntimeError("timed out: " + (work / "daemon.log").read_text()[-2000:])
        time.sleep(0.002)


def training_state(work: Path, n: int, model_mb: int = 240) -> None:
    """720 MB training-state checkpoints: is identity/hashing still reading the optimizer state?"""
    root = work / "train"
    run = root / "exp"
    run.mkdir(parents=True)
    cfg = config(work, root, "*")
    cfg["watches"][0]["settle"] = "30s"  # only the rename (the commit signal) may make it ready
    proc = start_daemon(cfg, work)
    per = model_mb * 2**20 // 4 // 8
    base = {f"layer{j}.weight": torch.randn(per // 512, 512) for j in range(8)}
    optim = {"state": {j: {"exp_avg": torch.randn(per // 512, 512), "exp_avg_sq": torch.rand(per // 512, 512),
                           "step": torch.tensor(1.0)} for j in range(8)}, "param_groups": [{"lr": 1e-3}]}
    lat: list[float] = []
    reads: list[int] = []
    manifest = work / "out/bench/exp/manifest.json"
    try:
        for i in range(n):
            state = {"model_state_dict": {k: v + i * 0.01 for k, v in base.items()}, "optim_state_dict": optim,
                     "metric": float(i), "iterations": i}
            tmp, final = run / f"training_checkpoint_{i:03d}.pt.tmp", run / f"training_checkpoint_{i:03d}.pt"
            torch.save(state, tmp)
            os.sync()
            os.system("sync; echo 1 > /proc/sys/vm/drop_caches 2>/dev/null")  # cold reads, as on a real host
            r0 = read_bytes(proc.pid)
            t0 = time.perf_counter()
            os.replace(tmp, final)
            lat.append(wait_published(manifest, final, t0, work))
            reads.append(read_bytes(proc.pid) - r0)
            for old in sorted(run.glob("training_checkpoint_*.pt"))[:-6]:
                old.unlink()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    size = final.stat().st_size
    import json

    from ckptd.averaging import average_checkpoints
    from ckptd.safetensors_io import save_safetensors

    listed = json.loads(manifest.read_text())["average"]["members"]
    out_dir = manifest.parent
    members = [out_dir / m["path"] for m in listed] if listed and "path" in listed[0] else \
        sorted((out_dir / "members").glob("*.safetensors"))[:5]

    avg_times, write_times = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        average_checkpoints(members, work / "baseline_avg.safetensors")
        avg_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        save_safetensors(work / "baseline_write.safetensors", base)  # temp, fsync, rename, fsync dir
        write_times.append(time.perf_counter() - t0)
    floor = statistics.median(avg_times) + statistics.median(write_times)
    steady = lat[5:] if len(lat) > 6 else lat
    med = statistics.median(steady)
    print(f"TRAINING STATE rename -> published ({n} files of {size / 1e6:.0f} MB, model {model_mb} MiB, k=5, "
          f"daemon from {SRC})")
    print(f"  k full     median {med:.3f} s   max {max(steady):.3f} s   (after the first 5)")
    print(f"  floor      streamed average of {len(members)} members {statistics.median(avg_times):.3f} s + one "
          f"durable model-size write {statistics.median(write_times):.3f} s = {floor:.3f} s")
    print(f"  ratio      latency / floor = {med / floor:.2f}")
    print(f"  reads      read() bytes per checkpoint (median) {statistics.median(reads[5:] or reads) / 1e6:.0f} MB "
          f"of a {size / 1e6:.0f} MB file")


def idle_cpu(work: Path, seconds: float, runs: int = 100) -> None:
    root = work / "idle"
    for r in range(runs):
        (root / f"run{r:03d}").mkdir(parents=True)
    cfg = config(work / "idle_state", root, "*")
    (work / "idle_state").mkdir()
    proc = start_daemon(cfg, work / "idle_state")
    try:
        time.sleep(3)
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_seconds(proc.pid), time.monotonic()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    print(f"IDLE CPU watching {runs} runs for {seconds:.0f} s: {100 * (c1 - c0) / (t1 - t0):.2f}% of one core "
          f"({c1 - c0:.2f} CPU-s)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--idle", type=float, default=60)
    ap.add_argument("--training-state", action="store_true", help="720 MB training-state files (see above)")
    ap.add_argument("--src", type=Path, default=REPO, help="run the daemon from this checkout")
    args = ap.parse_args()
    global SRC
    SRC = args.src.resolve()
    work = Path(tempfile.mkdtemp(prefix="ckptd-bench-"))
    try:
        if args.training_state:
            training_state(work, args.n)
            return
        latency(work, args.mb, args.n)
        idle_cpu(work, args.idle)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
