"""The status page: the renderer on hand-built data (escaping, the chart's points and axes), then the real daemon's
HTTP listener end to end, read by real headless Chromium.

``python -m tests.test_status_page docs/status-page.png`` runs a real daemon over a 12-checkpoint run and takes the
README screenshot of its run page.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd.daemon import status_page
from ckptd.daemon.status_page import chart_svg, render_error, render_index, render_run, run_href

HOSTILE = "\"'><img src=x onerror=alert(1)>&amp;<script>alert(2)<"  # no '/': file and run names cannot hold one
NOW = 1_800_000_000.0
CHROMIUM = "/usr/bin/chromium"


class Dom(HTMLParser):
    """What a browser would build, roughly: the start tags (with attributes) and the text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def all(self, tag: str, cls: str | None = None) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag and (cls is None or cls in (a.get("class") or "").split())]


def _ckpt(i: int, metric: float | None, step: int | None = None, *, status: str = "done", name: str | None = None,
          **flags: bool) -> dict[str, Any]:
    return {"id": i, "path": f"/secret/train/run/{name or f'c{i}.pt'}", "name": name or f"c{i}.pt", "step": step,
            "metric": metric, "status": status, "reason": flags.pop("reason", None), "first_seen": NOW - 100 + i,
            "updated_at": NOW - 100 + i, "member": flags.get("member", False), "best": flags.get("best", False),
            "evicted": flags.get("evicted", False)}


def _history(checkpoints: list[dict[str, Any]], *, mode: str = "max", watch: str = "w", run: str = "exp",
             stream: str = "model", exports: list[dict[str, Any]] | None = None,
             evaluations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"watch": watch, "run": run, "stream": stream, "mode": mode, "checkpoints": checkpoints,
            "exports": exports or [], "evaluations": evaluations or []}


def _points(html_text: str) -> list[dict[str, str | None]]:
    return Dom(html_text).all("circle", status_page.POINT_CLASS)


def _xy(point: dict[str, str | None]) -> tuple[float, float]:
    x, y = float(point["cx"] or "nan"), float(point["cy"] or "nan")
    assert math.isfinite(x) and math.isfinite(y), point
    return x, y


# --- the renderer -------------------------------------------------------------------------------------------------
def test_every_name_is_escaped_as_text_in_text_attributes_and_svg() -> None:
    checkpoints = [_ckpt(1, 0.5, 10, name=HOSTILE + ".pt", member=True, best=True, reason=HOSTILE),
                   _ckpt(2, 0.1, 20, status="invalid", reason=HOSTILE)]
    history = _history(checkpoints, watch=HOSTILE, run=HOSTILE, stream=HOSTILE,
                       exports=[{"id": 1, "status": "failed", "reason": HOSTILE, "source": "/x/" + HOSTILE,
                                 "metric": 0.5, "step": 10, "started_at": NOW - 5, "finished_at": NOW - 1,
                                 "path": "/y/" + HOSTILE}],
                       evaluations=[{"id": 1, "kind": HOSTILE, "key": HOSTILE, "members": [HOSTILE], "value": 1.0,
                                     "status": HOSTILE, "reason": HOSTILE, "started_at": NOW, "finished_at": NOW}])
    row = {"watch": HOSTILE, "run": HOSTILE, "stream": HOSTILE, "mode": "max", "output": "/out/" + HOSTILE,
           "best": {"source": HOSTILE, "metric": 0.5, "step": 10}, "members": [{"source": HOSTILE, "metric": 0.5,
                                                                              "step": 10}],
           "checkpoints": {"done": 1, HOSTILE: 1}, "invalid": 1,
           "last_invalid": {"source": HOSTILE, "reason": HOSTILE, "at": NOW}, "last_event": HOSTILE,
           "last_event_at": NOW, "last_error": HOSTILE, "last_error_at": NOW,
           "export": {"status": HOSTILE, "reason": HOSTILE}}
    for page in (render_run(history, row, NOW), render_index([row], NOW),
                 render_error(500, HOSTILE, HOSTILE, NOW)):
        dom = Dom(page)
        assert not dom.all("img") and not dom.all("script"), "markup from a name became an element"
        assert all(not k.startswith("on") for _, attrs in dom.tags for k in attrs), "an injected attribute"
        assert HOSTILE in "".join(dom.text), "the name must read as text"
        assert "/secret/" not in page, "checkpoint paths are shown by their basename"
    run_page = Dom(render_run(history, row, NOW))
    assert any(HOSTILE in t for t in run_page.text if t.startswith(HOSTILE + ".pt\n")), "the point's <title>"
    index = Dom(render_index([row], NOW))
    links = [a["href"] for a in index.all("a") if (a["href"] or "").startswith("/run?")]
    assert links == [run_href(HOSTILE, HOSTILE, HOSTILE)], links


