"""Fault class: the output filesystem fills up (a real size-limited tmpfs mounted as the output root)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from bench.chaos_harness import ClassResult, Scenario
from bench.chaos_kill import settle

NO_SPACE = re.compile(r"(?i)no space left|ENOSPC|disk (is )?full|out of (disk )?space|errno 28")


def mount_tmpfs(path: Path, size_mb: int) -> str | None:
    """Mount a tmpfs of ``size_mb`` MiB at ``path``; returns why not (None when mounted)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root (the CI machine runs tests as root)"
    if shutil.which("mount") is None:
        return "no mount command on this machine"
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        return f"mount -t tmpfs failed: {res.stderr.strip() or res.returncode} (no CAP_SYS_ADMIN in this container?)"
    return None


def unmount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(fs: Path, ballast: Path, leave: int) -> int:
    """Write zeros into ``ballast`` until only ``leave`` bytes are free on ``fs``; returns bytes written."""
    st = os.statvfs(fs)
    target = max(0, st.f_bavail * st.f_frsize - leave)
    written = 0
    with open(ballast, "wb") as fh:
        block = b"\0" * (1 << 16)
        try:
            while written < target:
                written += fh.write(block[: min(len(block), target - written)])
            fh.flush()
        except OSError:
            pass
    return written


def published(run: Path) -> dict[str, bytes]:
    """What a reader sees under the output names (through the links), before and after a failure."""
    out: dict[str, bytes] = {}
    for name in ("manifest.json", "best.safetensors", "average.safetensors"):
        try:
            out[name] = (run / name).read_bytes()
        except OSError:
            pass
    members = run / "members"
    if members.is_dir():
        for f in members.iterdir():
            if not f.name.startswith("."):
                out[f"members/{f.name}"] = f.read_bytes()
    return out


def run_disk_full(work: Path, cycles: int, *, kb: int = 256, size_mb: int = 8, resume_timeout: float = 45,
                  seed: int = 21) -> ClassResult:
    """Each cycle: outputs published; the tmpfs is filled, leaving room for 0, 1, 1.3 ... 3.1 model sizes in
    turn; a new best arrives: previous outputs must stay byte-identical, an error line must say the disk is full
    (once, not a flood); then the ballast is deleted and the pending best must be published without any new
    checkpoint. A cycle whose publication fitted into the room left is no fault and not counted."""
    res = ClassResult("disk full on the output fs")
    mnt = work / "disk_full_fs"
    why = mount_tmpfs(mnt, size_mb)
    if why:
        res.skipped = why
        return res
    try:
        sc = Scenario(work, "disk_full", kb=kb, seed=seed, out_root=mnt / "out")
        run = sc.run_dir("exp")
        metric = 0.5
        sc.write(run / "c_000.pt", seed * 1000, metric)
        sc.start()
        out_run = sc.out / "w" / "exp"
        trials: list[tuple[bool, str | None]] = []
        if not sc.wait_best("exp", run / "c_000.pt", 60):
            trials.append((False, "first checkpoint never published"))
        # free space left, in model sizes: the failure hits each publishing stage in turn
        room = [int(f * kb * 1024) for f in (0.03, 1.05, 1.3, 1.6, 1.85, 2.1, 2.35, 2.6, 2.85, 3.1)]
        fitted = 0
        for c in range(1, cycles + 1):
            before = published(out_run)
            ballast = mnt / "ballast"
            # leave room for nothing, then for one, two... output files: the failure hits each publishing stage
            fill(mnt, ballast, room[(c - 1) % len(room)])
            metric += 0.01
            path = run / f"c_{c:03d}.pt"
            since = len(sc.events())
            sc.write(path, seed * 1000 + c, metric)  # the training dir is not on the full fs
            sc.daemon.until(lambda ev, s=since, p=path: sc.wait_best("exp", p, 0) or any(
                NO_SPACE.search(json.dumps(e)) for e in ev[s:] if e.get("level") in ("warning", "error")), 20)
            time.sleep(1.0)
            lines = [e for e in sc.events()[since:] if e.get("level") in ("warning", "error")
                     and NO_SPACE.search(json.dumps(e))]
            if not lines and sc.wait_best("exp", path, 0):
                fitted += 1  # this implementation needed less room than we left: no fault, not a trial
                ballast.unlink()
                continue
            after = published(out_run)
            problems = []
            if any(after.get(k) != v for k, v in before.items()):
                changed = [k for k, v in before.items() if after.get(k) != v]
                problems.append(f"previous outputs changed while the disk was full: {changed[:3]}")
            if not lines:
                problems.append("no error line saying the disk is full")
            elif len(lines) > 3:
                problems.append(f"{len(lines)} disk-full lines in ~2 s (a flood, not one clear error)")
            ballast.unlink()
            t0 = time.monotonic()
            if not sc.wait_best("exp", path, resume_timeout):
                problems.append(f"not resumed within {resume_timeout:g}s after space was freed "
                                "(no new checkpoint was written)")
            elif c == 1:
                res.note(f"info: resumed {time.monotonic() - t0:.1f}s after space was freed; "
                         f"first line: {lines[0].get('event') if lines else '-'}: "
                         f"{str(lines[0].get('reason', ''))[:120] if lines else ''}")
            why = sc.check_alive()
            if why:
                problems.append(why)
            trials.append((not problems, "; ".join(problems) or None))
        if fitted:
            res.note(f"info: {fitted} of {cycles} cycles left enough room (no fault: not counted)")
        return settle(res, trials, sc.finish(timeout=60))
    finally:
        unmount(mnt)
