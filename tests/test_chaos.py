"""The fault suite's CI subset (issue 9): the same harness as ``bench/chaos.py`` with small counts.

Real ``ckptd run`` processes, real torch.save writers (in subprocesses where the writer itself is part of the
fault), real SIGKILLs, a real size-limited tmpfs. The full counts: ``python bench/chaos.py``.
The first tests check the harness itself: a checker that cannot fail would make every row meaningless.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bench.chaos_data import fingerprint, model_state
from bench.chaos_disk import run_disk_full
from bench.chaos_files import run_rewrite_in_place
from bench.chaos_harness import ClassResult, Metrics
from bench.chaos_hostile import run_hostile
from bench.chaos_kill import run_kill9
from bench.chaos_ledger import run_ledger
from bench.chaos_outputs import OutputValidator, compare_outputs


def _explain(rows: list[ClassResult]) -> str:
    return "\n".join(f"{r.name}: {r.passed}/{r.trials} {'; '.join(r.notes)}" for r in rows if not r.ok)


# --- the harness can tell good from bad -----------------------------------------------------------------------
def _output_run(root: Path, best_seed: int, metric: float = 0.9) -> Path:
    run = root / "w" / "exp"
    (run / "members").mkdir(parents=True)
    src = "/train/exp/a.pt"
    md = {"source": src, "metric": repr(metric)}
    save_file(model_state(best_seed, 8, channels_last=False), str(run / "best.safetensors"), metadata=md)
    save_file(model_state(best_seed, 8, channels_last=False), str(run / "members/a-1.safetensors"), metadata=md)
    (run / "manifest.json").write_text(json.dumps({"best": {"source": src, "metric": metric, "step": 1},
                                                   "average": {"members": [{"source": src, "metric": metric,
                                                                            "path": "members/a-1.safetensors"}],
                                                               "path": None}}))
    return run


def test_compare_outputs_sees_tensor_and_manifest_differences(tmp_path: Path) -> None:
    _output_run(tmp_path / "a", 1)
    _output_run(tmp_path / "b", 1)
    assert compare_outputs(tmp_path / "a", tmp_path / "b") == []
    _output_run(tmp_path / "c", 2)  # other weights, same manifest
    assert any("differs" in d for d in compare_outputs(tmp_path / "a", tmp_path / "c"))
    _output_run(tmp_path / "d", 1, metric=0.8)
    assert any("manifest" in d for d in compare_outputs(tmp_path / "a", tmp_path / "d"))
    (tmp_path / "b/w/exp/members/a-1.safetensors").unlink()  # a member the manifest names is gone
    assert compare_outputs(tmp_path / "a", tmp_path / "b")
    assert compare_outputs(tmp_path / "a", tmp_path / "missing")


def test_output_validator_flags_partial_files_and_torn_weights(tmp_path: Path) -> None:
    run = _output_run(tmp_path, 1)
    registry = {"/train/exp/a.pt": {fingerprint(model_state(1, 8, channels_last=False))}}
    validator = OutputValidator(tmp_path, registry)
    assert validator.scan() == []
    data = (run / "average.safetensors")
    data.write_bytes((run / "best.safetensors").read_bytes()[:-10])  # a partial file under an output name
    assert any("partial" in v for v in validator.scan())
    registry["/train/exp/a.pt"] = {"something else"}  # the published weights were never written by anyone
    (run / "members/a-2.safetensors").write_bytes((run / "best.safetensors").read_bytes())
    assert any("match no version" in v for v in validator.scan())


def test_metric_bands_keep_orphans_below_final_versions() -> None:
    m = Metrics(random.Random(0))
    orphans = [m.orphan() for _ in range(50)]
    finals = [m.final() for _ in range(50)]
    assert max(orphans) < min(finals) and len(set(orphans + finals)) == 100


def test_channels_last_weights_survive_the_fingerprint() -> None:
    sd = model_state(3, 16)
    assert not sd["conv.weight"].is_contiguous()
    assert fingerprint(sd) == fingerprint({k: v.contiguous() for k, v in sd.items()})
    assert fingerprint(sd) != fingerprint(model_state(4, 16))
    assert torch.equal(model_state(3, 16)["head.weight"], sd["head.weight"])


# --- the CI subset of the fault classes ----------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_at_random_moments(tmp_path: Path) -> None:
    row = run_kill9(tmp_path, runs=2, per_run=4, kills=3, kb=256)
    assert row.ok, _explain([row])


@pytest.mark.slow
@pytest.mark.parametrize("how", ["inplace", "rplus"])
def test_rewritten_in_place_while_read(tmp_path: Path, how: str) -> None:
    row = run_rewrite_in_place(tmp_path, 6, how=how)
    assert row.ok, _explain([row])


@pytest.mark.slow
def test_disk_full_then_space_freed(tmp_path: Path) -> None:
    row = run_disk_full(tmp_path, 1, resume_timeout=30)
    if row.skipped:
        pytest.skip(row.skipped)
    assert row.ok, _explain([row])


@pytest.mark.slow
def test_each_hostile_kind_once(tmp_path: Path) -> None:
    rows = run_hostile(tmp_path, 1, batch=True)
    assert len(rows) >= 12
    assert all(r.ok for r in rows), _explain(rows)


@pytest.mark.slow
def test_ledger_corrupted_while_stopped(tmp_path: Path) -> None:
    row = run_ledger(tmp_path, 1)  # garbage bytes, with a rewritten last.pt holding two members
    assert row.ok, _explain([row])
