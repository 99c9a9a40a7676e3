"""Run the real daemon (`ckptd run`) as a subprocess and read its JSON log lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from tests.conftest import PYTHON, subprocess_env


def write_config(tmp_path: Path, *, policy: dict[str, Any] | None = None, watch: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None, name: str = "config.yaml") -> Path:
    train = tmp_path / "train"
    train.mkdir(exist_ok=True)
    cfg: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "log": {"format": "json", "level": "info"},
        "rescan_interval": "2s",
        "shutdown_deadline": "10s",
        "watches": [{"name": "w", "root": str(train), "runs": "*", "output": str(tmp_path / "out/{watch}/{run}"),
                     "settle": "1s", "mode": "events", **(watch or {})}],
        "policies": {"default": {"average": {"top_k": 3}, **(policy or {})}},
        **(extra or {}),
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


class DaemonProcess:
    command, ready, kind = ("run",), "daemon.ready", "daemon"

    def __init__(self, config: Path, log_path: Path, *extra: str) -> None:
        self.config = config
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - kept open for the process lifetime
        self.proc = subprocess.Popen([PYTHON, "-m", "ckptd.cli", *self.command, "-c", str(config), *extra],
                                     stdout=self._log, stderr=self._log, env=subprocess_env())
        self.wait_for(lambda ev: any(e["event"] == self.ready for e in ev), 60, f"{self.kind} ready")

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.events()):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.kind} exited ({self.proc.returncode}) waiting for {what}:\n"
                                     + self.log_path.read_text()[-4000:])
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n" + self.log_path.read_text()[-4000:])

    def processed(self, path: Path | str) -> Callable[[list[dict[str, Any]]], bool]:
        final = {"checkpoint.joined", "checkpoint.skipped", "checkpoint.duplicate", "checkpoint.unranked",
                 "checkpoint.invalid", "checkpoint.refused", "checkpoint.incomplete"}
        return lambda ev: any(e["event"] in final and e.get("checkpoint") == str(path) for e in ev)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        self._log.close()

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0


class WorkerProcess(DaemonProcess):
    """``ckptd worker`` as a subprocess (stalled jobs of a killed worker are retried after 2 s, not 30 s)."""

    command, ready, kind = ("worker",), "worker.ready", "worker"

    def __init__(self, config: Path, log_path: Path, *extra: str) -> None:
        super().__init__(config, log_path, "--stalled-after", "2s", *extra)


# the smallest CoreML export the daemon tests use (a tiny conv net, float32, 8x8 input)
TINY_COREML = {"enabled": True, "factory": "ckptd.examples:build_tiny_convnet", "factory_kwargs": {"width": 8},
               "inputs": [{"name": "image", "shape": [1, 3, 8, 8]}], "outputs": ["logits"], "precision": "float32",
               "timeout": "3m", "keep": 1}


def atomic_save(obj: Any, path: Path) -> None:
    """How careful trainers write: temp name (ignored by ckptd) then rename into place."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def mean_of(paths: list[Path], key: str = "model_state_dict") -> dict[str, torch.Tensor]:
    """Independent recomputation: float64 mean of floating tensors, integers from the first (best)."""
    states = [torch.load(p, weights_only=True) for p in paths]
    states = [s.get(key, s) for s in states]
    out = {}
    for k, v in states[0].items():
        out[k] = (sum(s[k].double() for s in states) / len(states)).to(v.dtype) if v.is_floating_point() else v
    return out


def make_run(tmp_path: Path, name: str = "exp") -> Path:
    """A run directory under the test config's watch root (``write_config`` watches ``tmp_path/train``)."""
    run = tmp_path / "train" / name
    run.mkdir(parents=True, exist_ok=True)
    return run


def run_trainer(run_dir: Path, epochs: int, *extra: str) -> list[dict[str, Any]]:
    """The real tiny training run (tests/trainer_script.py) in a subprocess; one record per checkpoint."""
    script = Path(__file__).resolve().parent / "trainer_script.py"
    done = subprocess.run([PYTHON, str(script), str(run_dir), str(epochs), *extra], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120, check=True)
    return [json.loads(line) for line in done.stdout.splitlines()]
