"""The daemon's HTTP listener (``metrics.listen``): ``/metrics`` for Prometheus and a read-only status page.

- ``/metrics``: ``generate_latest(registry)`` with ``CONTENT_TYPE_LATEST`` (what prometheus_client serves).
- ``/``: the runs table (:func:`ckptd.daemon.status.collect_status`).
- ``/run?watch=W&run=R&stream=S``: one run stream (:func:`ckptd.daemon.history.collect_history`).

Only GET and HEAD; unknown paths are 404, a malformed ``/run`` query is 400, an unknown run 404, an unreadable
ledger 500 with the reason. Every request reads the ledger through its own read-only SQLite connection in the
request's thread (stdlib ``ThreadingHTTPServer``, daemon threads): the daemon's loop never waits for a page, and
a failing page never reaches it. Pages show what ``ckptd status`` shows, no more (see status_page.py).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ckptd.daemon import status_page
from ckptd.daemon.history import AmbiguousRunError, UnknownRunError, collect_history
from ckptd.daemon.logs import get_logger
from ckptd.daemon.status import LedgerReadError, collect_status

HTML = "text/html; charset=utf-8"
MAX_NAME = 4096  # a query value longer than any file name (255 bytes) or run name is refused
RUN_PARAMS = ("watch", "run", "stream")
_HTML_HEADERS = (
    # no script can run even if something slipped through escaping; nothing is loaded from anywhere
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
                                "form-action 'none'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)


class BadQuery(ValueError):
    """The query string of ``/run`` is malformed (answered 400 with this message)."""


def parse_run_query(query: str) -> tuple[str | None, str, str]:
    """``watch`` (optional), ``run`` (required), ``stream`` (default ``model``): each at most once, non-empty,
    valid percent-encoded UTF-8, without '/' or NUL (names come from the filesystem: anything else may occur)."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True, encoding="utf-8", errors="strict",
                          max_num_fields=len(RUN_PARAMS))
    except ValueError as exc:  # UnicodeDecodeError is one
        raise BadQuery(f"malformed query: {exc}") from exc
    values: dict[str, str] = {}
    for key, value in pairs:
        if key not in RUN_PARAMS:
            raise BadQuery(f"unknown parameter {key!r} (expected watch, run, stream)")
        if key in values:
            raise BadQuery(f"parameter {key!r} given twice")
        if not value or len(value) > MAX_NAME or "/" in value or "\x00" in value:
            raise BadQuery(f"parameter {key!r} is not a valid name")
        values[key] = value
    if "run" not in values:
        raise BadQuery("parameter 'run' is required")
    return values.get("watch"), values["run"], values.get("stream", "model")


def _find_row(rows: list[dict[str, Any]], watch: str, run: str, stream: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["watch"] == watch and r["run"] == run
                 and r.get("stream", "model") == stream), None)


class _Handler(BaseHTTPRequestHandler):
    server: StatusHTTPServer
    server_version = "ckptd"
    sys_version = ""
    timeout = 15  # a client that stalls mid-request holds one daemon thread this long, at most

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _not_allowed(self) -> None:
        body = status_page.render_error(405, "Method not allowed", "only GET and HEAD are served", time.time())
        self._send(405, HTML, body.encode(), head=False, extra=(("Allow", "GET, HEAD"),))

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged (a refreshing page would flood the log); failures are, in _route."""

    def _serve(self, head: bool) -> None:
        try:
            code, ctype, body = self._route()
        except Exception as exc:  # noqa: BLE001 - a page must never take the listener (or the daemon) down
            get_logger().warning("status_page.error", path=self.path[:200], reason=f"{type(exc).__name__}: {exc}")
            code, ctype = 500, HTML
            body = status_page.render_error(500, "Internal error", f"the page failed: {type(exc).__name__}",
                                            time.time()).encode()
        self._send(code, ctype, body, head=head)

    def _send(self, code: int, ctype: str, body: bytes, head: bool, extra: tuple[tuple[str, str], ...] = ()) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (_HTML_HEADERS if ctype == HTML else ()) + extra:
                self.send_header(name, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)
        except OSError:  # the client went away
            pass

    def _route(self) -> tuple[int, str, bytes]:
        path, _, query = self.path.partition("?")
        query = query.partition("#")[0]
        now = time.time()
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.server.registry)
        config = self.server.config() if self.server.config is not None else None
        if config is None or path not in ("/", "/run"):
            return 404, HTML, status_page.render_error(404, "Not found", "no such page", now).encode()
        try:
            if path == "/":
                return 200, HTML, status_page.render_index(collect_status(config), now).encode()
            try:
                watch, run, stream = parse_run_query(query)
            except BadQuery as exc:
                return 400, HTML, status_page.render_error(400, "Bad request", str(exc), now).encode()
            try:
                history = collect_history(config, watch, run, stream)
            except UnknownRunError as exc:
                return 404, HTML, status_page.render_error(404, "Unknown run", str(exc), now).encode()
            except AmbiguousRunError as exc:
                return 400, HTML, status_page.render_error(400, "Bad request", str(exc), now).encode()
            row = _find_row(collect_status(config), history["watch"], history["run"], history["stream"])
            return 200, HTML, status_page.render_run(history, row, now).encode()
        except LedgerReadError as exc:
            get_logger().warning("status_page.ledger_error", reason=str(exc))
            return 500, HTML, status_page.render_error(500, "Cannot read the ledger", str(exc), now,
                                                       refresh=True).encode()


class StatusHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 config: Callable[[], Any] | None = None) -> None:
        # the address family follows the host (an IPv6 literal binds an AF_INET6 socket), as prometheus_client does
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        self.address_family = family
        self.registry = registry
        self.config = config
        super().__init__((sockaddr[0], port), _Handler)
        self.thread = threading.Thread(target=self.serve_forever, name="ckptd-http", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)


def serve(listen: str, registry: CollectorRegistry, config: Callable[[], Any] | None = None) -> StatusHTTPServer:
    """Start the listener for ``host:port`` (``[v6]:port``; an empty host is 127.0.0.1: local unless configured).
    ``config`` returns the daemon's current config (it changes on reload); without it only /metrics is served."""
    host, _, port = listen.rpartition(":")
    return StatusHTTPServer(host.strip("[]") or "127.0.0.1", int(port), registry, config)