def test_one_point_per_checkpoint_with_a_metric_marked_by_role() -> None:
    checkpoints = [_ckpt(1, 0.2, 100, evicted=True), _ckpt(2, None, 200, status="invalid"),
                   _ckpt(3, 0.5, 300, member=True), _ckpt(4, float("nan"), 400, status="unranked"),
                   _ckpt(5, 0.7, 500, member=True, best=True), _ckpt(6, 0.1, 600, status="skipped"),
                   _ckpt(7, float("inf"), 700, status="skipped"), _ckpt(8, 0.4, 800, member=True)]
    points = _points(render_run(_history(checkpoints), None, NOW))
    assert len(points) == 5, "one point per checkpoint with a finite metric"
    kinds = sorted((p["class"] or "").split()[1] for p in points)
    assert kinds == ["pt-best", "pt-evicted", "pt-member", "pt-member", "pt-other"]
    best = next(p for p in points if "pt-best" in (p["class"] or ""))
    evicted = next(p for p in points if "pt-evicted" in (p["class"] or ""))
    assert best["fill"] != evicted["fill"] and evicted["fill"] == "#ffffff", "evicted points are hollow"
    by_x = sorted(_xy(p) for p in points)
    assert [x for x, _ in by_x] == sorted(x for x, _ in by_x) and len({x for x, _ in by_x}) == 5
    # x follows the step, y the metric (larger metric = higher on screen = smaller y)
    ys = {round(_xy(p)[0]): _xy(p)[1] for p in points}
    xs = sorted(ys)
    metrics = [0.2, 0.5, 0.7, 0.1, 0.4]
    assert sorted(xs, key=lambda x: -ys[x]) == [xs[i] for i in sorted(range(5), key=lambda i: metrics[i])]
    svg = chart_svg(checkpoints)
    assert "nan" not in svg.lower() and "inf" not in svg.lower()
    titles = [t for t in Dom(svg).text if t.startswith("c5.pt\n")]
    assert titles == ["c5.pt\nstep 500\nmetric 0.7\nstatus done (best)"]


def test_missing_steps_use_the_order_seen() -> None:
    checkpoints = [_ckpt(1, 0.3, None), _ckpt(2, 0.9, 50), _ckpt(3, None, None, status="invalid"),
                   _ckpt(4, 0.1, 10)]
    svg = chart_svg(checkpoints)
    points = _points(svg)
    assert len(points) == 3
    by_metric = {round(float(p["cy"] or 0)): _xy(p)[0] for p in points}
    xs = [by_metric[k] for k in sorted(by_metric, key=lambda k: -k)]  # metric 0.1, 0.3, 0.9 from the bottom up
    assert xs[1] < xs[2] < xs[0], "x is the order seen (0.3 first, 0.9 second, 0.1 fourth), not the step"
    assert "order seen" in svg and ">step<" not in svg


@pytest.mark.parametrize("metrics", [[0.5], [0.25, 0.25, 0.25], [-3.0, -3.0], [0.0], [1e308, -1e308],
                                     [5e-324, 0.0], [1e-12, 1.0000000000001e-12]])
def test_axes_stay_finite(metrics: list[float]) -> None:
    checkpoints = [_ckpt(i, m, 7, member=True) for i, m in enumerate(metrics)]  # also: every x equal
    svg = chart_svg(checkpoints)
    points = _points(svg)
    assert len(points) == len(metrics)
    for p in points:
        x, y = _xy(p)
        assert 0 < x < 1100 and 0 < y < 340
    assert "nan" not in svg.lower() and "inf" not in svg.lower()
    if len(set(metrics)) == 1:
        assert len({_xy(p) for p in points}) == 1  # equal values share the middle


