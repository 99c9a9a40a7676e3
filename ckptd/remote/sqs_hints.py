"""S3 bucket notifications (delivered to an SQS queue) as hints: "list this watch now, not at the next
poll_interval". Never as the truth: notifications are at-least-once, may come late, twice or out of order, and the
listing decides what exists, so a duplicate or stale hint costs one listing and nothing else.

One daemon thread long-polls the queue (``WaitTimeSeconds`` <= 10), deletes what it received (a message ckptd
cannot parse is logged once and deleted too: left in the queue it would come back forever) and calls
``wake(url)`` with each object's ``s3://bucket/key``. ``close()`` returns at once; the thread ends after its
current poll (at most ``WAIT_SECONDS``) without waking anyone.

Nothing a message holds ends the thread: a body over :data:`MAX_BODY` is refused unparsed, any exception while
reading one message (a ``RecursionError`` from deeply nested JSON included) is one log line giving the reason,
never the body, and the message is deleted; a failed receive backs off (1 s, 2 s, … 60 s) and polls again.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import unquote_plus, urlsplit

from ckptd.remote.urls import redact, scrub

WAIT_SECONDS = 10  # SQS long poll; also the longest close() leaves the thread running
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0  # after a failed receive (queue missing, network, credentials)
MAX_BODY = 256 << 10  # bytes: an S3 notification is a few KiB; anything larger is refused without parsing it
REASON_MAX = 300  # characters of an exception's text in a log line
_REGION = re.compile(r"^(?:sqs\.)?([a-z]{2}(?:-[a-z]+)+-\d)\.(?:queue\.)?amazonaws\.com")


def object_urls(body: str) -> list[str]:
    """The ``s3://bucket/key`` of every object a notification body names ([] for ``s3:TestEvent``). Accepts an
    S3 notification, the same wrapped by SNS, or an EventBridge event. Raises ValueError for anything else
    (a body over :data:`MAX_BODY` unparsed); a hostile body may raise anything else too (RecursionError)."""
    if len(body) > MAX_BODY or len(body.encode("utf-8", "surrogatepass")) > MAX_BODY:
        raise ValueError(f"{len(body.encode('utf-8', 'surrogatepass'))} bytes, more than the {MAX_BODY} an S3 "
                         "notification may have; not parsed")
    msg = json.loads(body)
    if isinstance(msg, dict) and msg.get("Type") == "Notification" and isinstance(msg.get("Message"), str):
        msg = json.loads(msg["Message"])  # S3 -> SNS -> SQS (no larger than the body)
    if not isinstance(msg, dict):
        raise ValueError("not a JSON object")
    if msg.get("Event") == "s3:TestEvent":
        return []
    if isinstance(msg.get("detail"), dict) and "bucket" in msg["detail"]:  # EventBridge
        d = msg["detail"]
        return [f"s3://{d['bucket']['name']}/{d['object']['key']}"]
    records = msg.get("Records")
    if not isinstance(records, list):
        raise ValueError("no Records")
    out = []
    for rec in records:
        s3 = rec.get("s3") if isinstance(rec, dict) else None
        if not isinstance(s3, dict):
            raise ValueError("a record without s3")
        out.append(f"s3://{s3['bucket']['name']}/{unquote_plus(s3['object']['key'])}")  # keys come URL-encoded
    return out


def sqs_client(queue_url: str, storage_options: Mapping[str, Any]) -> Any:
    """A boto3 SQS client with the watch's credentials (s3fs-style ``key``/``secret``/``token``/``profile``)
    or the usual ones (environment, including ``AWS_ENDPOINT_URL``; profiles; instance roles)."""
    import boto3

    opts = dict(storage_options)
    client_kwargs = opts.get("client_kwargs") if isinstance(opts.get("client_kwargs"), Mapping) else {}
    match = _REGION.match(urlsplit(queue_url).hostname or "")
    region = client_kwargs.get("region_name") or (match.group(1) if match else None)
    session = boto3.session.Session(aws_access_key_id=opts.get("key"), aws_secret_access_key=opts.get("secret"),
                                    aws_session_token=opts.get("token"), profile_name=opts.get("profile"))
    return session.client("sqs", region_name=region or session.region_name or "us-east-1")


class SqsHints:
    """Long-polls ``queue_url`` in a daemon thread and calls ``wake(url)`` for each object a message names."""

    def __init__(self, queue_url: str, storage_options: Mapping[str, Any], wake: Callable[[str], None],
                 log: Any = None, *, wait_seconds: int = WAIT_SECONDS) -> None:
        self.queue_url = queue_url
        self.wake = wake
        self.log = log
        self.wait_seconds = max(0, min(int(wait_seconds), 20))
        self.received = 0  # messages handled (for tests and status)
        self._options = dict(storage_options)
        self._stop = threading.Event()
        self._last_error = ""
        self._last_hint_error = ""
        self._thread = threading.Thread(target=self._run, name="ckptd-sqs", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 0.5) -> None:
        """Stop: returns within ``timeout``; a poll in flight finishes on its own and wakes nobody."""
        self._stop.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        delay = BACKOFF_FIRST
        client = None
        while not self._stop.is_set():
            try:
                client = client or sqs_client(self.queue_url, self._options)
                reply = client.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10,
                                               WaitTimeSeconds=self.wait_seconds)
                messages = [m for m in reply.get("Messages") or [] if isinstance(m, dict)]
            except Exception as exc:  # noqa: BLE001 (the queue is an optimisation: polling goes on regardless)
                self._failed(exc)
                client = None
                self._stop.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay = BACKOFF_FIRST
            if self._last_error:
                self._last_error = ""
                self._note("info", "sqs.recovered", reason="receiving notifications again")
            if self._stop.is_set():
                return  # not deleted: redelivered to whoever polls next
            try:
                self._handle(client, messages)
            except Exception as exc:  # noqa: BLE001 (a bug of ours must not end the hints: log, poll again)
                self._hint_failed(exc)

    def _handle(self, client: Any, messages: list[dict[str, Any]]) -> None:
        urls: list[str] = []
        for msg in messages:
            try:
                urls.extend(object_urls(str(msg.get("Body") or "")))
            except Exception as exc:  # noqa: BLE001 (whatever the body does to the parser: deleted, logged once)
                self._note("warning", "sqs.unreadable", message_id=str(msg.get("MessageId", "?"))[:100],
                           reason=f"not an S3 notification ({_describe(exc)}); deleted, the listing still finds "
                                  "every object")
        self.received += len(messages)
        entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)
                   if m.get("ReceiptHandle")]
        if entries:
            try:
                client.delete_message_batch(QueueUrl=self.queue_url, Entries=entries)
            except Exception as exc:  # noqa: BLE001 (redelivered later: one more harmless hint)
                self._failed(exc)
        for url in dict.fromkeys(urls):
            try:
                self.wake(url)
            except Exception as exc:  # noqa: BLE001 (a hint is an optimisation: the listing still comes)
                self._hint_failed(exc)

    def _failed(self, exc: BaseException) -> None:
        reason = _describe(exc)
        if reason != self._last_error:  # one line per distinct failure, not one per poll
            self._last_error = reason
            self._note("warning", "sqs.failed", reason=f"{reason}; retrying with back-off (objects are still found "
                                                         "by the listing every poll_interval)")

    def _hint_failed(self, exc: BaseException) -> None:
        """Handling received messages failed (not the queue): one line per distinct reason."""
        reason = _describe(exc)
        if reason != self._last_hint_error:
            self._last_hint_error = reason
            self._note("error", "sqs.hint_failed", reason=f"{reason}; the hint is dropped, the listing every "
                                                           "poll_interval still finds every object")

    def _note(self, level: str, event: str, **kw: Any) -> None:
        if self.log is not None:
            getattr(self.log, level)(event, queue=redact(self.queue_url), **kw)


def _describe(exc: BaseException) -> str:
    """An exception for a log line: its type and text, cut to :data:`REASON_MAX` characters."""
    text = scrub(f"{type(exc).__name__}: {exc}")
    return text if len(text) <= REASON_MAX else text[:REASON_MAX] + "…"


def hints_by_queue(watches: Iterator[Any] | list[Any]) -> dict[tuple[str, str], list[Any]]:
    """Watches grouped by (queue URL, options): one listener per queue, so two watches on one queue do not
    take each other's messages."""
    groups: dict[tuple[str, str], list[Any]] = {}
    for watch in watches:
        if getattr(watch, "sqs_queue", ""):
            key = (watch.sqs_queue, json.dumps(dict(watch.storage_options), sort_keys=True, default=str))
            groups.setdefault(key, []).append(watch)
    return groups
