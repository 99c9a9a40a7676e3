"""The status page: the renderer on hand-built data (escaping, the chart's points and axes), then the real daemon's
HTTP listener end to end, read by real headless Chromium.

``python -m tests.test_status_page docs/status-page.png`` runs a real daemon over a 12-checkpoint run and takes the
README screenshot of its run page.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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
