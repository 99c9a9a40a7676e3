"""Object-store watch roots (``root: s3://bucket/prefix``): the mirror of sparse stubs, ranged reads of only the
model's bytes, SQS hints, and the daemon producing what it produces on a local root.

Real components only: moto's S3 and SQS server on 127.0.0.1 (``tests/s3_server.py``) with real bucket
notifications, real ``torch.save`` checkpoints uploaded with boto3, the real daemon (in-process ``run_once`` and
``ckptd run`` as a subprocess).
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from structlog.testing import capture_logs

from ckptd.daemon.config import load_config, parse_config
from ckptd.errors import CheckpointChangedError, ConfigError
from ckptd.reader import read_checkpoint
from ckptd.remote.mirror import ObjectMirror, canonical, identity_mtime_ns, local, lookup
from ckptd.remote.object_source import STATS, ObjectSource
from ckptd.remote.sqs_hints import object_urls
from tests.daemon_helpers import DaemonProcess, write_config
from tests.s3_server import S3Endpoint

MiB = 1 << 20


class Log:
    """Records log calls (the mirror's logger is injected)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.events.append((event, kw))


def _mirror(tmp_path: Path, bucket: str, log: Any = None) -> ObjectMirror:
    watch = SimpleNamespace(name="w", root=tmp_path / "state" / "mirror" / "w", remote=f"s3://{bucket}/runs",
                            storage_options={})
    return ObjectMirror(watch, log or Log())


def _model(seed: int, width: int = 256, depth: int = 6) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])


def _training_state(seed: int, metric: float, width: int = 256, depth: int = 6) -> tuple[bytes, dict[str, Any]]:
    """A real training-state checkpoint: model, Adam state (2x the parameters), epoch and metric."""
    model = _model(seed, width, depth)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, width)).sum().backward()
    opt.step()
    buf = io.BytesIO()
    state = model.state_dict()
    torch.save({"model_state_dict": state, "optimizer_state_dict": opt.state_dict(), "metric": metric,
                "iterations": seed}, buf)
    return buf.getvalue(), state


def _put(s3: S3Endpoint, bucket: str, key: str, body: bytes) -> None:
    s3.client().put_object(Bucket=bucket, Key=key, Body=body)


# --- the mirror ---------------------------------------------------------------------------------------------
def test_stubs_are_sparse_and_carry_the_objects_size_and_time(s3: S3Endpoint, tmp_path: Path) -> None:
    bucket = s3.bucket()
    big = os.urandom(3 * MiB)
    _put(s3, bucket, "runs/exp/a.pt", big)
    _put(s3, bucket, "runs/exp/a.json", b'{"metric": 0.5}')
    m = _mirror(tmp_path, bucket)
    change = m.refresh()
    stub, side = m.root / "exp/a.pt", m.root / "exp/a.json"
    assert set(change.changed) == {stub, side} and change.objects == 2
    head = s3.client().head_object(Bucket=bucket, Key="runs/exp/a.pt")
    st = os.stat(stub)
    assert st.st_size == len(big) and st.st_blocks * 512 < 64 * 1024  # sparse: the bytes stay in the store
    assert st.st_mtime_ns // 10**9 == int(head["LastModified"].timestamp())
    assert st.st_mtime_ns == identity_mtime_ns(head["LastModified"], head["ETag"].strip('"'))
    assert side.read_bytes() == b'{"metric": 0.5}' and lookup(side) is None  # small: downloaded whole
    ref = lookup(stub)
    assert ref is not None and ref.size == len(big)
    assert canonical(stub) == f"s3://{bucket}/runs/exp/a.pt" and local(canonical(stub)) == str(stub)
    assert canonical("/elsewhere/x.pt") == "/elsewhere/x.pt"
    ino = st.st_ino
    again = m.refresh()  # unchanged objects are left alone
    assert not again and os.stat(stub).st_ino == ino


