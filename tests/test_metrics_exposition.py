"""The operator's view: a real `ckptd run` serves /metrics that promtool accepts, and the Grafana dashboard in
systemd/ only queries metrics that exposition really has.

No mocks: the daemon is a subprocess over real torch.save checkpoints (one corrupt, so rejections appear), the
exposition is fetched over HTTP and linted by the real promtool (Debian package `prometheus`, installed in CI).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import PYTHON, REPO, subprocess_env
from tests.daemon_helpers import DaemonProcess, atomic_save

pytestmark = pytest.mark.slow

DASHBOARD = REPO / "systemd" / "grafana-dashboard.json"
PROMTOOL = shutil.which("promtool")
WATCHES = ("alpha", "beta")


class DaemonOutsideRepo(DaemonProcess):
    """`ckptd run` started from the test's own directory (as under systemd), not from the checkout."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - kept open for the process lifetime
        self.proc = subprocess.Popen([PYTHON, "-m", "ckptd.cli", "run", "-c", str(config)], stdout=self._log,
                                     stderr=self._log, env=subprocess_env(), cwd=config.parent)
        self.wait_for(lambda ev: any(e["event"] == "daemon.ready" for e in ev), 60, "daemon ready")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ckpt(seed: int, metric: float) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"model_state_dict": {"w": torch.randn(16, 16, generator=g)}, "metric": metric, "iterations": seed}


