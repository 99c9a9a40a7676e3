"""Object-store outputs (``output: s3://…``): content-addressed objects first, the manifest last.

Real components: moto's S3 server on 127.0.0.1 (``tests/s3_server.py``), the real daemon (``ckptd run`` in a
subprocess; ``ckptd once`` in-process where a fault is injected), the real CoreML export. The only fake is the
injected upload failure, said where it is done.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_safetensors

from ckptd.daemon.config import load_config
from ckptd.daemon.publish import current_dir
from ckptd.examples import TinyConvNet
from ckptd.remote.object_outputs import (
    MANIFEST_SOURCE,
    ObjectPublisher,
    RemoteOutputError,
    Staged,
    StagedFile,
    StagedPackage,
    list_objects,
    local_manifest_sha256,
    plan_publication,
    read_manifest,
)
from ckptd.remote.urls import filesystem
from tests.daemon_helpers import DaemonProcess, atomic_save, make_run, write_config
from tests.s3_server import S3Endpoint


class _Log:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


# --- the plan, without a store ---------------------------------------------------------------------------------------
def _file(name: str, sha: str, size: int = 10) -> StagedFile:
    return StagedFile(name, Path("/staging") / name, size, sha * 64)


def _staged(files: list[StagedFile], package: StagedPackage | None = None, sha: str = "m") -> Staged:
    best, members = files[0], files[1:]
    manifest = {"best": {"path": best.name, "member_path": members[0].name},
                "top_k_members": [{"path": m.name} for m in members],
                "average": {"path": None, "members": []}}
    if package is not None:
        manifest["coreml"] = {"status": "ok", "path": "best.mlpackage", "version": f"coreml/{package.version}"}
    return Staged(manifest, sha * 64, tuple(files), package.version if package else None, package)


def test_plan_uploads_what_is_missing_and_deletes_only_what_neither_manifest_names() -> None:
    a, b, c = _file("members/a.safetensors", "a"), _file("members/b.safetensors", "b"), _file("members/c.safetensors",
                                                                                            "c")
    first = plan_publication(_staged([_file("best.safetensors", "a"), a]), {}, None)
    assert [k for k, _ in first.uploads] == [a.key]  # best is a hard link of member a: one object
    assert first.write_manifest and first.deletes == ()
    assert first.manifest["best"]["path"] == a.key and first.manifest["files"]["best.safetensors"] == a.key
    second = plan_publication(_staged([_file("best.safetensors", "b"), b, a], sha="n"), {a.key: 10}, first.manifest)
    assert [k for k, _ in second.uploads] == [b.key] and second.deletes == ()
    # c replaces a and b: a and b stay one publication longer (a reader of the previous manifest finishes)
    listing = {a.key: 10, b.key: 10, "objects/stray.safetensors": 3}
    third = plan_publication(_staged([_file("best.safetensors", "c"), c], sha="o"), listing, second.manifest)
    assert third.manifest["retained"] == sorted([a.key, b.key])
    assert third.deletes == ("objects/stray.safetensors",)
    fourth = plan_publication(_staged([_file("best.safetensors", "c"), c], sha="p"), {**listing, c.key: 10},
                              third.manifest)
    assert set(fourth.deletes) == {a.key, b.key, "objects/stray.safetensors"} and not fourth.uploads


def test_plan_of_the_same_state_twice_uploads_nothing() -> None:
    pkg = StagedPackage("best-v0001-abc.mlpackage", (("Manifest.json", Path("/p/Manifest.json"), 5),
                                                    ("Data/model.mlmodel", Path("/p/Data/model.mlmodel"), 7)))
    staged = _staged([_file("best.safetensors", "a"), _file("members/a.safetensors", "a")], pkg)
    first = plan_publication(staged, {}, None)
    assert first.manifest["coreml"]["path"] == "coreml/best-v0001-abc.mlpackage"
    prefix = "coreml/best-v0001-abc.mlpackage"
    assert {k for k, _ in first.uploads} == {_file("x.safetensors", "a").key, f"{prefix}/Manifest.json",
                                             f"{prefix}/Data/model.mlmodel"}
    listing = {k: 1 for k, _ in first.uploads} | {_file("x.safetensors", "a").key: 10}
    again = plan_publication(staged, listing, first.manifest)
    assert not again.uploads and not again.write_manifest and not again.deletes


# --- the publisher against a real S3 ----------------------------------------------------------------------------------
def _stage(out: Path, seed: int, manifest_extra: dict[str, Any] | None = None) -> None:
    """A local committed generation as the daemon writes it (members outside, best linked into the generation)."""
    from safetensors.torch import save_file

    from ckptd.daemon.publish import Generation

    torch.manual_seed(seed)
    member = out / "members" / f"m{seed}.safetensors"
    member.parent.mkdir(parents=True, exist_ok=True)
    save_file(TinyConvNet().state_dict(), str(member))
    with Generation(out) as gen:
        gen.link("best.safetensors", member)
        manifest = {"best": {"path": "best.safetensors", "member_path": f"members/m{seed}.safetensors"},
                    "top_k_members": [{"path": f"members/m{seed}.safetensors"}], "average": None, "seed": seed,
                    **(manifest_extra or {})}
        gen.write_text("manifest.json", json.dumps(manifest))
        gen.commit()


def test_failed_upload_keeps_the_previous_manifest_valid_and_the_retry_uploads_only_the_rest(
        s3: S3Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3.bucket()
    fs, base = filesystem(f"s3://{bucket}/out/run")
    publisher = ObjectPublisher(fs, base, _Log())
    out = tmp_path / "staging"
    _stage(out, 1)
    first = publisher.publish(out)
    assert first["committed"] and len(first["uploaded"]) == 1
    assert publisher.publish(out)["uploaded"] == [] and not publisher.publish(out)["committed"]  # idempotent
    pkg = out / "coreml" / "best-v0001-x.mlpackage"
    (pkg / "Data").mkdir(parents=True)
    (pkg / "Manifest.json").write_text("{}")
    (pkg / "Data" / "model.mlmodel").write_bytes(b"model")
    _stage(out, 2, {"coreml": {"status": "ok", "path": "best.mlpackage", "version": "coreml/best-v0001-x.mlpackage"}})
    before = fs.cat_file(f"{base}/manifest.json")
    # FAULT INJECTION (the only fake here): the store refuses the second upload of this publication
    real_put = fs.put_file
    calls: list[str] = []

    def flaky_put(lpath: str, rpath: str, **kw: Any) -> Any:
        calls.append(rpath)
        if len(calls) == 2:
            raise OSError("injected: connection reset by the object store")
        return real_put(lpath, rpath, **kw)

    monkeypatch.setattr(fs, "put_file", flaky_put)
    with pytest.raises(RemoteOutputError, match="injected"):
        publisher.publish(out)
    assert fs.cat_file(f"{base}/manifest.json") == before  # the previous manifest, untouched
    old = json.loads(before)
    assert all(fs.exists(f"{base}/{k}") for k in old["objects"])
    monkeypatch.setattr(fs, "put_file", real_put)
    again = publisher.publish(out)
    assert calls[0].startswith(f"{base}/objects/")  # content-addressed objects go first; this one landed
    assert again["uploaded"] == ["coreml/best-v0001-x.mlpackage/Data/model.mlmodel",  # a package not yet committed
                                 "coreml/best-v0001-x.mlpackage/Manifest.json"]  # is uploaded whole again
    new = read_manifest(fs, base)
    assert new is not None and new[MANIFEST_SOURCE] == local_manifest_sha256(out)
    assert new["coreml"]["path"] == "coreml/best-v0001-x.mlpackage"
    assert fs.cat_file(f"{base}/coreml/best-v0001-x.mlpackage/Data/model.mlmodel") == b"model"
    assert new["retained"] == old["objects"] and set(list_objects(fs, base)) == set(new["objects"]) | set(
        old["objects"])


# --- the daemon -------------------------------------------------------------------------------------------------------
def _save(path: Path, seed: int, metric: float) -> None:
    torch.manual_seed(seed)
    atomic_save({"model_state_dict": TinyConvNet().state_dict(), "metric": metric, "iterations": seed}, path)


def _wait_synced(fs: Any, base: str, out: Path, timeout: float = 30) -> dict[str, Any]:
    """Until the remote manifest is built from the committed local one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        local = local_manifest_sha256(out)
        remote = read_manifest(fs, base)
        if local is not None and remote is not None and remote.get(MANIFEST_SOURCE) == local:
            return remote
        time.sleep(0.05)
    raise AssertionError(f"the remote manifest under {base} did not catch up with {out}")