def test_an_overwrite_changes_the_identity_and_a_reader_notices(s3: S3Endpoint, tmp_path: Path) -> None:
    bucket = s3.bucket()
    first, second = os.urandom(2 * MiB), os.urandom(2 * MiB)  # same size
    _put(s3, bucket, "runs/exp/last.ckpt", first)
    m = _mirror(tmp_path, bucket)
    m.refresh()
    stub = m.root / "exp/last.ckpt"
    before = os.stat(stub)
    source = ObjectSource(stub, lookup(stub))
    assert source.read(0, 16) == first[:16]
    _put(s3, bucket, "runs/exp/last.ckpt", second)  # within the same second, most likely: the ETag decides
    assert source.changed() is not None
    with pytest.raises(CheckpointChangedError):
        source.verify_unchanged()
    change = m.refresh()
    after = os.stat(stub)
    assert change.changed == (stub,)
    assert (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns)
    # the same second and size, another ETag: another identity, deterministically (every daemon agrees)
    when = time.time()
    assert identity_mtime_ns(when, "etag-a") != identity_mtime_ns(when, "etag-b")
    assert identity_mtime_ns(when, "etag-a") == identity_mtime_ns(when, "etag-a")
    assert ObjectSource(stub, lookup(stub)).read(100, 8) == second[100:108]


def test_deleted_objects_lose_their_stubs(s3: S3Endpoint, tmp_path: Path) -> None:
    bucket = s3.bucket()
    _put(s3, bucket, "runs/exp/a.pt", os.urandom(2 * MiB))
    _put(s3, bucket, "runs/gone/b.pt", os.urandom(2 * MiB))
    m = _mirror(tmp_path, bucket)
    m.refresh()
    s3.client().delete_object(Bucket=bucket, Key="runs/gone/b.pt")
    change = m.refresh()
    assert change.removed == (m.root / "gone/b.pt",)
    assert not (m.root / "gone").exists() and lookup(m.root / "gone/b.pt") is None
    assert (m.root / "exp/a.pt").exists()


def test_hostile_keys_are_skipped_once_and_nothing_escapes_the_mirror(s3: S3Endpoint, tmp_path: Path) -> None:
    bucket = s3.bucket()
    hostile = ["runs/../escaped.pt", "runs/exp/../../up.pt", "runs/exp//double.pt", "runs/" + "n" * 300 + ".pt",
               "runs/exp/.ckptd-tmp-x", "runs/exp/clash", "runs/exp/clash/inner.pt"]
    for key in hostile:
        _put(s3, bucket, key, b"x")
    _put(s3, bucket, "runs/exp/ok.pt", b"fine")
    log = Log()
    m = _mirror(tmp_path, bucket, log)
    m.refresh()
    m.refresh()
    skipped = [kw["key"] for event, kw in log.events if event == "mirror.skipped"]
    assert len(skipped) == 6 and len(set(skipped)) == 6  # each once, over two listings
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["state/mirror/w/exp/clash/inner.pt", "state/mirror/w/exp/ok.pt"]


# --- reads --------------------------------------------------------------------------------------------------
def _header_bytes(data: bytes) -> int:
    """What any reader of the model must fetch besides tensor bytes: the zip's central directory and end
    records, ``data.pkl``, ``byteorder``, and each storage record's local header."""
    zf = zipfile.ZipFile(io.BytesIO(data))
    infos = zf.infolist()
    directory = len(data) - zf.start_dir
    local_headers = sum(30 + len(i.filename) for i in infos)
    small = sum(i.file_size for i in infos if "/data/" not in i.filename)
    return directory + local_headers + small


def test_ranged_reads_fetch_only_the_model_of_a_training_state(s3: S3Endpoint, tmp_path: Path) -> None:
    bucket = s3.bucket()
    data, state = _training_state(1, 0.5, width=384, depth=4)
    _put(s3, bucket, "runs/exp/epoch1.pt", data)
    m = _mirror(tmp_path, bucket)
    m.refresh()
    STATS.reset()
    with read_checkpoint(m.root / "exp/epoch1.pt") as reader:
        found = reader.weights()
        assert reader.obj["metric"] == 0.5
    for name, tensor in state.items():
        assert torch.equal(found.state[name], tensor)
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    budget = model_bytes + _header_bytes(data)
    assert model_bytes * 2.9 < len(data)  # the optimizer state really is there (2x the parameters)
    assert STATS.bytes <= 1.05 * budget, (STATS.bytes, budget, len(data))
    # at most one request per record (headers, fetched concurrently in one batch) plus one per model tensor
    assert STATS.gets <= len(zipfile.ZipFile(io.BytesIO(data)).infolist()) + len(state) + 4


