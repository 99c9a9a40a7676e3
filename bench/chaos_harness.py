"""The fault suite's harness: a real ``ckptd run`` process on real directories, an independent watcher of its
outputs, and the comparison with an uninterrupted reference (``ckptd once`` on the same final checkpoints).

Used by ``bench/chaos.py`` (the full table) and ``tests/test_chaos.py`` (the CI subset). Nothing here fakes the
daemon: faults are injected from outside (signals, truncation, renames, a full tmpfs, hostile files).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.chaos_data import checkpoint, save, version_fingerprint  # noqa: E402
from bench.chaos_outputs import OutputValidator, compare_outputs, stale_temps  # noqa: E402
from bench.chaos_procs import RssSampler, WriterProc, rss_bytes  # noqa: E402, F401 - re-exported
from tests.conftest import PYTHON, subprocess_env  # noqa: E402
from tests.daemon_helpers import DaemonProcess, write_config  # noqa: E402

FINAL_EVENTS = {"checkpoint.joined", "checkpoint.skipped", "checkpoint.duplicate", "checkpoint.unranked",
                "checkpoint.invalid", "checkpoint.refused", "checkpoint.incomplete"}
SIGNAMES = {-signal.SIGBUS: "SIGBUS", -signal.SIGSEGV: "SIGSEGV", -signal.SIGKILL: "SIGKILL",
            -signal.SIGABRT: "SIGABRT", 135: "SIGBUS (rc 135)"}


@dataclass
class ClassResult:
    """One row of the table: a fault class, how many trials ran, how many passed, and why the others failed."""

    name: str
    trials: int = 0
    passed: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str = ""

    def record(self, ok: bool, note: str | None = None) -> None:
        self.trials += 1
        self.passed += bool(ok)
        if note and (not ok or note.startswith("info:")):
            self.note(note)

    def note(self, text: str) -> None:
        text = " | ".join(ln.strip() for ln in text.splitlines() if ln.strip() and set(ln.strip()) != {"^"})
        if text not in self.notes and len(self.notes) < 12:
            self.notes.append(text[:400])

    @property
    def ok(self) -> bool:
        return not self.skipped and self.trials > 0 and self.passed == self.trials


def describe_exit(rc: int | None) -> str:
    if rc is None:
        return "running"
    return f"rc {rc}" + (f" ({SIGNAMES[rc]})" if rc in SIGNAMES else "")


class ChaosDaemon(DaemonProcess):
    """``ckptd run`` as a subprocess (tests.daemon_helpers.DaemonProcess) with an incremental log reader, so
    that restarts can append to one log and 'ready' means ready *this* time; start without waiting for ready."""

    def __init__(self, config: Path, log_path: Path, *, wait_ready: bool = True, timeout: float = 90) -> None:
        self.config, self.log_path = config, log_path
        self._offset, self._tail, self._events = 0, b"", []
        self._log = open(log_path, "ab")  # noqa: SIM115 - kept open for the process lifetime
        self.start_index = len(self.events())
        self.started = time.monotonic()
        self.proc = subprocess.Popen([PYTHON, "-m", "ckptd.cli", "run", "-c", str(config)], stdout=self._log,
                                     stderr=self._log, env=subprocess_env(), cwd=REPO)
        if wait_ready and not self.until(lambda ev: any(e.get("event") == "daemon.ready"
                                                        for e in ev[self.start_index:]), timeout):
            raise RuntimeError(f"daemon not ready ({describe_exit(self.proc.poll())}):\n{self.tail()}")

    def events(self) -> list[dict[str, Any]]:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except OSError:
            return self._events
        self._offset += len(data)
        lines = (self._tail + data).split(b"\n")
        self._tail = lines.pop()
        for raw in lines:
            raw = raw.strip()
            if raw.startswith(b"{"):
                try:
                    self._events.append(json.loads(raw))
                except ValueError:
                    continue
        return self._events

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def until(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float) -> bool:
        """Wait for ``predicate(events)``; False on timeout or when the daemon exits."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self.events()):
                return True
            if not self.alive() or time.monotonic() > deadline:
                return bool(predicate(self.events()))
            time.sleep(0.05)

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log.close()

    def stop(self, timeout: float = 60) -> int:
        try:
            return super().stop(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -999


class Metrics:
    """Distinct metric values in two bands. 'orphan' versions (a file's content that is later replaced) rank
    below every 'final' one, so with >= k final files an orphan can never be in the final top-k, and an
    uninterrupted reference run over the final files must give the same outputs."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.used = rng, set()

    def _draw(self, lo: float, hi: float) -> float:
        while True:
            v = round(self.rng.uniform(lo, hi), 6)
            if v not in self.used:
                self.used.add(v)
                return v

    def orphan(self) -> float:
        return self._draw(0.05, 0.45)

    def final(self) -> float:
        return self._draw(0.5, 0.95)


class Scenario:
    """One daemon (restarted as faults require) over one training root; ends with the reference comparison."""

    def __init__(self, work: Path, name: str, *, kb: int = 64, top_k: int = 3, policy: dict | None = None,
                 watch: dict | None = None, extra: dict | None = None, out_root: Path | None = None,
                 seed: int = 0) -> None:
        self.dir = work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.train = self.dir / "train"
        self.out = out_root or self.dir / "out"
        self.canary = self.dir / "canary"
        self.canary.mkdir(exist_ok=True)
        self.kb, self.rng = kb, random.Random(seed)
        self.metrics = Metrics(self.rng)
        self.policy = {"average": {"top_k": top_k, "min_members": min(2, top_k)}, **(policy or {})}
        self.watch = {"output": f"{self.out}/{{watch}}/{{run}}", "settle": "1s", **(watch or {})}
        self.extra = {"state_dir": str(self.dir / "state"), **(extra or {})}
        self.config = write_config(self.dir, policy=self.policy, watch=self.watch, extra=self.extra)
        self.registry: dict[str, set[str]] = defaultdict(set)
        self.validator = OutputValidator(self.out, self.registry)
        self.log_path = self.dir / "daemon.log"
        self.daemon: ChaosDaemon | None = None
        self.deaths: list[str] = []
        self.notes: list[str] = []
        self.run_diffs: dict[str, list[str]] = {}
        self.step = 0

    # --- the daemon ------------------------------------------------------------------------------------------
    def start(self, wait_ready: bool = True) -> ChaosDaemon:
        if not self.validator.is_alive() and not self.validator.stopped:
            self.validator.start()
        self.daemon = ChaosDaemon(self.config, self.log_path, wait_ready=wait_ready)
        return self.daemon

    def kill(self) -> None:
        assert self.daemon is not None
        if not self.daemon.alive():
            self.deaths.append(f"died on its own before a planned kill: {describe_exit(self.daemon.proc.returncode)}")
        self.daemon.kill()

    def check_alive(self) -> str | None:
        """None when the daemon runs; else why it died (and it is restarted so the scenario can go on)."""
        assert self.daemon is not None
        if self.daemon.alive():
            return None
        why = f"daemon died: {describe_exit(self.daemon.proc.returncode)}; log tail: " + \
              " | ".join(self.daemon.tail(600).splitlines()[-3:])
        self.deaths.append(why)
        self.daemon._log.close()
        self.start()
        return why

    def events(self) -> list[dict[str, Any]]:
        return self.daemon.events() if self.daemon else []

    def wait_processed(self, path: Path, timeout: float = 30, since: int = 0) -> bool:
        assert self.daemon is not None
        return self.daemon.until(lambda ev: any(e.get("event") in FINAL_EVENTS and e.get("checkpoint") == str(path)
                                                for e in ev[since:]), timeout)

    def lines_naming(self, path: Path | str, since: int = 0) -> list[dict[str, Any]]:
        """Log lines naming ``path``, also in an escaped form (a name that is not valid UTF-8 can only be logged
        escaped: repr, or backslash escapes of its bytes)."""
        raw = str(path)
        needles = {raw, repr(raw)[1:-1], os.fsencode(raw).decode("utf-8", "backslashreplace")}
        return [e for e in self.events()[since:]
                if any(isinstance(v, str) and any(n in v for n in needles) for v in e.values())]

    def manifest(self, run: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.out / "w" / run / "manifest.json").read_text())
        except (OSError, ValueError):
            return None

    def wait_best(self, run: str, source: Path, timeout: float) -> bool:
        """Wait until the run's manifest names ``source`` as best (checked at least once)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.manifest(run)
            if m and (m.get("best") or {}).get("source") == str(source):
                return True
            if time.monotonic() >= deadline or (self.daemon is not None and not self.daemon.alive()):
                return False
            time.sleep(0.1)

    # --- writing -----------------------------------------------------------------------------------------------
    def run_dir(self, name: str) -> Path:
        d = self.train / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def register(self, path: Path, seed: int, arch: str = "a") -> None:
        self.registry[str(path)].add(version_fingerprint(seed, self.kb, arch))

    def next_step(self) -> int:
        self.step += 1
        return self.step

    def write(self, path: Path, seed: int, metric: float, *, how: str = "atomic", arch: str = "a",
              poison: str = "") -> None:
        """A real torch.save from this process (writer subprocesses are used where the writer itself matters)."""
        if not poison:
            self.register(path, seed, arch)
        save(checkpoint(seed, metric, self.next_step(), self.kb, arch, poison), path, how)

    # --- the end ------------------------------------------------------------------------------------------------
    def reference(self) -> tuple[Path, str]:
        """``ckptd once`` over the same training root, in a fresh state_dir and output: the uninterrupted run."""
        ref = self.dir / "reference"
        shutil.rmtree(ref, ignore_errors=True)
        ref.mkdir()
        policy = {**self.policy, "export": {"coreml": {"enabled": False}}}
        watch = {**self.watch, "root": str(self.train), "output": f"{ref}/out/{{watch}}/{{run}}"}
        cfg = write_config(ref, policy=policy, watch=watch, extra={**self.extra, "state_dir": str(ref / "state")})
        for attempt in range(2):
            res = subprocess.run([PYTHON, "-m", "ckptd.cli", "once", "-c", str(cfg)], capture_output=True,
                                 text=True, env=subprocess_env(), cwd=REPO, timeout=600)
            (ref / "once.log").write_text(res.stdout + res.stderr)
            if attempt or '"exception"' not in res.stdout + res.stderr:
                break
            # a traceback in the reference: once more from scratch (the tree may have been mid-edit)
            shutil.rmtree(ref / "out", ignore_errors=True)
            shutil.rmtree(ref / "state", ignore_errors=True)
            time.sleep(5)
        note = "" if res.returncode == 0 else f"reference `ckptd once` exited {describe_exit(res.returncode)}"
        if "Traceback" in res.stderr:
            note += " (with a traceback)"
        failed = set()
        for line in (res.stdout + res.stderr).splitlines():
            if '"run.failed"' in line:
                try:
                    failed.add(json.loads(line).get("run"))
                except ValueError:
                    continue
        if failed:
            note += f"; run.failed in runs {sorted(map(str, failed))[:5]}"
            for run in failed:
                self.run_diffs.setdefault(str(run), []).append(f"w/{run}: `ckptd once` failed on this run")
        return ref / "out", note

    def converge(self, ref_out: Path, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        diffs = compare_outputs(self.out, ref_out)
        while diffs and time.monotonic() < deadline:
            if self.daemon is not None and not self.daemon.alive():
                break
            time.sleep(0.5)
            diffs = compare_outputs(self.out, ref_out)
        return diffs

    def finish(self, timeout: float = 60, compare: bool = True, split_runs: bool = False) -> list[str]:
        """Scenario-level checks: alive, same outputs as the reference, graceful stop, no partial output ever
        seen, no canary, no stale temp files. Returns the problems (empty = passed). With ``split_runs`` the
        differences from the reference go to ``self.run_diffs[run]`` instead (for one-run-per-kind classes), and
        a failing reference run is a note (``self.notes``) rather than everyone's failure."""
        problems: list[str] = []
        assert self.daemon is not None
        if not self.daemon.alive():
            problems.append(f"daemon dead at the end: {describe_exit(self.daemon.proc.returncode)}")
        # deaths during the scenario are failures of the trials they happened in (each class attributes them)
        if compare:
            ref_out, note = self.reference()
            diffs = self.converge(ref_out, timeout)
            if split_runs:
                self.notes += [note] if note else []
                for d in diffs:
                    self.run_diffs.setdefault(d.split(":")[0].split("/")[1], []).append(d)
            else:
                problems += [note] if note else []
                problems += [f"differs from the reference: {d}" for d in diffs[:3]]
        rc = self.daemon.stop() if self.daemon.alive() else self.daemon.proc.returncode
        if rc != 0:
            problems.append(f"graceful stop: {describe_exit(rc)}")
        self.validator.stop()
        problems += [f"output watcher: {v}" for v in self.validator.violations[:3]]
        if not split_runs:  # one-run-per-kind classes check their own canaries (after this reference run)
            problems += [f"canary exists: {p.name} (a payload ran)" for p in self.canary.iterdir()]
        temps = stale_temps(self.out)
        if temps:
            problems.append(f"stale temp files after a graceful stop: {[str(t) for t in temps[:3]]}")
        return problems
