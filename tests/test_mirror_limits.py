"""Bounds of an object-store watch against hostile or merely messy input: a poison SQS message, a prefix flooded with
small non-checkpoint objects, keys too long for this disk, a root that cannot be listed, error messages naming the
object rather than this host's mirror path.

Real components: moto's S3 and SQS server on 127.0.0.1 (``tests/s3_server.py``). Fakes only for injected faults,
each marked FAULT INJECTION: an SQS client whose receive fails, a disk that refuses a write.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from ckptd.daemon.config import TEMP_EXCLUDES
from ckptd.errors import CheckpointChangedError, CheckpointError
from ckptd.remote import mirror as mirror_mod
from ckptd.remote import sqs_hints
from ckptd.remote.mirror import ObjectMirror, lookup
from ckptd.remote.object_source import ObjectSource
from ckptd.remote.roots import RemoteRoots, WatchLister
from ckptd.remote.scope import WatchScope
from ckptd.remote.sqs_hints import MAX_BODY, SqsHints, object_urls
from tests.s3_server import S3Endpoint

KiB, MiB = 1 << 10, 1 << 20


class Log:
    """Records log calls (the mirror's and the SQS listener's logger is injected)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.events.append((event, kw))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [kw for name, kw in self.events if name == event]


def _watch(tmp_path: Path, bucket: str, **kw: Any) -> SimpleNamespace:
    return SimpleNamespace(name="w", root=tmp_path / "state" / "mirror" / "w", remote=f"s3://{bucket}/runs",
                           storage_options={}, poll_interval=1.0, **kw)


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# --- SQS hints ----------------------------------------------------------------------------------------------
def test_a_poison_message_is_logged_and_deleted_and_the_hints_go_on(s3: S3Endpoint) -> None:
    sqs = s3.client("sqs")
    queue = sqs.create_queue(QueueName=f"poison-{os.getpid()}-{time.monotonic_ns()}")["QueueUrl"]
    woken: list[str] = []
    log = Log()
    hints = SqsHints(queue, {}, woken.append, log, wait_seconds=1)
    try:
        poison = "[" * 100_000 + "]" * 100_000  # 200 KB: under the limit, RecursionError in json
        sqs.send_message(QueueUrl=queue, MessageBody="not json at all")
        sqs.send_message(QueueUrl=queue, MessageBody=poison)
        _wait(lambda: hints.received >= 2, 15, "the bad messages to be received")
        good = {"Records": [{"s3": {"bucket": {"name": "b"}, "object": {"key": "runs/r1/x.pt"}}}]}
        sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(good))
        _wait(lambda: woken, 15, "the hint after the poison")
        assert hints.alive and woken == ["s3://b/runs/r1/x.pt"]
        unreadable = log.named("sqs.unreadable")
        assert len(unreadable) == 2 and "RecursionError" in unreadable[1]["reason"]
        assert all(len(kw["reason"]) < 500 and "[[[" not in kw["reason"] for kw in unreadable)  # never the body
        attrs = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        assert attrs == {"ApproximateNumberOfMessages": "0", "ApproximateNumberOfMessagesNotVisible": "0"}
    finally:
        hints.close()