def test_hf_folder_reads_the_weights_file_only(s3: S3Endpoint, tmp_path: Path) -> None:
    from safetensors.torch import save as save_safetensors

    bucket = s3.bucket()
    state = _model(3).state_dict()
    weights = save_safetensors({k: v.contiguous() for k, v in state.items()})
    _put(s3, bucket, "runs/exp/checkpoint-10/model.safetensors", weights)
    _put(s3, bucket, "runs/exp/checkpoint-10/optimizer.pt", os.urandom(4 * MiB))
    _put(s3, bucket, "runs/exp/checkpoint-10/trainer_state.json", json.dumps({"global_step": 10}).encode())
    m = _mirror(tmp_path, bucket)
    m.refresh()
    STATS.reset()
    with read_checkpoint(m.root / "exp/checkpoint-10") as reader:
        found = reader.weights()
    assert all(torch.equal(found.state[k], v) for k, v in state.items())
    assert STATS.bytes <= len(weights) * 1.01  # optimizer.pt: never fetched


def test_dcp_folder_on_s3_is_committed_and_read_through_the_store(s3: S3Endpoint, tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from ckptd.daemon.discovery import checkpoint_folder_kind, observe_folder

    bucket = s3.bucket()
    model = _model(4, width=256, depth=4)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 256)).sum().backward()
    opt.step()
    folder = tmp_path / "dcp"
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=str(folder), no_dist=True)
    for f in sorted(folder.iterdir(), key=lambda f: f.name == ".metadata"):  # .metadata last, as DCP writes it
        _put(s3, bucket, f"runs/exp/step-10/{f.name}", f.read_bytes())
    m = _mirror(tmp_path, bucket)
    m.refresh()
    stub_folder = m.root / "exp/step-10"
    assert checkpoint_folder_kind(stub_folder) == "dcp"
    obs = observe_folder(stub_folder, "dcp")  # LastModified has whole seconds: the marker's second is not older
    assert obs is not None and obs.commit_ok
    STATS.reset()
    with read_checkpoint(stub_folder) as reader:
        found = reader.weights(key="model")
    assert all(torch.equal(found.state[k], v) for k, v in model.state_dict().items())
    folder_bytes = sum(f.stat().st_size for f in folder.iterdir())
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert STATS.bytes < 1.1 * model_bytes + 64 * 1024, (STATS.bytes, model_bytes, folder_bytes)  # no optimizer


def test_a_commit_success_marker_is_the_commit(tmp_path: Path) -> None:
    from ckptd.daemon.discovery import observe_folder

    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x")
    marker = folder / "commit_success.txt"
    marker.write_text("ok")
    os.utime(marker, ns=(1, 10**9))  # older than the data: a reused folder being rewritten
    assert not observe_folder(folder, "hf").commit_ok  # type: ignore[union-attr]
    marker.write_text("ok")  # written after the data: committed (even without trainer_state.json)
    assert observe_folder(folder, "hf").commit_ok  # type: ignore[union-attr]


# --- config -------------------------------------------------------------------------------------------------
def test_config_of_an_object_store_root_is_checked_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: any network use would fail
    base = {"state_dir": str(tmp_path / "state"),
            "watches": [{"name": "w", "root": "s3://bucket-x/runs", "output": str(tmp_path / "out/{run}"),
                         "events": {"sqs": "http://127.0.0.1:9/123/q"}, "storage_options": {"secret": "hunter2"}}]}
    watch = parse_config(base).watches[0]
    assert watch.root == tmp_path / "state/mirror/w" and watch.mode == "poll" and watch.remote == "s3://bucket-x/runs"
    assert watch.sqs_queue == "http://127.0.0.1:9/123/q" and "hunter2" not in repr(watch)
    problems = {"mode": "events"}, {"root": str(tmp_path), "events": {"sqs": "http://q"}}, {"root": "s3://"}
    for bad in problems:
        with pytest.raises(ConfigError) as err:
            parse_config({**base, "watches": [{**base["watches"][0], **bad}]}, check_paths=False)
        assert "hunter2" not in str(err.value.problems)