def test_min_and_max_modes() -> None:
    checkpoints = [_ckpt(1, 0.9, 1, member=True), _ckpt(2, 0.2, 2, member=True, best=True), _ckpt(3, 0.5, 3,
                                                                                                    member=True)]
    low = render_run(_history(checkpoints, mode="min"), None, NOW)
    assert "lower is better" in low and "higher is better" not in low
    rows = re.findall(r"<tr><td class=\"num\">(\d)</td><td>(c\d\.pt)", low)
    assert rows == [("1", "c2.pt"), ("2", "c3.pt"), ("3", "c1.pt")], "min mode ranks ascending"
    high = render_run(_history([dict(c, best=c["id"] == 1) for c in checkpoints], mode="max"), None, NOW)
    assert "higher is better" in high
    assert re.findall(r"<tr><td class=\"num\">(\d)</td><td>(c\d\.pt)", high) == [("1", "c1.pt"), ("2", "c3.pt"),
                                                                                  ("3", "c2.pt")]
    # the y axis is the metric either way: 0.9 is drawn above 0.2
    for page in (low, high):
        y = {p["class"]: _xy(p)[1] for p in _points(page)}
        assert len(y) >= 2
    top = {round(_xy(p)[1]): (p["class"] or "") for p in _points(high)}
    assert "pt-best" in top[min(top)], "the best of a max run is the highest point"


def test_pages_refresh_and_carry_no_script_or_external_asset() -> None:
    pages = [render_index([], NOW), render_run(_history([_ckpt(1, 0.5, 1, member=True, best=True)]), None, NOW)]
    for page in pages:
        dom = Dom(page)
        assert dom.all("meta") and any(m.get("http-equiv") == "refresh" and m.get("content") == "15"
                                       for m in dom.all("meta"))
        assert not dom.all("script") and not dom.all("link") and not dom.all("img")
        assert not re.search(r"(src|href)=\"(https?:)?//", page), "nothing external"
    assert "no runs recorded yet" in pages[0]
    assert "refresh" not in render_error(404, "Not found", "no such page", NOW)


@pytest.mark.parametrize("name", ["exp", "a+b=c@d", "Δ run", "x&y=z#w?v", "100%", HOSTILE, "..", "\n\t"])
def test_run_links_round_trip(name: str) -> None:
    from ckptd.daemon.http_listener import parse_run_query

    href = run_href(name, name, name)
    assert href.startswith("/run?") and all(c not in href for c in " <>\"'#\n")
    assert parse_run_query(href.partition("?")[2]) == (name, name, name)


@pytest.mark.parametrize("query", ["", "watch=w", "run=", "run=a&run=b", "run=a&x=1", "run=a%2Fb", "run=a%00",
                                   "run=%ff", "run", "run=a&&stream=b", "run=" + "x" * 5000])
def test_bad_run_queries_are_refused(query: str) -> None:
    from ckptd.daemon.http_listener import BadQuery, parse_run_query

    with pytest.raises(BadQuery):
        parse_run_query(query)


def test_a_large_run_is_downsampled_keeping_the_best_members_evicted_and_extremes() -> None:
    n = 20_000
    rng = __import__("random").Random(7)
    checkpoints = [_ckpt(i, 0.3 + 0.4 * i / n + rng.uniform(-0.05, 0.05), i * 10, status="skipped")
                   for i in range(n)]
    for i in range(0, n, 97):  # 207 evicted
        checkpoints[i].update(evicted=True, status="done")
    for i in (n - 40, n - 20, n - 5):
        checkpoints[i].update(member=True, status="done")
    checkpoints[n - 20].update(best=True, metric=2.0)
    checkpoints[1234]["metric"] = -5.0  # the lowest metric, far from the top-k: its bucket keeps it
    checkpoints[9876]["metric"] = 1.5  # the highest metric that is no member
    t0 = time.process_time()
    page = render_run(_history(checkpoints), None, NOW)
    cpu = time.process_time() - t0
    points = _points(page)
    assert len(points) <= status_page.MAX_CHART_POINTS, len(points)
    assert len(points) >= status_page.MAX_CHART_POINTS - 10, "the budget is used"
    names = {t.split("\n", 1)[0] for t in Dom(page).text if "\nstep " in t}
    must = {c["name"] for c in checkpoints if c["member"] or c["evicted"] or c["best"]}
    assert must <= names, sorted(must - names)[:5]
    assert {"c1234.pt", "c9876.pt"} <= names, "the lowest and the highest metric are drawn"
    assert sum("pt-best" in (p["class"] or "") for p in points) == 1
    assert f"showing {len(points):,} of {n:,} checkpoints" in page
    assert "showing the newest 200 of 20,000 checkpoints" in page
    assert len(Dom(page).all("tr")) <= 200 + 10
    assert len(page) < 1_000_000, len(page)
    assert cpu < 2.0, cpu  # about 0.05 s; a page per tab every 15 s must stay cheap
    # a run whose every checkpoint was evicted in turn (a steadily improving metric): still capped
    rising = [_ckpt(i, i / n, i, evicted=True) for i in range(n)]
    rising[-1].update(evicted=False, member=True, best=True)
    svg = chart_svg(rising)
    pts = _points(svg)
    assert len(pts) <= status_page.MAX_CHART_POINTS and sum("pt-best" in (p["class"] or "") for p in pts) == 1
    assert f"of {n:,} checkpoints" in svg
    # small runs: one point per checkpoint, no note
    assert "showing" not in chart_svg(checkpoints[:50]) and len(_points(chart_svg(checkpoints[:50]))) == 50