class Reader(threading.Thread):
    """A consumer: reads the manifest, then every object it names, in a loop; records any missing object."""

    def __init__(self, s3: S3Endpoint, bucket: str, prefix: str) -> None:
        super().__init__(daemon=True)
        self.client, self.bucket, self.prefix = s3.client(), bucket, prefix
        self.stop, self.rounds = threading.Event(), 0
        self.missing: list[tuple[str, str]] = []
        self.manifests: set[str] = set()

    def run(self) -> None:
        errors = self.client.exceptions
        while not self.stop.is_set():
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/manifest.json")["Body"].read()
            except errors.NoSuchKey:
                time.sleep(0.01)
                continue
            manifest = json.loads(body)
            self.manifests.add(manifest[MANIFEST_SOURCE])
            for key in manifest["objects"]:
                try:
                    self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}")["Body"].read()
                except errors.NoSuchKey:
                    self.missing.append((manifest[MANIFEST_SOURCE], key))
            self.rounds += 1


@pytest.mark.slow
def test_daemon_publishes_to_s3_bitwise_and_a_reader_never_sees_a_mix(s3: S3Endpoint, tmp_path: Path) -> None:
    bucket = s3.bucket()
    config = write_config(tmp_path, watch={"output": f"s3://{bucket}/out/{{watch}}/{{run}}",
                                           "retain_grace": "0s"},  # one publication longer only
                          policy={"average": {"top_k": 2}})
    out = tmp_path / "state/staging/w/exp"
    fs, base = filesystem(f"s3://{bucket}/out/w/exp")
    run = make_run(tmp_path)
    reader = Reader(s3, bucket, "out/w/exp")
    reader.start()
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    manifests = []
    try:
        for i in range(4):  # every checkpoint a new best; top_k 2 evicts the oldest member from the third on
            _save(run / f"e{i}.pt", i, 0.1 * (i + 1))
            daemon.wait_for(daemon.processed(run / f"e{i}.pt"), 30, f"checkpoint e{i}")
            manifests.append(_wait_synced(fs, base, out))
    finally:
        reader.stop.set()
        reader.join()
        assert daemon.stop() == 0
    assert not reader.missing, reader.missing
    assert reader.rounds > 20 and len(reader.manifests) >= 3
    final = manifests[-1]
    current = current_dir(out)
    assert current is not None
    for name, key in final["files"].items():  # the remote objects are the staged files, bit for bit
        local = (current / name) if (current / name).is_file() else out / name
        data = fs.cat_file(f"{base}/{key}")
        assert data == local.read_bytes() and key.endswith(hashlib.sha256(data).hexdigest() + ".safetensors")
        remote_state, local_state = load_safetensors(data), load_safetensors(local.read_bytes())
        assert remote_state.keys() == local_state.keys()
        assert all(torch.equal(remote_state[k], local_state[k]) for k in local_state)
    assert final["best"]["source"] == str(run / "e3.pt") and final["best"]["path"] == final["files"][
        "best.safetensors"]
    assert final["average"]["path"] == final["files"]["average.safetensors"]
    # superseded objects: only what the manifest or the one it replaced names is left; e0 is gone
    assert set(list_objects(fs, base)) == set(final["objects"]) | set(final["retained"])
    e0 = manifests[0]["files"]["best.safetensors"]
    assert e0 not in final["objects"] and not fs.exists(f"{base}/{e0}")
    assert not any(e["event"] == "outputs.remote_failed" for e in daemon.events())


