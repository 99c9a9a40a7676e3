"""Run one measured job in a fresh subprocess: wall time and peak anonymous RSS above the interpreter baseline.

The child imports torch/ckptd first, records RssAnon as the baseline, then samples it every 2 ms from a thread
while the job runs. File-backed pages (mmap'd inputs) are not counted as memory; they are reported separately,
with the bytes read through read() syscalls, as "bytes of the file touched".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
import torch, ckptd.averaging, ckptd.weights  # noqa: F401  (baseline includes the libraries)
sys.path.insert(0, sys.argv[1])
import jobs
def status(key):
    with open('/proc/self/status') as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0
job, args = sys.argv[2], json.loads(sys.argv[3])
def rchar():
    with open('/proc/self/io') as fh:
        for line in fh:
            if line.startswith('rchar:'):
                return int(line.split()[1])
    return 0
base = status('RssAnon:'); file0 = status('RssFile:'); read0 = rchar()
peak = [base]; fpeak = [file0]; done = [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], status('RssAnon:')); fpeak[0] = max(fpeak[0], status('RssFile:'))
        time.sleep(0.002)
t = threading.Thread(target=sample, daemon=True); t.start()
t0 = time.perf_counter()
extra = getattr(jobs, job)(**args) or {}
wall = time.perf_counter() - t0
done[0] = True; t.join()
peak[0] = max(peak[0], status('RssAnon:'))
print(json.dumps({"wall_s": wall, "peak_anon_bytes": peak[0] - base, "peak_file_rss_bytes": fpeak[0] - file0,
                  "read_syscall_bytes": rchar() - read0, **extra}))
"""


def measure(job: str, **args: object) -> dict:
    here = Path(__file__).resolve().parent
    env = dict(os.environ)
    env["PYTHONPATH"] = str(here.parent) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", CHILD, str(here), job, json.dumps(args)],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