def test_metrics_status_page_setting_is_parsed(tmp_path: Path) -> None:
    from ckptd.daemon.config import MetricsConfig, parse_config
    from ckptd.errors import ConfigError

    (tmp_path / "train").mkdir()
    base = {"state_dir": str(tmp_path / "state"),
            "watches": [{"name": "w", "root": str(tmp_path / "train"), "output": str(tmp_path / "out/{run}")}]}
    assert MetricsConfig().status_page is None
    for value, expected in (("auto", None), (None, None), (True, True), (False, False)):
        assert parse_config({**base, "metrics": {"status_page": value}}).metrics.status_page is expected
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "metrics": {"status_page": "maybe"}})
    assert any(p.startswith("metrics.status_page: expected true, false or auto") for p in err.value.problems)


# --- the real listener ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, method: str = "GET") -> tuple[int, dict[str, str], str]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=20) as res:
            return res.status, dict(res.headers), res.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


def _chromium(url: str, profile: Path, *extra: str) -> str:
    """Headless Chromium loads ``url``: its DOM (``--dump-dom``) or whatever ``extra`` asks for instead."""
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                             "--no-first-run", "--disable-background-networking", "--disable-component-update",
                             "--disable-sync", f"--user-data-dir={profile}", *(extra or ("--dump-dom",)), url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):  # what is left of its session (renderers, zygotes)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0, err[-3000:]
    return out


def test_unreadable_ledger_is_a_500_page_and_the_listener_lives_on(tmp_path: Path) -> None:
    from ckptd.daemon.config import load_config
    from ckptd.daemon.telemetry import Metrics
    from tests.daemon_helpers import write_config

    config = load_config(write_config(tmp_path))
    ledger = tmp_path / "state" / "ledger.sqlite3"
    ledger.parent.mkdir()
    ledger.write_bytes(b"\x13\x37 not SQLite at all " * 300)
    port = _free_port()
    metrics = Metrics(f"127.0.0.1:{port}", status_config=lambda: config)
    base = f"http://127.0.0.1:{port}"
    try:
        for path in ("/", "/run?watch=w&run=exp"):
            code, headers, body = _get(base + path)
            assert code == 500 and headers["Content-Type"].startswith("text/html"), (path, code)
            assert "not a database" in body and str(ledger) in body and "Traceback" not in body
        code, headers, body = _get(base + "/metrics")
        assert code == 200 and "ckptd_build_info" in body
        ledger.unlink()  # the fault ends: the next request reads again
        code, _, body = _get(base + "/")
        assert code == 200 and "no runs recorded yet" in body
    finally:
        metrics.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(base + "/metrics", timeout=2)


@contextlib.contextmanager
def _listener(listen: str = "127.0.0.1:0", config: Any = None) -> Any:
    from prometheus_client import CollectorRegistry

    from ckptd.daemon.http_listener import serve

    server = serve(listen, CollectorRegistry(), (lambda: config) if config is not None else None)
    try:
        yield server
    finally:
        server.close()