def _config(tmp_path: Path, port: int) -> Path:
    watches = []
    for name in WATCHES:
        (tmp_path / "train" / name).mkdir(parents=True)
        watches.append({"name": name, "root": str(tmp_path / "train" / name), "runs": "*", "settle": "1s",
                        "mode": "events", "output": str(tmp_path / "out/{watch}/{run}")})
    cfg = {"state_dir": str(tmp_path / "state"), "log": {"format": "json", "level": "info"},
           "rescan_interval": "2s", "shutdown_deadline": "10s", "watches": watches,
           "policies": {"default": {"average": {"top_k": 3}}}, "metrics": {"listen": f"127.0.0.1:{port}"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _samples(text: str) -> list[Any]:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def _value(samples: list[Any], name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _exposed_names(text: str) -> set[str]:
    """Every series name the exposition defines: sample names, and families declared (# TYPE) with no child yet
    (a labelled counter such as ckptd_loop_errors_total before its first error)."""
    names = {s.name for s in _samples(text)}
    for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        name, kind = m.groups()
        names.add(name)
        if kind == "histogram":
            names.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def _dashboard_exprs(dash: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def _fetch_until(port: int, ready: Any, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        if ready(_samples(text)) or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, int]:
    """(the /metrics text of a daemon that processed real checkpoints, how many it processed)."""
    tmp_path = tmp_path_factory.mktemp("metrics")
    port = _free_port()
    config = _config(tmp_path, port)
    run = tmp_path / "train" / "alpha" / "exp"
    run.mkdir()
    files = []
    for i, metric in enumerate((0.2, 0.5, 0.4), start=1):
        atomic_save(_ckpt(i, metric), run / f"ckpt_{i}.pt")
        files.append(run / f"ckpt_{i}.pt")
    (run / "garbage.pt").write_bytes(b"definitely not a checkpoint" * 100)  # corrupt: rejected
    files.append(run / "garbage.pt")
    other = tmp_path / "train" / "beta" / "other"
    other.mkdir()
    atomic_save(_ckpt(9, 0.9), other / "ckpt_9.pt")
    files.append(other / "ckpt_9.pt")
    daemon = DaemonOutsideRepo(config, tmp_path / "daemon.log")
    try:
        for path in files:
            daemon.wait_for(daemon.processed(path), 30, f"{path.name} processed")

        def settled(samples: list[Any]) -> bool:
            return (_value(samples, "ckptd_decision_latency_seconds_count") >= len(files)
                    and {s.labels.get("watch") for s in samples if s.name == "ckptd_backlog"} >= set(WATCHES))

        text = _fetch_until(port, settled, 10)
    finally:
        assert daemon.stop() == 0
    return text, len(files)


def test_promtool_accepts_the_exposition(exposition: tuple[str, int]) -> None:
    if PROMTOOL is None:
        pytest.skip("promtool missing (Debian package `prometheus`; CI installs it)")
    text, _ = exposition
    done = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


def test_new_metrics_have_samples(exposition: tuple[str, int]) -> None:
    text, processed = exposition
    samples = _samples(text)
    # decision latency: once per processed checkpoint, measured from the file's mtime (files were written before
    # the daemon started and settle 1 s: none under 0.5 s; none older than 2 minutes either)
    count = _value(samples, "ckptd_decision_latency_seconds_count")
    assert count >= processed
    assert _value(samples, "ckptd_decision_latency_seconds_bucket", le="0.5") == 0
    assert _value(samples, "ckptd_decision_latency_seconds_bucket", le="120.0") == count
    # per-watch backlog: one series per configured watch, labelled by the watch's name only
    backlog = {s.labels["watch"]: s.value for s in samples if s.name == "ckptd_backlog"}
    assert set(backlog) == set(WATCHES) and all(v >= 0 for v in backlog.values())
    # the corrupt file was rejected; the others were processed
    assert sum(s.value for s in samples if s.name == "ckptd_checkpoints_rejected_total") >= 1
    assert sum(s.value for s in samples if s.name == "ckptd_checkpoints_processed_total") >= processed
    # bounded label sets start at zero: export durations by result, evaluations by result
    assert {s.labels["result"] for s in samples if s.name == "ckptd_export_duration_seconds_count"} == {
        "ok", "partial", "failed"}
    assert {s.labels["result"] for s in samples if s.name == "ckptd_evaluations_total"} == {"ok", "failed", "rejected"}
    # no label value is a path or a run name
    for s in samples:
        for value in s.labels.values():
            assert "/" not in value and value not in ("exp", "other"), (s.name, s.labels)


def test_dashboard_queries_only_exposed_metrics(exposition: tuple[str, int]) -> None:
    text, _ = exposition
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41
    assert [i["name"] for i in dash["__inputs"] if i["pluginId"] == "prometheus"] == ["DS_PROMETHEUS"]
    assert {v["name"] for v in dash["templating"]["list"]} >= {"job", "instance"}
    exposed = _exposed_names(text)
    referenced: set[str] = set()
    for expr in _dashboard_exprs(dash):
        referenced.update(re.findall(r"\bckptd_[A-Za-z0-9_]+", expr))
    missing = referenced - exposed
    assert not missing, f"the dashboard queries metrics ckptd does not expose: {sorted(missing)}"
    # every family the operator needs is on the dashboard
    for needed in ("ckptd_checkpoints_processed_total", "ckptd_checkpoints_rejected_total",
                   "ckptd_decision_latency_seconds_bucket", "ckptd_job_duration_seconds_bucket",
                   "ckptd_export_duration_seconds_bucket", "ckptd_exports_total", "ckptd_backlog", "ckptd_runs",
                   "ckptd_loop_errors_total", "ckptd_inotify_overflows_total",
                   "ckptd_last_success_timestamp_seconds", "ckptd_evaluations_total"):
        assert needed in referenced, needed
    # every datasource reference (panels, targets, variables) is the import-time input, so it imports anywhere
    refs = [p["datasource"] for p in dash["panels"] if p["type"] != "row"]
    refs += [t["datasource"] for p in dash["panels"] for t in p.get("targets", [])]
    refs += [v["datasource"] for v in dash["templating"]["list"] if v["type"] == "query"]
    assert refs and all(r == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"} for r in refs), refs


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    if PROMTOOL is None:
        pytest.skip("promtool missing (Debian package `prometheus`; CI installs it)")
    dash = json.loads(DASHBOARD.read_text())
    rules = []
    for i, expr in enumerate(t["expr"] for p in dash["panels"] for t in p.get("targets", [])):
        promql = expr.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*")
        rules.append({"record": f"ckptd:panel_{i}", "expr": promql})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_shows_a_dead_listener_as_down() -> None:
    """A listener that stopped answering is "down" on the dashboard (Prometheus's own ``up``), not "No data"."""
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p.get("title") == "ckptd scrape up"]
    assert len(panels) == 1 and panels[0]["type"] == "stat", [p.get("title") for p in dash["panels"]]
    assert [t["expr"] for t in panels[0]["targets"]] == ['up{job=~"$job", instance=~"$instance"}']
    texts = {v["text"] for m in panels[0]["fieldConfig"]["defaults"]["mappings"] for v in m["options"].values()}
    assert texts == {"UP", "DOWN"}
    assert panels[0]["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    # no two panels overlap on the 24-column grid
    cells = [(x, y) for p in dash["panels"] for g in [p["gridPos"]]
             for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])]
    assert len(cells) == len(set(cells)) and all(x < 24 for x, _ in cells)
