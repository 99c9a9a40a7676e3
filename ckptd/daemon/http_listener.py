"""The daemon's HTTP listener (``metrics.listen``): ``/metrics`` for Prometheus and a read-only status page.

- ``/metrics``: ``generate_latest(registry)`` with ``CONTENT_TYPE_LATEST`` (what prometheus_client serves).
- ``/``: the runs table (:func:`ckptd.daemon.status.collect_status`).
- ``/run?watch=W&run=R&stream=S``: one run stream (:func:`ckptd.daemon.history.collect_history`).

Only GET and HEAD; unknown paths are 404, a malformed ``/run`` query is 400, an unknown run 404, an unreadable
ledger 500 with the reason. Every request reads the ledger through its own read-only SQLite connection in the
request's thread (stdlib ``ThreadingHTTPServer``, daemon threads): the daemon's loop never waits for a page, and
a failing page never reaches it. Pages show what ``ckptd status`` shows, no more (see status_page.py).

What a client can cost the daemon is bounded (the listener shares the daemon's threads, fds and CPU):

- at most :data:`MAX_CONNECTIONS` requests are handled at once, one thread each (the listener never starts
  threads without bound). A connection over the cap takes the place of the oldest one still sending its headers
  after :data:`STALL_AFTER` seconds (that one is closed: a slowloris cannot starve Prometheus); when there is none
  it is answered ``503`` at once and closed;
- a client has :data:`REQUEST_DEADLINE` seconds for its whole request (request line and headers, however slowly
  it trickles in) and :data:`RESPONSE_DEADLINE` seconds to take the answer; one request per connection (HTTP/1.0);
- when ``accept()`` fails for lack of fds or memory (EMFILE, ENFILE, ...) the listener sleeps
  :data:`ACCEPT_BACKOFF` seconds instead of spinning, logged once per :data:`LOG_EVERY` seconds with a count;
- errors are one structured log line (at most one per error type per :data:`LOG_EVERY` seconds, with a count;
  resets and timeouts at debug level), never a traceback on stderr; if ``serve_forever`` ever ends while the
  daemon runs, it is logged and restarted.

DNS rebinding: a web page the operator visits must not read the status page or /metrics through a name that
resolves to this machine, so only requests whose Host is ``localhost``, ``127.0.0.1``, ``[::1]`` (any port) or the
configured listen host are answered; on a non-loopback listen address also an IP address (which no web site can
rebind) and the machine's hostname and FQDN. Anything else is ``421 Misdirected Request``. A request without Host
is fine in HTTP/1.0 (a 400 in HTTP/1.1). The status page itself is served only on a loopback listen address unless
``metrics.status_page: true`` (``false``: never); ``/metrics`` always.
"""

from __future__ import annotations

import errno
import io
import ipaddress
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ckptd.daemon import status_page
from ckptd.daemon.history import AmbiguousRunError, UnknownRunError, collect_history
from ckptd.daemon.logs import get_logger
from ckptd.daemon.status import LedgerReadError, collect_status

HTML = "text/html; charset=utf-8"
MAX_NAME = 4096  # a query value longer than any file name (255 bytes) or run name is refused
RUN_PARAMS = ("watch", "run", "stream")
MAX_CONNECTIONS = 16  # requests handled at once (one thread each); more are answered 503 at once
REQUEST_DEADLINE = 10.0  # seconds a client has for its request line and headers, all together
RESPONSE_DEADLINE = 10.0  # seconds a client has to take the response
STALL_AFTER = 1.0  # with every slot taken, a client still sending its headers after this long gives its slot up
ACCEPT_BACKOFF = 0.1  # seconds to wait when accept() fails for lack of fds (EMFILE): no busy loop
RESTART_DELAY = 0.25  # seconds before serve_forever is restarted after it failed
LOG_EVERY = 10.0  # at most one log line per kind of listener error this often (with a count)
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
_ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_BUSY_BODY = b"busy: too many requests in progress, retry later\n"
_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nRetry-After: 1\r\n"
         b"Connection: close\r\nContent-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)
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