def _raw(port: int, request: bytes, timeout: float = 5) -> tuple[int, bytes]:
    """Send ``request`` as is; (the status code, the whole answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data


@contextlib.contextmanager
def _captured_logs() -> Any:
    """Every structlog event (debug included) while the block runs; the previous configuration is restored."""
    import logging

    import structlog

    saved = structlog.get_config()
    capture = structlog.testing.LogCapture()
    structlog.configure(processors=[capture], wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
                        cache_logger_on_first_use=False)
    try:
        yield capture.entries
    finally:
        structlog.configure(**saved)


def test_host_must_name_this_machine_and_absolute_targets_are_served(tmp_path: Path) -> None:
    from ckptd.daemon.config import load_config
    from tests.daemon_helpers import write_config

    config = load_config(write_config(tmp_path))
    with _listener(config=config) as server:
        port = server.server_address[1]

        def get(path: str, *headers: str, version: str = "HTTP/1.1") -> int:
            head = "".join(h + "\r\n" for h in headers)
            return _raw(port, f"GET {path} {version}\r\n{head}\r\n".encode())[0]

        for host in ("localhost", f"localhost:{port}", "LOCALHOST.", f"127.0.0.1:{port}", f"[::1]:{port}",
                     "[::1]", "127.0.0.1:"):
            assert get("/metrics", f"Host: {host}") == 200, host
            assert get("/", f"Host: {host}") == 200, host
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", "localhost.evil.example",
                     "10.1.2.3", f"[::1]:{port}x", "localhost:9478@evil.example", ""):
            assert get("/metrics", f"Host: {host}") == 421, host  # a rebound name reads nothing
            assert get("/", f"Host: {host}") == 421, host
        code, body = _raw(port, b"GET / HTTP/1.1\r\nHost: <b>evil</b>.example\r\n\r\n")
        assert code == 421 and b"<b>evil" not in body and b"Misdirected" in body
        assert get("/metrics", version="HTTP/1.0") == 200, "HTTP/1.0 needs no Host"
        assert get("/metrics") == 400, "HTTP/1.1 does"
        assert get("/metrics", "Host: localhost", "Host: evil.example") == 400
        # absolute-form targets: the path part is served, the authority is the host that is checked
        assert get(f"http://localhost:{port}/metrics", "Host: localhost") == 200
        assert get(f"HTTP://127.0.0.1:{port}/", "Host: evil.example") == 200
        assert get(f"http://localhost:{port}/run?watch=w&run=nope") == 404
        assert get("http://evil.example/metrics", "Host: localhost") == 421
        assert get("http://user@localhost/metrics", "Host: localhost") == 421


def test_status_page_is_served_on_loopback_only_unless_configured(tmp_path: Path) -> None:
    from ckptd.daemon.config import load_config
    from tests.daemon_helpers import write_config

    auto = load_config(write_config(tmp_path))
    on = load_config(write_config(tmp_path, extra={"metrics": {"status_page": True}}, name="on.yaml"))
    off = load_config(write_config(tmp_path, extra={"metrics": {"status_page": False}}, name="off.yaml"))
    ok = b"Host: localhost\r\n\r\n"
    with _listener("0.0.0.0:0", auto) as server:  # a remote Prometheus: /metrics only
        port = server.server_address[1]
        assert not server.loopback
        assert _raw(port, b"GET /metrics HTTP/1.1\r\n" + ok)[0] == 200
        code, body = _raw(port, b"GET / HTTP/1.1\r\n" + ok)
        assert code == 404 and b"status page is off" in body
        assert _raw(port, b"GET /run?watch=w&run=x HTTP/1.1\r\n" + ok)[0] == 404
        # scraped by IP address or by the machine's name; never by another name
        for host in (f"192.0.2.7:{port}", "[2001:db8::1]:9478", socket.gethostname(), socket.getfqdn() + ".",
                     "0.0.0.0"):
            assert _raw(port, f"GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())[0] == 200, host
        for host in ("evil.example", "[2001:db8::1", "2001:db8::1"):
            assert _raw(port, f"GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())[0] == 421, host
    with _listener("0.0.0.0:0", on) as server:
        assert _raw(server.server_address[1], b"GET / HTTP/1.1\r\n" + ok)[0] == 200
    with _listener("127.0.0.1:0", off) as server:
        assert _raw(server.server_address[1], b"GET / HTTP/1.1\r\n" + ok)[0] == 404
        assert _raw(server.server_address[1], b"GET /metrics HTTP/1.1\r\n" + ok)[0] == 200


def test_slow_clients_are_capped_and_held_to_one_deadline_per_request() -> None:
    """Slowloris: every client trickles a header line every 0.2 s (each read is quick, the request never ends).
    At most 16 are handled at once, each for one deadline at most, not forever; over the cap a new client takes
    the place of the oldest stalled one (so a real scrape gets through), or gets a 503 at once when none stalled."""
    from ckptd.daemon.http_listener import MAX_CONNECTIONS

    # threads of other servers in this test process (the session's moto S3 server handles keep-alive connections
    # on threads of its own) are not this listener's: count only threads started during this test
    before = {t.ident for t in threading.enumerate()}
    with _listener() as server:
        server.request_deadline, server.stall_after = 1.5, 0.3
        port = server.server_address[1]
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(MAX_CONNECTIONS + 8)]
        start = time.monotonic()
        for c in clients:
            c.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n")
        ended: dict[int, tuple[float, bytes]] = {}
        peak, scrape = 0, None
        try:
            while len(ended) < len(clients) and time.monotonic() - start < 4:
                peak = max(peak, sum((t.name == "ckptd-http-request" or t.name.startswith("Thread-"))
                                     and t.ident not in before for t in threading.enumerate()))
                if scrape is None and time.monotonic() - start > 0.6:  # Prometheus, amid the slow clients
                    scrape = (_raw(port, b"GET /metrics HTTP/1.0\r\n\r\n", timeout=3)[0], time.monotonic() - start)
                live = [i for i in range(len(clients)) if i not in ended]
                readable, _, _ = select.select([clients[i] for i in live], [], [], 0.2)
                for i in live:
                    if clients[i] in readable:
                        try:
                            data = clients[i].recv(4096)
                        except OSError:
                            data = b""
                        ended[i] = (time.monotonic() - start, data)
                    else:
                        with contextlib.suppress(OSError):
                            clients[i].sendall(b"X-Slow: 1\r\n")
        finally:
            for c in clients:
                c.close()
        assert len(ended) == len(clients), f"{len(clients) - len(ended)} slow clients still held after 4 s"
        # a request thread releases its slot just before it ends, so for an instant the next one may already run
        # beside it: the bound is the cap plus that one thread on its way out (never one per client)
        assert peak <= MAX_CONNECTIONS + 1, f"{peak} request threads for {len(clients)} clients"
        busy = [t for t, data in ended.values() if data.startswith(b"HTTP/1.0 503")]
        assert len(busy) == len(clients) - MAX_CONNECTIONS and max(busy) < 0.5, busy
        assert scrape is not None and scrape[0] == 200, scrape
        dropped = [t for t, data in ended.values() if not data and t < 1.2]
        assert len(dropped) == 1, ("the scrape took the oldest stalled client's place", sorted(ended.values()))
        assert max(t for t, _ in ended.values()) < 1.5 + 1.0, "a request's deadline covers its whole header"
        assert _raw(port, b"GET /metrics HTTP/1.0\r\n\r\n")[0] == 200  # the slots came back


def test_client_resets_are_one_debug_line_never_a_traceback(capfd: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import struct

    from ckptd.daemon import http_listener

    with _captured_logs() as logs, _listener() as server:
        port = server.server_address[1]
        for payload in (b"GET / HTTP/1.1\r\n", b"GET /metr", b"GET / HTTP/1.1\r\nHost: localhost\r\n") * 2:
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(payload)
            time.sleep(0.05)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
            s.close()
        time.sleep(0.3)
        assert _raw(port, b"GET /metrics HTTP/1.0\r\n\r\n")[0] == 200
        # a listener error with stderr gone and the logger broken: still no exception out of handle_error
        monkeypatch.setattr(sys, "stderr", None)
        monkeypatch.setattr(http_listener, "get_logger", lambda: 1 / 0)
        try:
            raise ValueError("boom")
        except ValueError:
            server.handle_error(None, ("127.0.0.1", 1))
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err[:2000]
    lines = [e for e in logs if e["event"] == "http.client_error"]
    assert len(lines) == 1 and lines[0]["log_level"] == "debug", logs
    assert "ConnectionResetError" in lines[0]["reason"]


def test_the_listener_restarts_serving_after_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    with _captured_logs() as logs, _listener() as server:
        port = server.server_address[1]
        calls = []

        def verify_once(request: Any, client_address: Any) -> bool:
            calls.append(client_address)
            if len(calls) == 1:
                request.close()
                raise RuntimeError("injected: the serving loop fails")
            return True

        monkeypatch.setattr(server, "verify_request", verify_once)
        with socket.create_connection(("127.0.0.1", port), timeout=2) as first, contextlib.suppress(OSError):
            first.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")  # dropped: the serving loop fails on it
            first.recv(100)
        assert _raw(port, b"GET /metrics HTTP/1.0\r\n\r\n", timeout=5)[0] == 200
        assert server.thread.is_alive()
    assert [e for e in logs if e["event"] == "http.listener_restarted" and "injected" in e["reason"]], logs
    assert not server.thread.is_alive(), "close() still ends it"


ACCEPT_CHILD = """
import os, resource, sys, time
from prometheus_client import CollectorRegistry
from ckptd.daemon.logs import configure_logging
from ckptd.daemon.http_listener import serve
configure_logging("json", "debug", sys.stdout)
server = serve("127.0.0.1:0", CollectorRegistry())
print(server.server_address[1], flush=True)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
sys.stdin.readline()
fds = []
resource.setrlimit(resource.RLIMIT_NOFILE, (max(int(f) for f in os.listdir("/proc/self/fd")) + 1, hard))
while True:  # fill every hole below the limit: the next accept() fails with EMFILE
    try:
        fds.append(os.dup(0))
    except OSError:
        break
