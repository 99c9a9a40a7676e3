"""Config of object-store roots and outputs (issue 11 review): credentials never in a URL (nor echoed), outputs
the daemon would read back as checkpoints, two watches sharing one output, ``retain_grace``. Offline: nothing is
listed, no store is needed (``ckptd check`` runs as a real subprocess once)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ckptd.daemon.config import Config, parse_config
from ckptd.errors import ConfigError
from ckptd.remote.urls import has_userinfo, overlap, redact, scrub, static_prefix, under
from ckptd.remote.watch_config import output_mirror_dir, output_prefixes
from tests.conftest import PYTHON, subprocess_env

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"  # an AWS secret key has '/' and '+'
CREDENTIAL_URLS = [f"s3://AKIAFAKE:{SECRET}@bucket/x", "s3://AKIAFAKE:SuperSecretXYZ123@bucket/x",
                   "s3://AKIAFAKE:123/456@bucket/x", "gs://token@bucket/x"]


def _parse(tmp_path: Path, *watches: dict[str, Any]) -> Config:
    (tmp_path / "train").mkdir(exist_ok=True)
    full = [{"name": f"w{i}", "root": str(tmp_path / "train"), **w} for i, w in enumerate(watches)]
    return parse_config({"state_dir": str(tmp_path / "state"), "watches": full}, check_paths=False)


def _problems(tmp_path: Path, *watches: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        _parse(tmp_path, *watches)
    return info.value.problems


@pytest.mark.parametrize("url", CREDENTIAL_URLS)
def test_user_info_in_any_object_store_url_is_refused_without_echoing_it(tmp_path: Path, url: str) -> None:
    for watch, key in (({"root": url, "output": str(tmp_path / "out/{run}")}, "watches[0].root"),
                       ({"output": url + "/{run}"}, "watches[0].output")):
        problems = _problems(tmp_path, watch)
        (mine,) = [p for p in problems if p.startswith(f"{key}: carries user info")]
        assert "environment, a profile or storage_options" in mine
        text = "\n".join(problems)
        assert "AKIAFAKE" not in text and "K7MDENG" not in text and "Secret" not in text and "token" not in text


def test_redact_never_raises_and_never_shows_a_secret() -> None:
    for url in [*CREDENTIAL_URLS, "s3://b:notaport/x", "postgresql://u:pw@host:99999999/db", "s3://[::1/x"]:
        shown = redact(url)
        assert "AKIAFAKE" not in shown and "K7MDENG" not in shown and "pw" not in shown, shown
    assert redact(f"s3://AKIAFAKE:{SECRET}@bucket/x") == "s3://<redacted>"
    assert redact("s3://K:S@bucket/x?versionId=1") == "s3://bucket/x"
    assert redact("s3://bucket/user@example/run") == "s3://bucket/user@example/run"  # '@' in a key is not user info
    assert has_userinfo(f"s3://AKIAFAKE:{SECRET}@bucket/x") and not has_userinfo("s3://bucket/a@b")


def test_scrub_removes_user_info_from_error_messages() -> None:
    text = (f"Could not connect to the endpoint URL: 'http://AKIAFAKE:{SECRET}@127.0.0.1:9000/b/k' (s3://b/a@b); "
            "https://tok@host/x")
    out = scrub(text)
    assert "AKIAFAKE" not in out and "K7MDENG" not in out and "tok@" not in out
    assert "'http://<redacted>@127.0.0.1:9000/b/k'" in out and "(s3://b/a@b)" in out


def test_check_with_a_secret_holding_a_slash_reports_the_key_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "watches": [
        {"name": "w", "root": f"s3://AKIAFAKE:{SECRET}@bucket/x", "output": str(tmp_path / "out/{run}")}]}))
    res = subprocess.run([PYTHON, "-m", "ckptd.cli", "check", "-c", str(config)], capture_output=True, text=True,
                         env=subprocess_env(), timeout=60)
    text = res.stdout + res.stderr
    assert res.returncode != 0 and "Traceback" not in text and "watches[0].root: carries user info" in text, text
    assert "K7MDENG" not in text and "wJalr" not in text and "AKIAFAKE" not in text


@pytest.mark.parametrize("output", ["s3://b/train/out/{run}", "s3://b/{run}", "s3://b/train{run}",
                                    "s3://B/train/{watch}/{run}", "s3a://b/tr{run}"])
def test_an_output_overlapping_an_object_store_root_is_refused(tmp_path: Path, output: str) -> None:
    problems = _problems(tmp_path, {"root": "s3://b/train", "output": output})
    assert [p for p in problems if p.startswith("watches[0].output: overlaps its object-store root")], problems


def test_an_output_in_another_watchs_root_is_refused_and_allow_output_in_root_skips_runs(tmp_path: Path) -> None:
    problems = _problems(tmp_path, {"root": "s3://b/t1", "output": "s3://b/shared/{watch}/{run}"},
                         {"root": "s3://b/shared", "output": "s3://b/o2/{watch}/{run}"})
    assert problems == [p for p in problems if "watches[0].output: overlaps the object-store root of watches[1]" in p]
    for output in ("s3://b/train-out/{run}", "s3://c/train/{run}", "s3://b/out/{run}"):  # beside the root: fine
        _parse(tmp_path, {"root": "s3://b/train", "output": output})
    cfg = _parse(tmp_path, {"root": "s3://b/train", "output": "s3://b/train/out/{watch}/{run}",
                            "allow_output_in_root": True})
    prefixes = output_prefixes(cfg.watches)
    assert prefixes == ("s3://b/train/out/w0/",)
    assert any(under("s3://b/train/out/w0", p) for p in prefixes)  # a run named after the output dir: skipped
    assert not any(under("s3://b/train/r1", p) for p in prefixes)
    assert under("s3a://B/train/out/w0/exp", static_prefix("s3://b/train/out/{watch}/{run}", "w0"))
    assert overlap("s3://b/x", "s3://b/") and not overlap("s3://b/x/", "s3://b/y/")
    assert output_mirror_dir(cfg.watches[0]) == tmp_path / "state/mirror/w0/out/w0"  # never scanned as a run's
    cfg = _parse(tmp_path, {"root": "s3://b/train", "runs": ".", "output": "s3://b/train/out",
                            "allow_output_in_root": True})
    assert output_mirror_dir(cfg.watches[0]) == tmp_path / "state/mirror/w0/out"


@pytest.mark.parametrize("kind", ["remote", "local"])
def test_two_watches_that_can_resolve_to_one_output_are_refused(tmp_path: Path, kind: str) -> None:
    base = "s3://b/out" if kind == "remote" else str(tmp_path / "out")
    (tmp_path / "train2").mkdir()
    other = {"root": str(tmp_path / "train2")}
    problems = _problems(tmp_path, {"output": base + "/{run}"}, {**other, "output": base + "/{run}"})
    assert problems == ["watches[1].output: can resolve to the same outputs as watches[0] (w0): their publications "
                        "would replace each other's; put {watch} in the template or use another prefix"]
    problems = _problems(tmp_path, {"output": base + "/{run}"}, {**other, "output": base + "/x-{run}"})
    assert len(problems) == 1  # run "x-a" of w0 is run "a" of w1
    _parse(tmp_path, {"output": base + "/{watch}/{run}"}, {**other, "output": base + "/{watch}/{run}"})
    _parse(tmp_path, {"output": base + "/a/{run}"}, {**other, "output": base + "/b/{run}"})


def test_retain_grace_is_for_object_store_outputs(tmp_path: Path) -> None:
    cfg = _parse(tmp_path, {"output": "s3://b/out/{run}", "retain_grace": "5m"}, {"output": "s3://b/o2/{run}"})
    assert [w.retain_grace for w in cfg.watches] == [300.0, 60.0]
    problems = _problems(tmp_path, {"output": str(tmp_path / "out/{run}"), "retain_grace": "5m"},
                         {"output": "s3://b/o3/{run}", "retain_grace": "-1s"})
    assert problems[0].startswith("watches[0].retain_grace: is only for an object-store output")
    assert problems[1].startswith("watches[1].retain_grace:"), problems