@pytest.mark.slow
def test_upload_failure_keeps_the_previous_manifest_and_the_next_job_catches_up(
        s3: S3Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptd.daemon.service import Daemon

    bucket = s3.bucket()
    config_path = write_config(tmp_path, watch={"output": f"s3://{bucket}/out/{{run}}"})
    out = tmp_path / "state/staging/w/exp"
    fs, base = filesystem(f"s3://{bucket}/out/exp")
    run = make_run(tmp_path)

    def once() -> int:
        return Daemon(load_config(config_path), config_path, once=True).run_once()

    _save(run / "a.pt", 1, 0.5)
    assert once() == 0
    published = fs.cat_file(f"{base}/manifest.json")
    _save(run / "b.pt", 2, 0.9)
    # FAULT INJECTION (the only fake here): every upload fails during this job, as when the store is unreachable
    real_put = fs.put_file  # the daemon's publisher uses this very instance (fsspec caches it per process)

    def refuse(lpath: str, rpath: str, **kw: Any) -> Any:
        raise OSError("injected: the object store refused the upload")

    monkeypatch.setattr(fs, "put_file", refuse)
    assert once() == 1  # the job failed: its run is retried
    assert fs.cat_file(f"{base}/manifest.json") == published  # still the previous state, complete
    assert all(fs.exists(f"{base}/{k}") for k in json.loads(published)["objects"])
    db = sqlite3.connect(tmp_path / "state/ledger.sqlite3")
    (error,) = db.execute("SELECT last_error FROM runs WHERE run='exp' AND stream='model'").fetchone()
    assert "injected" in error and f"s3://{bucket}/out/exp" in error
    monkeypatch.setattr(fs, "put_file", real_put)
    assert once() == 0  # nothing new to process: the job notices the remote is behind and publishes
    remote = read_manifest(fs, base)
    assert remote is not None and remote[MANIFEST_SOURCE] == local_manifest_sha256(out)
    assert remote["best"]["source"] == str(run / "b.pt")
    assert all(fs.exists(f"{base}/{k}") for k in remote["objects"])
    (error,) = db.execute("SELECT last_error FROM runs WHERE run='exp' AND stream='model'").fetchone()
    assert error is None


COREML = {"enabled": True, "factory": "ckptd.examples:build_tiny_convnet", "factory_kwargs": {"width": 8},
          "inputs": [{"name": "image", "shape": [1, 3, 8, 8]}], "outputs": ["logits"], "precision": "float32",
          "timeout": "3m", "keep": 1}


@pytest.mark.slow
def test_coreml_export_lands_under_a_versioned_prefix_named_by_the_manifest(s3: S3Endpoint, tmp_path: Path) -> None:
    from ckptd.daemon.service import Daemon

    bucket = s3.bucket()
    config_path = write_config(tmp_path, watch={"output": f"s3://{bucket}/out/{{run}}"},
                               policy={"export": {"coreml": COREML}})
    out = tmp_path / "state/staging/w/exp"
    fs, base = filesystem(f"s3://{bucket}/out/exp")
    run = make_run(tmp_path)
    _save(run / "a.pt", 1, 0.5)
    assert Daemon(load_config(config_path), config_path, once=True).run_once() == 0
    remote = _wait_synced(fs, base, out, timeout=5)
    version = Path(json.loads((current_dir(out) / "manifest.json").read_text())["coreml"]["version"]).name
    assert remote["coreml"]["status"] == "ok" and remote["coreml"]["path"] == f"coreml/{version}"
    package = out / "coreml" / version
    local_files = sorted(p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file())
    assert "Manifest.json" in local_files
    for rel in local_files:  # the whole package, bit for bit, and the manifest names every file
        assert fs.cat_file(f"{base}/coreml/{version}/{rel}") == (package / rel).read_bytes()
        assert f"coreml/{version}/{rel}" in remote["objects"]


# --- several daemons, one run: the late writer, the grace for slow readers --------------------------------------------
class _Events:
    """A structlog-like logger that keeps its events (what the daemon would log)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def bind(self, **kw: Any) -> _Events:
        return self

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.events.append((level, event, kw))

    def names(self) -> list[str]:
        return [e for _, e, _ in self.events]


def _remote_outputs(tmp_path: Path, name: str, url: str, generation: int, fence: Any, grace: str = "0s") -> Any:
    """A daemon's publisher for run ``exp`` (its own staging dir and SQLite ledger); the lease is ``fence``."""
    from types import SimpleNamespace

    from ckptd.daemon.ledger import Ledger
    from ckptd.daemon.remote_publish import RemoteOutputs
    from ckptd.units import parse_duration

    watch = SimpleNamespace(name="w", remote_output=url, storage_options={}, retain_grace=parse_duration(grace))
    ctx = SimpleNamespace(watch=watch, run="exp", stream="model", output=tmp_path / name / "staging")
    log = _Events()
    remote = RemoteOutputs(ctx, Ledger(tmp_path / name / "ledger.sqlite3"), log, threading.RLock(),  # type: ignore
                           generation=lambda: generation, fence=fence)
    return remote, ctx.output, log


def _all_named_exist(fs: Any, base: str) -> dict[str, Any]:
    manifest = read_manifest(fs, base)
    assert manifest is not None
    missing = [k for k in manifest["objects"] if not fs.exists(f"{base}/{k}")]
    assert not missing, missing
    return manifest


def _late_writer(s3: S3Endpoint, tmp_path: Path, *, stall_after_check: bool, conditional: bool = True) -> Any:
    """Daemon A publishes the run (generation 3), commits again locally and stalls in that publication (before or
    after its lease check); B takes the run over and publishes generation 6; A resumes. The lease is FAKE here (a
    variable saying who holds the run; the real one is tests/test_run_leases.py): only where A stalls matters."""
    from types import SimpleNamespace

    from ckptd.errors import LeaseLost

    bucket = s3.bucket()
    url = f"s3://{bucket}/out/exp"
    holder = ["A"]
    checks: list[str] = []

    def lease(me: str) -> Any:
        def fence() -> None:
            checks.append(me)
            if holder[0] != me:
                raise LeaseLost("w", "exp", me, holder[0])
        return fence

    def a_fence() -> None:  # A stalls (once) before or after its lease check: B takes the run over meanwhile
        if not stall_after_check and stalling:
            stalling.pop()()
        lease("A")()
        if stall_after_check and stalling:
            stalling.pop()()

    def b_takes_over() -> None:
        holder[0] = "B"
        _stage(b_out, 3)
        b.after_commit()

    stalling: list[Any] = []
    a, a_out, a_log = _remote_outputs(tmp_path, "a", url, 3, a_fence)
    b, b_out, b_log = _remote_outputs(tmp_path, "b", url, 6, lease("B"))
    _stage(a_out, 1)
    a.after_commit()
    a._get_publisher().conditional = conditional
    _stage(a_out, 2)
    stalling.append(b_takes_over)
    a.after_commit()
    fs, base = filesystem(url)
    return SimpleNamespace(a=a, b=b, a_log=a_log, b_log=b_log, fs=fs, base=base, b_out=b_out, checks=checks)


def _is_bs(t: Any) -> dict[str, Any]:
    manifest = _all_named_exist(t.fs, t.base)
    assert manifest["generation"] == 6 and manifest[MANIFEST_SOURCE] == local_manifest_sha256(t.b_out)
    return manifest


def test_a_daemon_that_lost_the_run_never_replaces_the_holders_manifest(s3: S3Endpoint, tmp_path: Path) -> None:
    from ckptd.errors import LeaseLost

    # A stalls while uploading: its lease check, right before its PUT, says the run is B's now
    t = _late_writer(s3, tmp_path / "before", stall_after_check=False)
    _is_bs(t)
    assert "outputs.remote_skipped" in t.a_log.names() and "outputs.remote_failed" not in t.a_log.names()
    with pytest.raises(LeaseLost):  # the job's end: the service lets the run go (run.lease_lost), no run error
        t.a.catch_up()
    # A stalls *after* its lease check: its conditional PUT (moto honours If-Match) finds B's manifest; A plans
    # again, sees generation 6, checks its lease again and stops
    t = _late_writer(s3, tmp_path / "after", stall_after_check=True)
    _is_bs(t)
    assert "outputs.remote_manifest_changed" in t.a_log.names() and "outputs.remote_skipped" in t.a_log.names()
    assert "outputs.remote_failed" not in t.a_log.names()
    # a store without conditional PUTs (switched off here): the late write lands; B's next job repairs it
    t = _late_writer(s3, tmp_path / "unconditional", stall_after_check=True, conditional=False)
    assert read_manifest(t.fs, t.base)["generation"] == 3  # type: ignore[index]  # A's late write, in place
    t.b.catch_up()  # one GET: not B's manifest -> B publishes again
    _is_bs(t)
    assert "outputs.remote_replaced" in t.b_log.names() and "outputs.remote_failed" not in t.b_log.names()
    t.b.catch_up()  # in place now: nothing to do
    assert t.b_log.names().count("outputs.remote_published") == 2


def test_a_store_that_refuses_conditional_puts_gets_an_unconditional_one(
        s3: S3Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import ClientError

    bucket = s3.bucket()
    fs, base = filesystem(f"s3://{bucket}/out/run")
    publisher = ObjectPublisher(fs, base, _Log())
    real_pipe = fs.pipe_file
    refused: list[dict[str, Any]] = []

    def no_conditions(path: str, data: bytes, **kw: Any) -> Any:
        # FAULT INJECTION: an S3-compatible store without conditional writes (as botocore reports it)
        if kw:
            refused.append(kw)
            raise OSError(38, "NotImplemented") from ClientError(
                {"Error": {"Code": "NotImplemented", "Message": "If-None-Match is not implemented"},
                 "ResponseMetadata": {"HTTPStatusCode": 501}}, "PutObject")
        return real_pipe(path, data)

    monkeypatch.setattr(fs, "pipe_file", no_conditions)
    out = tmp_path / "staging"
    _stage(out, 1)
    assert publisher.publish(out)["committed"] and refused == [{"IfNoneMatch": "*"}]
    _stage(out, 2)
    assert publisher.publish(out)["committed"] and len(refused) == 1  # not asked again in this process
    assert read_manifest(fs, base)[MANIFEST_SOURCE] == local_manifest_sha256(out)  # type: ignore[index]


def test_plan_keeps_superseded_objects_for_the_grace() -> None:
    a, b, c = (_file(f"members/{x}.safetensors", x) for x in "abc")
    first = plan_publication(_staged([_file("best.safetensors", "a"), a]), {}, None, now=1000.0, grace=60)
    second = plan_publication(_staged([_file("best.safetensors", "b"), b], sha="n"), {a.key: 10}, first.manifest,
                              now=1010.0, grace=60)
    assert second.fresh == (a.key,) and second.manifest["retained"] == [a.key] and not second.deletes
    listing = {a.key: 10, b.key: 10}
    third = plan_publication(_staged([_file("best.safetensors", "c"), c], sha="o"), listing, second.manifest,
                             now=1020.0, grace=60)
    # a was superseded 10 s ago: kept although the manifest that named it is two publications back
    assert third.manifest["superseded_at"] == {a.key: 1010.0, b.key: 1020.0} and not third.deletes
    listing[c.key] = 10
    fourth = plan_publication(_staged([_file("best.safetensors", "c"), c], sha="p"), listing, third.manifest,
                              now=1071.0, grace=60)
    assert fourth.deletes == (a.key,) and fourth.manifest["superseded_at"] == {b.key: 1020.0}
    # a manifest written before the record had times: its retained keys count as superseded now
    legacy = {**third.manifest, "superseded_at": None}
    again = plan_publication(_staged([_file("best.safetensors", "c"), c], sha="q"), listing, legacy,
                             now=5000.0, grace=60)
    assert not again.deletes and set(again.manifest["retained"]) == {a.key, b.key}
    # named again: no longer superseded
    back = plan_publication(_staged([_file("best.safetensors", "a"), a], sha="r"), listing, third.manifest,
                            now=1030.0, grace=60)
    assert a.key not in back.manifest["superseded_at"] and back.manifest["superseded_at"][c.key] == 1030.0


def test_a_slow_reader_finds_every_object_of_a_manifest_read_within_the_grace(s3: S3Endpoint,
                                                                              tmp_path: Path) -> None:
    bucket = s3.bucket()
    fs, base = filesystem(f"s3://{bucket}/out/run")
    clock = [1000.0]
    publisher = ObjectPublisher(fs, base, _Log(), retain_grace=60, clock=lambda: clock[0])
    out = tmp_path / "staging"
    _stage(out, 1)
    publisher.publish(out)
    read_early = read_manifest(fs, base)  # a slow reader reads this manifest, then fetches its objects later
    assert read_early is not None
    for seed in (2, 3, 4):  # three publications in 30 s: the early manifest's objects stay
        clock[0] += 10
        _stage(out, seed)
        publisher.publish(out)
    assert all(fs.exists(f"{base}/{k}") for k in read_early["objects"])
    clock[0] += 61  # the grace has passed: the next publication deletes them (once; a second delete is a no-op)
    _stage(out, 5)
    result = publisher.publish(out)
    assert set(read_early["objects"]) <= set(result["deleted"])
    assert not any(fs.exists(f"{base}/{k}") for k in read_early["objects"])
    assert publisher._delete(tuple(result["deleted"])) == result["deleted"]  # idempotent
    _all_named_exist(fs, base)


def test_failure_reasons_never_carry_a_urls_user_info(s3: S3Endpoint, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3 as sql

    bucket = s3.bucket()
    url = f"s3://{bucket}/out/exp"
    remote, out, log = _remote_outputs(tmp_path, "a", url, 1, None)
    fs, _ = filesystem(url)

    def leaky(lpath: str, rpath: str, **kw: Any) -> Any:
        # FAULT INJECTION: botocore quoting an endpoint URL with credentials in it
        raise OSError("Could not connect to the endpoint URL: 'http://AKIAX:sec/ret+KEY@127.0.0.1:1/b'")

    monkeypatch.setattr(fs, "put_file", leaky)
    _stage(out, 1)
    remote.after_commit()
    (reason,) = [kw["reason"] for level, e, kw in log.events if e == "outputs.remote_failed"]
    assert "sec/ret" not in reason and "AKIAX" not in reason and "<redacted>@127.0.0.1" in reason
    db = sql.connect(tmp_path / "a" / "ledger.sqlite3")
    assert not [r for r in db.execute("SELECT * FROM runs") if "sec/ret" in str(r)]


def test_the_generation_a_fence_returns_is_the_manifests_and_catch_up_leaves_it(s3: S3Endpoint,
                                                                                tmp_path: Path) -> None:
    bucket = s3.bucket()
    url = f"s3://{bucket}/out/exp"
    fs, base = filesystem(url)
    remote, out, log = _remote_outputs(tmp_path, "a", url, 2, lambda: 9)  # the fence bumped the run to 9
    _stage(out, 1)
    remote.after_commit()
    assert read_manifest(fs, base)["generation"] == 9  # type: ignore[index]
    remote.catch_up()  # in place (9 is what this process wrote): nothing published again
    remote.catch_up()
    assert log.names().count("outputs.remote_published") == 1 and "outputs.remote_replaced" not in log.names()