print("full", flush=True)
sys.stdin.readline()  # the parent has connected: measure the CPU the listener burns meanwhile
before = time.process_time()
time.sleep(1.0)
print("cpu", time.process_time() - before, flush=True)
for fd in fds:
    os.close(fd)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
print("freed", flush=True)
sys.stdin.readline()
server.close()
"""


def test_accept_failing_for_lack_of_fds_backs_off_instead_of_spinning(tmp_path: Path) -> None:
    from tests.conftest import PYTHON, REPO, subprocess_env

    child = subprocess.Popen([PYTHON, "-c", ACCEPT_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=subprocess_env(), cwd=REPO)
    assert child.stdin is not None and child.stdout is not None
    lines: list[str] = []

    def until(prefix: str) -> str:
        while line := child.stdout.readline():  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError("".join(lines))

    clients = []
    try:
        port = int(until("").strip())
        child.stdin.write("limit\n")
        child.stdin.flush()
        until("full")
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]  # queued
        for c in clients:
            c.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        child.stdin.write("measure\n")
        child.stdin.flush()
        cpu = float(until("cpu").split()[1])
        until("freed")
        for c in clients:  # queued connections are served once fds are free again
            c.settimeout(5)
            assert c.recv(64).startswith(b"HTTP/1.0 200"), "served after the fds came back"
        child.stdin.write("quit\n")
        child.stdin.flush()
        child.wait(timeout=10)
        lines += child.stdout.readlines()
    finally:
        for c in clients:
            c.close()
        if child.poll() is None:
            child.kill()
            child.wait()
    assert cpu < 0.4, f"the listener spun on EMFILE: {cpu:.2f} s CPU in 1 s"
    failed = [json.loads(line) for line in lines if "http.accept_failed" in line]
    assert len(failed) == 1 and "Too many open files" in failed[0]["reason"], lines
    assert not [line for line in lines if "Traceback" in line], lines


def _save(run: Path, name: str, metric: float, step: int) -> None:
    from ckptd.examples import TinyConvNet
    from tests.daemon_helpers import atomic_save

    torch.manual_seed(step)
    atomic_save({"model_state_dict": TinyConvNet().state_dict(), "metric": metric, "iterations": step}, run / name)


@pytest.mark.slow
def test_the_daemon_serves_the_status_page_read_by_chromium(tmp_path: Path) -> None:
    from prometheus_client import CONTENT_TYPE_LATEST

    from tests.daemon_helpers import DaemonProcess, make_run, write_config

    port = _free_port()
    config = write_config(tmp_path, extra={"metrics": {"listen": f"127.0.0.1:{port}"}})
    run_name = "Δexp+1=a@b"  # a run name's characters that mean something in a URL (<>&" cannot be in one)
    run = make_run(tmp_path, run_name)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    base = f"http://127.0.0.1:{port}"
    try:
        names = []
        for i, (metric, name) in enumerate([(0.2, "a.pt"), (0.5, HOSTILE + ".pt"), (0.4, "c.pt"), (0.7, "d.pt"),
                                            (0.1, "e.pt")]):
            _save(run, name, metric, (i + 1) * 100)
            names.append(name)
        (run / "junk.pt").write_bytes(b"junk" * 100)  # rejected: no metric, no point
        for name in [*names, "junk.pt"]:
            daemon.wait_for(daemon.processed(run / name), 30, name)
        code, headers, index = _get(base + "/")
        assert code == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        href = run_href("w", run_name)
        assert f'href="{href.replace("&", "&amp;")}"' in index
        code, _, page = _get(base + href)
        assert code == 200 and len(_points(page)) == 5, page
        code, headers, metrics = _get(base + "/metrics")
        assert code == 200 and headers["Content-Type"] == CONTENT_TYPE_LATEST
        assert 'ckptd_checkpoints_processed_total{outcome="done"}' in metrics and "<" not in metrics
        assert _get(base + "/nope")[0] == 404 and _get(base + "/metrics/")[0] == 404
        assert _get(base + "/run?watch=w&run=nope")[0] == 404
        assert _get(base + "/run?watch=w&run=exp&bogus=1")[0] == 400
        assert _get(base + "/run?run=%ff")[0] == 400
        code, headers, _ = _get(base + "/", method="POST")
        assert code == 405 and headers["Allow"] == "GET, HEAD"
        code, headers, body = _get(base + "/", method="HEAD")
        assert code == 200 and body == "" and int(headers["Content-Length"]) > 1000

        if not Path(CHROMIUM).exists():
            pytest.skip(f"{CHROMIUM} is missing (CI installs Debian's chromium): the browser part did not run")
        dom = _chromium(base + href, tmp_path / "chromium")
        assert f"<title>ckptd · w / {run_name}</title>" in dom, dom[:2000]
        assert dom.count(f'class="{status_page.POINT_CLASS} ') == 5, "one chart point per checkpoint with a metric"
        assert dom.count('class="pt pt-best"') == 1 and dom.count('class="pt pt-evicted"') == 1
        assert "<img" not in dom and "<script" not in dom, "a file name became markup"
        assert "&lt;img src=x onerror=alert(1)&gt;" in dom, "the hostile name shows as text"
        index_dom = _chromium(base + "/", tmp_path / "chromium")
        assert "<title>ckptd status</title>" in index_dom and f"w / {run_name}</a>" in index_dom
        assert '<meta http-equiv="refresh" content="15">' in index_dom
        assert "<img" not in index_dom
    finally:
        assert daemon.stop() == 0


# --- the README screenshot ------------------------------------------------------------------------------------------
def screenshot(out: Path) -> None:
    """A real daemon over a 12-checkpoint run (top-k 3: members, evictions, a best, skips), its run page in
    headless Chromium at 1200x900."""
    from tests.daemon_helpers import DaemonProcess, make_run, write_config

    tmp = Path(tempfile.mkdtemp(prefix="ckptd-demo-"))
    try:
        port = _free_port()
        config = write_config(tmp, extra={"metrics": {"listen": f"127.0.0.1:{port}"}},
                              watch={"output": str(tmp / "out/{watch}/{run}"), "name": "mobilevit"})
        run = make_run(tmp, "lr3e-4-bs256")
        daemon = DaemonProcess(config, tmp / "daemon.log")
        try:
            metrics = [0.412, 0.538, 0.601, 0.655, 0.701, 0.596, 0.714, 0.688, 0.731, 0.702, 0.665, 0.726]
            for i, metric in enumerate(metrics):
                name = f"epoch={i + 1:02d}-step={(i + 1) * 1000}.pt"
                _save(run, name, metric, (i + 1) * 1000)
                daemon.wait_for(daemon.processed(run / name), 30, name)
            (run / "notes.pt").write_bytes(b"not a checkpoint" * 64)  # rejected: an error, no point
            daemon.wait_for(daemon.processed(run / "notes.pt"), 30, "notes.pt")
            url = f"http://127.0.0.1:{port}" + run_href("mobilevit", "lr3e-4-bs256")
            out.parent.mkdir(parents=True, exist_ok=True)
            _chromium(url, tmp / "chromium", f"--screenshot={out.resolve()}", "--window-size=1200,900",
                      "--hide-scrollbars")
        finally:
            daemon.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    screenshot(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/status-page.png"))
    print("wrote", sys.argv[1] if len(sys.argv) > 1 else "docs/status-page.png", time.strftime("%H:%M:%S"))