def host_name(value: str) -> str | None:
    """The host of a Host header (or an absolute URL's authority): lower case, without the port or a trailing
    dot, an IPv6 address in brackets; None when malformed."""
    v = value.strip().lower()
    if v.startswith("["):
        end = v.find("]")
        if end < 0:
            return None
        host, rest = v[:end + 1], v[end + 1:]
    else:
        host, sep, port = v.partition(":")
        rest = sep + port
        host = host.rstrip(".")
    if rest and not (rest[0] == ":" and rest[1:].isascii() and (rest[1:].isdigit() or rest == ":")):
        return None
    if not host or "@" in host or any(c.isspace() for c in host):
        return None
    return host


def _ip_literal(host: str) -> bool:
    """An IPv4 address, or an IPv6 address in brackets (no web site can make a browser send one as its own)."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return (address.version == 6) == (text != host)


def _find_row(rows: list[dict[str, Any]], watch: str, run: str, stream: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["watch"] == watch and r["run"] == run
                 and r.get("stream", "model") == stream), None)


class Throttled:
    """Structured log lines, at most one per key every ``every`` seconds; each says how many times it happened
    since the previous line of its key (``count``). Logging never raises."""

    def __init__(self, every: float = LOG_EVERY) -> None:
        self.every = every
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def log(self, key: str, level: str, event: str, **fields: Any) -> bool:
        """Log ``event`` at ``level`` unless a line of ``key`` went out less than ``every`` seconds ago."""
        now = time.monotonic()
        with self._lock:
            count = self._count[key] = self._count.get(key, 0) + 1
            last = self._last.get(key)
            if last is not None and now - last < self.every:
                return False
            self._last[key] = now
            del self._count[key]
        try:
            getattr(get_logger(), level)(event, count=count, **fields)
        except Exception:  # noqa: BLE001 - a log line must never take the listener down
            pass
        return True


class _DeadlineReader(io.RawIOBase):
    """The request's socket, read against one deadline for the whole request: every read gets what is left of it,
    so a client that trickles a byte at a time still runs out of time."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took longer than its deadline")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    server: StatusHTTPServer
    server_version = "ckptd"
    sys_version = ""
    protocol_version = "HTTP/1.0"  # one request per connection: the deadline covers the whole connection
    timeout = REQUEST_DEADLINE

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection,
                                                       time.monotonic() + self.server.request_deadline))
        self.server.reading(self.connection)

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        if not self.server.read(self.connection):  # dropped as stalled meanwhile: its headers may be cut short
            self.close_connection = True
            return False
        return parsed

    def finish(self) -> None:
        self.server.read(self.connection)
        super().finish()

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
            self.connection.settimeout(self.server.response_deadline)  # sendall: the total time to take it all
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (_HTML_HEADERS if ctype == HTML else ()) + extra:
                self.send_header(name, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)
        except OSError:  # the client went away, or took too long
            self.close_connection = True

    def _target(self) -> tuple[str | None, str, str]:
        """(the authority of an absolute-form target or None, the path, the query)."""
        target = self.path
        if target[:7].lower() == "http://" or target[:8].lower() == "https://":
            parts = urlsplit(target)
            return parts.netloc, parts.path or "/", parts.query
        path, _, query = target.partition("?")
        return None, path, query.partition("#")[0]

    def _misdirected(self, authority: str | None, now: float) -> tuple[int, str, bytes] | None:
        """None when the request names a host this listener answers for, else the 400 or 421 answer."""
        if authority is not None:  # an absolute-form target's authority replaces the Host header (RFC 9112 3.2.2)
            given = authority
        else:
            hosts = self.headers.get_all("Host") or []
            if len(hosts) > 1:
                return 400, HTML, status_page.render_error(400, "Bad request", "more than one Host header",
                                                           now).encode()
            if not hosts:
                if self.request_version == "HTTP/1.0" or self.request_version == "HTTP/0.9":
                    return None
                return 400, HTML, status_page.render_error(400, "Bad request", "HTTP/1.1 needs a Host header",
                                                           now).encode()
            given = hosts[0]
        host = host_name(given)
        if host is not None and self.server.host_allowed(host):
            return None
        self.server.throttled.log("misdirected", "info", "http.misdirected", host=given[:200])
        return 421, HTML, status_page.render_error(
            421, "Misdirected request",
            f"this listener does not answer for the host {given[:200]!r}: use localhost, 127.0.0.1 or [::1] "
            "(or, on a non-loopback listen address, its IP address or the machine's hostname)", now).encode()

    def _route(self) -> tuple[int, str, bytes]:
        authority, path, query = self._target()
        now = time.time()
        refused = self._misdirected(authority, now)
        if refused is not None:
            return refused
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.server.registry)
        config = self.server.config() if self.server.config is not None else None
        if config is None or path not in ("/", "/run"):
            return 404, HTML, status_page.render_error(404, "Not found", "no such page", now).encode()
        if not self.server.status_page_on(config):
            return 404, HTML, status_page.render_error(
                404, "Not found", "the status page is off (metrics.status_page; by default it is served only when "
                "metrics.listen is a loopback address): only /metrics is served here", now).encode()
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
    block_on_close = False  # closing never waits for a client (request threads only read)
    request_queue_size = 64  # the kernel's accept backlog

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 config: Callable[[], Any] | None = None) -> None:
        # the address family follows the host (an IPv6 literal binds an AF_INET6 socket), as prometheus_client does
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        self.address_family = family
        self.registry = registry
        self.config = config
        self.max_connections = MAX_CONNECTIONS
        self.request_deadline = REQUEST_DEADLINE
        self.response_deadline = RESPONSE_DEADLINE
        self.throttled = Throttled()
        self.stall_after = STALL_AFTER
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._lock = threading.Lock()
        self._reading: dict[socket.socket, float] = {}  # connections still sending their headers: since when
        self._closing = threading.Event()
        try:
            self.loopback = ipaddress.ip_address(sockaddr[0]).is_loopback
        except ValueError:
            self.loopback = False
        configured = host_name(f"[{host}]" if ":" in host else host)
        self.allowed_hosts = set(LOOPBACK_HOSTS) | ({configured} if configured else set())
        self._own_names: frozenset[str] | None = None
        super().__init__((sockaddr[0], port), _Handler)
        self.thread = threading.Thread(target=self._serve_loop, name="ckptd-http", daemon=True)
        self.thread.start()

    # --- which requests are answered --------------------------------------------------------------------------------
    def host_allowed(self, host: str) -> bool:
        """``host`` as :func:`host_name` returns it."""
        if host in self.allowed_hosts:
            return True
        if self.loopback:
            return False
        return _ip_literal(host) or host in self.own_names()

    def own_names(self) -> frozenset[str]:
        """The machine's hostname and FQDN (looked up once, on the first request that needs them)."""
        if self._own_names is None:
            names = set()
            for lookup in (socket.gethostname, socket.getfqdn):
                try:
                    names.add(lookup().lower().rstrip("."))
                except OSError:
                    pass
            self._own_names = frozenset(n for n in names if n)
        return self._own_names

    def status_page_on(self, config: Any) -> bool:
        """``metrics.status_page``: true, false, or None (auto: only on a loopback listen address)."""
        setting = getattr(getattr(config, "metrics", None), "status_page", None)
        return self.loopback if setting is None else bool(setting)

    # --- bounded resources ------------------------------------------------------------------------------------------
    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in _ACCEPT_ERRNOS:  # the connection stays queued: without a pause, select() spins
                self.throttled.log(f"accept:{exc.errno}", "warning", "http.accept_failed",
                                   reason=f"{type(exc).__name__}: {exc}", backoff_s=ACCEPT_BACKOFF)
                time.sleep(ACCEPT_BACKOFF)
            raise

    def reading(self, connection: socket.socket) -> None:
        """``connection`` is sending its request line and headers."""
        with self._lock:
            self._reading[connection] = time.monotonic()

    def read(self, connection: socket.socket) -> bool:
        """``connection`` is done sending its headers (or is done): False when it had been dropped as stalled."""
        with self._lock:
            return self._reading.pop(connection, None) is not None

    def _drop_stalled(self) -> bool:
        """Close the oldest connection still sending its headers after ``stall_after`` seconds (its thread ends
        at once and frees its slot); False when there is none."""
        now = time.monotonic()
        with self._lock:
            stalled = [(since, id(c), c) for c, since in self._reading.items() if now - since >= self.stall_after]
            if not stalled:
                return False
            _, _, victim = min(stalled)
            del self._reading[victim]
        try:
            victim.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.throttled.log("stalled", "info", "http.stalled_dropped", limit=self.max_connections,
                           reason="every request slot was taken: the oldest client still sending its headers was "
                                  "dropped for a new one")
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False) and not (self._drop_stalled() and self._slots.acquire(timeout=1)):
            self.throttled.log("busy", "warning", "http.busy", limit=self.max_connections,
                               reason="every request slot is taken (slow or stalled clients?): answered 503")
            self._refuse(request)
            return
        try:
            threading.Thread(target=self.process_request_thread, args=(request, client_address),
                             name="ckptd-http-request", daemon=True).start()
        except BaseException as exc:  # RuntimeError: can't start new thread (TasksMax)
            self._slots.release()
            self.throttled.log("thread", "warning", "http.thread_failed", reason=f"{type(exc).__name__}: {exc}")
            self._refuse(request)
            if not isinstance(exc, Exception):
                raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        """503 without waiting for anything: read what already came (closing on unread data would reset the
        connection before the client reads the answer), send what fits, close."""
        try:
            request.setblocking(False)
            try:
                request.recv(65536)
            except OSError:
                pass
            request.send(_BUSY)
        except OSError:
            pass
        finally:
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One structured line (throttled), never a traceback on stderr, never an exception."""
        try:
            exc = sys.exc_info()[1]
            name = type(exc).__name__ if exc is not None else "unknown"
            client = isinstance(exc, (ConnectionError, TimeoutError))  # resets, broken pipes, slow clients
            self.throttled.log(f"error:{name}", "debug" if client else "warning",
                               "http.client_error" if client else "http.error", reason=f"{name}: {exc}"[:500])
        except Exception:  # noqa: BLE001 - handling an error must not raise another
            pass

    # --- the serving thread -----------------------------------------------------------------------------------------
    def _serve_loop(self) -> None:
        """serve_forever until close(); if it ever ends otherwise, log and restart it."""
        while True:
            try:
                self.serve_forever(poll_interval=0.25)  # close() waits for it at most this long
                reason = "serve_forever returned"
            except Exception as exc:  # noqa: BLE001 - the listener outlives whatever broke it
                reason = f"{type(exc).__name__}: {exc}"
            if self._closing.wait(RESTART_DELAY):
                return
            self.throttled.log("restart", "error", "http.listener_restarted", reason=reason[:500],
                               after_s=RESTART_DELAY)

    def close(self) -> None:
        self._closing.set()
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)


def serve(listen: str, registry: CollectorRegistry, config: Callable[[], Any] | None = None) -> StatusHTTPServer:
    """Start the listener for ``host:port`` (``[v6]:port``; an empty host is 127.0.0.1: local unless configured).
    ``config`` returns the daemon's current config (it changes on reload); without it only /metrics is served."""
    host, _, port = listen.rpartition(":")
    return StatusHTTPServer(host.strip("[]") or "127.0.0.1", int(port), registry, config)