def test_sqs_bodies_are_parsed_and_garbage_is_refused() -> None:
    record = {"Records": [{"eventName": "ObjectCreated:Put",
                           "s3": {"bucket": {"name": "b"}, "object": {"key": "runs/exp/a+b%2B.pt"}}}]}
    assert object_urls(json.dumps(record)) == ["s3://b/runs/exp/a b+.pt"]
    assert object_urls(json.dumps({"Type": "Notification", "Message": json.dumps(record)})) == [
        "s3://b/runs/exp/a b+.pt"]
    assert object_urls(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent"})) == []
    for garbage in ("not json", "[]", json.dumps({"Records": [{"nope": 1}]})):
        with pytest.raises((ValueError, KeyError, TypeError)):
            object_urls(garbage)


# --- the daemon -----------------------------------------------------------------------------------------------
def _once(config: Path) -> list[dict[str, Any]]:
    from ckptd.daemon.service import Daemon

    with capture_logs() as logs:
        assert Daemon(load_config(config), config, once=True).run_once() == 0
    return logs


@pytest.mark.slow
def test_daemon_on_an_s3_root_publishes_what_it_publishes_on_a_local_root(s3: S3Endpoint, tmp_path: Path) -> None:
    bucket = s3.bucket()
    metrics = (0.2, 0.7, 0.5, 0.6)
    checkpoints = {f"epoch{i}.pt": _training_state(i, metric, width=192)[0] for i, metric in enumerate(metrics)}
    local_base, remote_base = tmp_path / "local", tmp_path / "remote"
    for base in (local_base, remote_base):
        base.mkdir()
    local_cfg = write_config(local_base, watch={"mode": "poll"})
    for name, data in checkpoints.items():
        (local_base / "train/exp").mkdir(parents=True, exist_ok=True)
        (local_base / "train/exp" / name).write_bytes(data)
        _put(s3, bucket, f"runs/exp/{name}", data)
    remote_cfg = write_config(remote_base, watch={"root": f"s3://{bucket}/runs", "mode": "poll"})
    _once(local_cfg)
    STATS.reset()
    events = _once(remote_cfg)
    decided = {e["checkpoint"] for e in events if e["event"] in ("checkpoint.joined", "checkpoint.skipped")}
    assert f"s3://{bucket}/runs/exp/epoch1.pt" in decided and decided <= {
        f"s3://{bucket}/runs/exp/{n}" for n in checkpoints}  # logged by object URL (the order may differ: the
    # objects share one LastModified second, so the local processing order need not be the upload order)
    assert STATS.bytes < 0.5 * sum(len(d) for d in checkpoints.values())  # model bytes only, not the optimizer
    for name in ("best.safetensors", "average.safetensors"):
        here, there = load_file(local_base / "out/w/exp" / name), load_file(remote_base / "out/w/exp" / name)
        assert here.keys() == there.keys() and all(torch.equal(here[k], there[k]) for k in here)
    manifest = json.loads((remote_base / "out/w/exp/manifest.json").read_text())
    local_manifest = json.loads((local_base / "out/w/exp/manifest.json").read_text())
    members, local_members = manifest["average"]["members"], local_manifest["average"]["members"]
    assert [(m["metric"], m["sha256"]) for m in members] == [(m["metric"], m["sha256"]) for m in local_members]
    assert all(m["source"].startswith(f"s3://{bucket}/runs/exp/") for m in members)
    db = sqlite3.connect(remote_base / "state/ledger.sqlite3")
    paths = {p for (p,) in db.execute("SELECT path FROM checkpoints")}
    assert paths == {f"s3://{bucket}/runs/exp/{n}" for n in checkpoints}  # canonical: not this daemon's mirror
    again = _once(remote_cfg)  # a second daemon pass: the mirror is reused, nothing is processed again
    assert not [e for e in again if e["event"].startswith("checkpoint.")]


@pytest.mark.slow
def test_an_sqs_notification_makes_the_daemon_list_at_once(s3: S3Endpoint, tmp_path: Path) -> None:
    bucket = s3.bucket()
    queue = s3.queue_with_notifications(bucket)
    config = write_config(tmp_path, watch={"root": f"s3://{bucket}/runs", "mode": "poll", "poll_interval": "60s",
                                           "settle": "1s", "events": {"sqs": queue}},
                          extra={"rescan_interval": "60s"})
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        time.sleep(0.5)  # the first listing is done (daemon.ready); the next is 60 s away
        started = time.monotonic()
        _put(s3, bucket, "runs/exp/epoch1.pt", _training_state(1, 0.4, width=192)[0])
        daemon.wait_for(daemon.processed(f"s3://{bucket}/runs/exp/epoch1.pt"), 15, "the notified checkpoint")
        elapsed = time.monotonic() - started
        assert elapsed < 10, elapsed
        assert any(e["event"] == "watch.sqs_hints" for e in daemon.events())
    finally:
        assert daemon.stop() == 0