def test_an_oversized_body_is_refused_unparsed(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[str] = []
    real_loads = json.loads
    monkeypatch.setattr(sqs_hints.json, "loads", lambda text, **kw: parsed.append(text) or real_loads(text, **kw))
    with pytest.raises(ValueError, match="not parsed"):
        object_urls("{" + " " * MAX_BODY + "}")
    assert parsed == []
    with pytest.raises(ValueError, match="not parsed"):
        object_urls("é" * (MAX_BODY // 2 + 1))  # counted in bytes, not characters


class _FlakyClient:
    """FAULT INJECTION: an SQS client whose receive fails ``failures`` times, then returns one message whose
    hint makes ``wake`` raise (a bug of ours), then one good message."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[float] = []
        self.deleted: list[str] = []
        self.sent = 0

    def receive_message(self, **kw: Any) -> dict[str, Any]:
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.failures:
            raise ConnectionError("endpoint unreachable")
        self.sent += 1
        if self.sent > 2:
            time.sleep(0.05)
            return {}
        key = "boom.pt" if self.sent == 1 else "ok.pt"
        body = json.dumps({"Records": [{"s3": {"bucket": {"name": "b"}, "object": {"key": key}}}]})
        return {"Messages": [{"MessageId": str(self.sent), "ReceiptHandle": f"h{self.sent}", "Body": body}]}

    def delete_message_batch(self, **kw: Any) -> None:
        self.deleted.extend(e["ReceiptHandle"] for e in kw["Entries"])


def test_a_failing_receive_backs_off_and_nothing_kills_the_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    client = _FlakyClient(failures=4)
    monkeypatch.setattr(sqs_hints, "sqs_client", lambda url, opts: client)
    monkeypatch.setattr(sqs_hints, "BACKOFF_FIRST", 0.05)
    woken: list[str] = []

    def wake(url: str) -> None:
        if url.endswith("boom.pt"):
            raise RuntimeError("a bug in the wake callback")
        woken.append(url)

    log = Log()
    hints = SqsHints("http://127.0.0.1:9/1/q", {}, wake, log)
    try:
        _wait(lambda: woken, 10, "the good hint")
        assert hints.alive and woken == ["s3://b/ok.pt"] and client.deleted[:2] == ["h1", "h2"]
        gaps = [b - a for a, b in itertools.pairwise(client.calls[:5])]
        assert gaps[0] >= 0.04 and all(later > 1.5 * earlier for earlier, later in itertools.pairwise(gaps)), gaps
        failed = [kw["reason"] for kw in log.named("sqs.failed")]
        assert len(failed) == 1 and "ConnectionError" in failed[0]  # once, not once per try
        assert len(log.named("sqs.recovered")) == 1
        (bug,) = log.named("sqs.hint_failed")
        assert "RuntimeError: a bug in the wake callback" in bug["reason"]
    finally:
        hints.close()


# --- what is mirrored, and how --------------------------------------------------------------------------------
def test_a_flood_of_small_objects_is_stubbed_and_what_the_watch_never_reads_is_not_mirrored(
        s3: S3Endpoint, tmp_path: Path) -> None:
    bucket = s3.bucket()
    client = s3.client()
    blob = os.urandom(256 * KiB)
    for i in range(20):
        client.put_object(Bucket=bucket, Key=f"runs/r1/data/shard-{i:03d}.bin", Body=blob)  # small, not metadata
    kept = {
        "r1/e0.pt": blob, "r1/e0.json": b'{"metric": 1}', "r1/a/b/c/d/x.pt": b"x",  # depth 4 = max_depth + 1
        "r1/a/b/c/step-5/.metadata": b"m", "r1/a/b/c/step-5/__0_0.distcp": b"d",  # a DCP folder at max_depth
        "r1/a/b/c/step-5/sub/deeper.bin": b"s",  # inside a checkpoint folder: read as a whole
        "r1/checkpoint-3/trainer_state.json": b"{}", "r1/lightning_logs/version_0/hparams.yaml": b"lr: 1",
        "r1/commit_success": b"",
    }
    ignored = ["README.md", ".hidden/x.pt", "r1.tmp/x.pt", "r1/.git/config", "r1/tmp-1/x.pt",
               "r1/x.pt.partial", "r1/a/b/c/d/e/too-deep.pt"]
    for rel, body in kept.items():
        client.put_object(Bucket=bucket, Key=f"runs/{rel}", Body=body)
    for rel in ignored:
        client.put_object(Bucket=bucket, Key=f"runs/{rel}", Body=b"never mirrored")
    watch = _watch(tmp_path, bucket, runs="*", exclude=TEMP_EXCLUDES, max_depth=3)
    m = ObjectMirror(watch, Log())
    change = m.refresh()
    files = {str(p.relative_to(m.root)) for p in m.root.rglob("*") if p.is_file()}
    assert files == set(kept) | {f"r1/data/shard-{i:03d}.bin" for i in range(20)}
    assert change.ignored == len(ignored) and change.objects == len(kept) + len(ignored) + 20
    disk = sum(p.stat().st_blocks * 512 for p in m.root.rglob("*") if p.is_file())
    assert disk < 256 * KiB  # no shard, no checkpoint copied: stubs; only the metadata is local
    for name in ("r1/e0.pt", "r1/data/shard-000.bin", "r1/a/b/c/step-5/__0_0.distcp"):
        assert lookup(m.root / name) is not None  # small, but read with ranged GETs
    for name in ("r1/e0.json", "r1/a/b/c/step-5/.metadata", "r1/lightning_logs/version_0/hparams.yaml"):
        assert lookup(m.root / name) is None and (m.root / name).read_bytes() == kept[name]
    assert ObjectSource(m.root / "r1/e0.pt", lookup(m.root / "r1/e0.pt")).read(1000, 16) == blob[1000:1016]


def test_the_scope_follows_runs_and_max_depth() -> None:
    one = WatchScope(SimpleNamespace(runs="team-*/*", exclude=("*.tmp",), max_depth=0))
    assert one.select(["team-a/r1/x.pt", "team-a/r1/ckpt/model.safetensors", "other/r1/x.pt", "team-a/r1",
                       "team-a/r1/ckpt/sub/y.bin", "team-a/r1/d/e/z.pt", "team-a/r1.tmp/x.pt"]) == {
        "team-a/r1/x.pt", "team-a/r1/ckpt/model.safetensors", "team-a/r1/ckpt/sub/y.bin"}  # a folder: whole
    root = WatchScope(SimpleNamespace(runs=".", exclude=(), max_depth=1))
    assert root.select(["x.pt", "a/b/x.pt", "a/b/c/x.pt"]) == {"x.pt", "a/b/x.pt"}
    anywhere = WatchScope(SimpleNamespace(runs="**/run-*", exclude=TEMP_EXCLUDES, max_depth=0))
    assert anywhere.select(["a/b/c/run-1/d/e/x.pt", "a/.cache/x.pt"]) == {"a/b/c/run-1/d/e/x.pt"}


def test_the_scope_repeats_what_discovery_and_the_readers_use() -> None:
    from ckptd.daemon import discovery
    from ckptd.formats import HF_ADAPTER_FILES, HF_MODEL_FILES
    from ckptd.remote import scope

    assert scope.COMMIT_MARKER == discovery.COMMIT_MARKER
    assert set(scope.FOLDER_FILES) == {discovery.HF_TRAINER_STATE, *HF_MODEL_FILES, *HF_ADAPTER_FILES}


def test_a_reload_changes_what_is_mirrored(s3: S3Endpoint, tmp_path: Path) -> None:
    bucket = s3.bucket()
    s3.client().put_object(Bucket=bucket, Key="runs/r1/a/b/x.pt", Body=b"x")
    watch = _watch(tmp_path, bucket, runs="*", exclude=(), max_depth=0)
    lister = WatchLister(watch, Log(), lambda *a: None)
    assert lister.refresh().ignored == 1 and not (watch.root / "r1/a/b/x.pt").exists()
    lister.watch = _watch(tmp_path, bucket, runs="*", exclude=(), max_depth=3)  # what a reload does
    assert lister.refresh().changed == (watch.root / "r1/a/b/x.pt",)


def test_whole_downloads_are_batched_and_large_ones_streamed(s3: S3Endpoint, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mirror_mod, "BATCH_BYTES", 1 * MiB)
    monkeypatch.setattr(mirror_mod, "STREAM_LIMIT", 512 * KiB)
    bucket = s3.bucket()
    client = s3.client()
    bodies = {f"r1/m{i}.json": json.dumps({"metric": i, "pad": "x" * (200 * KiB)}).encode() for i in range(12)}
    bodies["r1/trainer_state.json"] = json.dumps({"log_history": ["y" * 100] * 20_000}).encode()  # ~2 MiB
    bodies["r1/empty.txt"] = b""
    for rel, body in bodies.items():
        client.put_object(Bucket=bucket, Key=f"runs/{rel}", Body=body)
    requested: list[int] = []
    streamed: list[str] = []
    m = ObjectMirror(_watch(tmp_path, bucket), Log())
    fs, _ = m.filesystem()
    real_ranges, real_open = fs.cat_ranges, fs.open

    def spy_ranges(paths: list[str], starts: list[int], ends: list[int], **kw: Any) -> Any:
        requested.append(sum(e - s for s, e in zip(starts, ends)))
        return real_ranges(paths, starts, ends, **kw)

    def spy_open(path: str, *a: Any, **kw: Any) -> Any:
        streamed.append(path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(fs, "cat_ranges", spy_ranges)
    monkeypatch.setattr(fs, "open", spy_open)
    m.refresh()
    for rel, body in bodies.items():
        assert (m.root / rel).read_bytes() == body and lookup(m.root / rel) is None
    assert len(requested) >= 3 and max(requested) <= 1 * MiB + 32, requested  # batches, none over the bound
    assert streamed == [f"{bucket}/runs/r1/trainer_state.json"]


# --- keys this disk cannot hold, write failures -----------------------------------------------------------------
def test_a_key_longer_than_path_max_is_logged_once_and_skipped(s3: S3Endpoint, tmp_path: Path) -> None:
    bucket = s3.bucket()
    deep = "runs/deep/" + "/".join(["d" * 200] * 25) + "/x.pt"  # every component fine, the whole > 4096 bytes
    s3.client().put_object(Bucket=bucket, Key=deep, Body=b"x")
    s3.client().put_object(Bucket=bucket, Key="runs/deep/ok.pt", Body=b"x")
    log = Log()
    m = ObjectMirror(_watch(tmp_path, bucket), log)
    for _ in range(3):
        change = m.refresh()
    assert change.skipped == 1 and (m.root / "deep/ok.pt").exists()
    skipped = log.named("mirror.skipped")
    assert len(skipped) == 1 and "4096" in skipped[0]["reason"]
    assert log.named("mirror.write_failed") == []


def test_a_write_failure_is_logged_once_not_at_every_listing(s3: S3Endpoint, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3.bucket()
    s3.client().put_object(Bucket=bucket, Key="runs/r1/e0.pt", Body=b"x" * 100)
    log = Log()
    m = ObjectMirror(_watch(tmp_path, bucket), log)
    real_replace = os.replace

    def full_disk(src: Any, dst: Any) -> None:  # FAULT INJECTION: the mirror's disk refuses the write
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mirror_mod.os, "replace", full_disk)
    for _ in range(3):
        assert not m.refresh().changed
    failed = log.named("mirror.write_failed")
    assert len(failed) == 1 and failed[0]["key"] == f"s3://{bucket}/runs/r1/e0.pt"
    assert not [p for p in m.root.rglob("*") if p.is_file()]  # no temp file left behind
    monkeypatch.setattr(mirror_mod.os, "replace", real_replace)
    assert m.refresh().changed == (m.root / "r1/e0.pt",)


# --- what the operator is told ----------------------------------------------------------------------------------
def test_errors_about_a_stub_name_the_object_url(s3: S3Endpoint, tmp_path: Path) -> None:
    from ckptd.reader import read_checkpoint

    bucket = s3.bucket()
    buf = io.BytesIO()
    torch.save({"model_state_dict": torch.nn.Linear(8, 8).state_dict()}, buf)
    s3.client().put_object(Bucket=bucket, Key="runs/r1/e0.pt", Body=buf.getvalue())
    s3.client().put_object(Bucket=bucket, Key="runs/r1/bad.pt", Body=b"PK\x03\x04" + b"\0" * 4000)
    m = ObjectMirror(_watch(tmp_path, bucket), Log())
    m.refresh()
    stub = m.root / "r1/e0.pt"
    source = ObjectSource(stub, lookup(stub))
    s3.client().put_object(Bucket=bucket, Key="runs/r1/e0.pt", Body=b"overwritten")
    with pytest.raises(CheckpointChangedError) as changed:
        source.verify_unchanged()
    assert changed.value.path == f"s3://{bucket}/runs/r1/e0.pt" and str(m.root) not in str(changed.value)
    with pytest.raises(CheckpointError) as corrupt:
        read_checkpoint(m.root / "r1/bad.pt").__enter__()
    assert str(corrupt.value).startswith(f"s3://{bucket}/runs/r1/bad.pt: ")
    local = tmp_path / "local.pt"
    with pytest.raises(CheckpointError) as missing:
        read_checkpoint(local).__enter__()
    assert missing.value.path == str(local)  # any other path: unchanged


def test_a_root_that_cannot_be_listed_is_reported_as_failing(s3: S3Endpoint, tmp_path: Path) -> None:
    watch = _watch(tmp_path, "no-such-bucket-ckptd")
    roots = RemoteRoots(lambda url: None)
    log = Log()
    assert roots.take(watch, log) is None  # ckptd once: one listing on the calling thread, it failed
    failing = roots.failing()
    assert list(failing) == ["w"] and failing["w"]
    assert len(log.named("watch.listing_failed")) == 1
    roots.stop()
    ok = s3.bucket()
    roots = RemoteRoots(lambda url: None)
    assert roots.take(_watch(tmp_path / "2", ok), log) is not None and roots.failing() == {}
    roots.stop()


def test_once_exits_1_when_an_object_store_root_cannot_be_listed(s3: S3Endpoint, tmp_path: Path) -> None:
    from ckptd.daemon.config import load_config
    from ckptd.daemon.service import Daemon
    from tests.daemon_helpers import write_config

    config = write_config(tmp_path, watch={"root": "s3://no-such-bucket-ckptd/runs", "mode": "poll"})
    daemon = Daemon(load_config(config), config, once=True)
    rc = daemon.run_once()
    assert list(daemon.remote.failing()) == ["w"]  # still known after run_once: what its exit status needs
    assert rc == 1
