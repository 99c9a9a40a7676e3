"""structlog setup: JSON lines when not on a TTY (journald, files), readable console lines on a TTY."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _SafeStream:
    """The log stream, minus its power to kill the daemon: when the reader goes away (a closed pipe, a stopped
    journald, ``ckptd once 2>&1 | head``) log lines are dropped instead of raising in the middle of a job.

    A stream that is ``None`` is broken from the start: Python sets ``sys.stderr`` to ``None`` when the process
    starts with its standard error closed (``ckptd run 2>&-``); the daemon then runs, logging nowhere."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.broken = stream is None

    def isatty(self) -> bool:
        if self.broken:
            return False
        try:
            return bool(self.stream.isatty())
        except (ValueError, OSError, AttributeError):  # closed, or not a file at all
            return False

    def write(self, text: str) -> int:
        if self.broken:
            return len(text)
        try:
            return int(self.stream.write(text) or 0)
        except (ValueError, OSError):  # BrokenPipeError is an OSError; ValueError: the stream was closed
            self.broken = True
            return len(text)

    def flush(self) -> None:
        if self.broken:
            return
        try:
            self.stream.flush()
        except (ValueError, OSError):
            self.broken = True


_SAFE: dict[int, _SafeStream] = {}  # one wrapper per real stream: structlog's write lock is per file object, so
# loggers bound before a reload (other threads) and after it must share it, or their lines interleave mid-line


def _safe(stream: Any) -> _SafeStream:
    key = id(stream)
    if key not in _SAFE or _SAFE[key].stream is not stream:
        _SAFE[key] = _SafeStream(stream)
    return _SAFE[key]


def configure_logging(fmt: str = "auto", level: str = "info", stream: Any = None) -> None:
    stream = _safe(stream if stream is not None else sys.stderr)
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = structlog.processors.JSONRenderer(sort_keys=False) if use_json else \
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if use_json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # library modules (ours, watchdog, …) log through stdlib logging: forward them as structured lines too
    root = logging.getLogger()
    root.handlers = [_StructlogBridge()]
    root.setLevel(_LEVELS[level])
    for noisy in ("coremltools", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _StructlogBridge(logging.Handler):
    """stdlib logging -> structlog, so every line on the stream has the same format."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            structlog.get_logger("ckptd").log(record.levelno, "library.log", logger=record.name,
                                              message=record.getMessage())
        except Exception:  # logging must never raise  # noqa: BLE001
            self.handleError(record)


def get_logger(**bind: Any) -> Any:
    return structlog.get_logger("ckptd").bind(**bind)
