"""Config fuzzing (issue 9): whatever the YAML, validation never raises anything but ConfigError, and every
problem it reports carries a key path. In-process through ckptd.daemon.config (parse_config/load_config), plus a
few real ``ckptd check`` runs for the exit code and the absence of tracebacks."""

from __future__ import annotations

import copy
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptd.daemon.config import Config, load_config, parse_config
from ckptd.errors import ConfigError
from tests.conftest import PYTHON, REPO, subprocess_env

EXAMPLE = REPO / "config.example.yaml"
# CI: a fixed, reproducible set of examples and no example database in the working tree. For a deeper local
# search: CKPTD_FUZZ_EXAMPLES=5000 CKPTD_FUZZ_RANDOM=1 python -m pytest tests/test_config_fuzz.py
FUZZ = settings(max_examples=int(os.environ.get("CKPTD_FUZZ_EXAMPLES", "100")), deadline=None, database=None,
                derandomize=not os.environ.get("CKPTD_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# a problem is "<key path>: <message>" (a non-empty path), or a YAML syntax error with its position
PROBLEM = re.compile(r"^(?P<path>.+?): \S|^line \d+, column \d+: ", re.DOTALL)

KEYS = ["state_dir", "log", "format", "level", "watches", "name", "root", "runs", "include", "exclude", "mode",
        "poll_interval", "settle", "output", "policy", "max_depth", "allow_output_in_root", "policies", "default",
        "weights", "key", "strip_prefixes", "prefer_ema", "allow_globals", "metric", "sources", "filename",
        "checkpoint", "sidecar", "trainer_state", "step", "average", "top_k", "min_members", "dtype", "model_only",
        "formats", "export", "coreml", "enabled", "factory", "inputs", "shape", "timeout", "keep", "hooks",
        "on_new_best", "retention", "keep_last", "min_age", "metrics", "listen", "textfile", "rescan_interval",
        "shutdown_deadline", "max_parallel_runs"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["30s", "10m", "-1s", "1e400", "2GiB", "*", ".", "{run}",
                                                           "(?P<metric>[0-9.]+)", "(", "../..", "/", "~"]))
yamlish = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6), st.integers()),
                                            inner, max_size=5)),
    max_leaves=30,
)


ROOT_NOT_A_MAPPING = re.compile(r"^: expected a mapping")  # has its own test below


def assert_key_paths(problems: list[str]) -> None:
    assert problems and all(isinstance(p, str) for p in problems), problems
    for p in problems:
        assert PROBLEM.match(p) or ROOT_NOT_A_MAPPING.match(p), f"problem without a key path: {p!r}"


def check_outcome(data: Any) -> Config | None:
    """parse_config's contract: a Config, or ConfigError listing every problem with its key path."""
    try:
        return parse_config(data, "<fuzz>")
    except ConfigError as exc:
        assert_key_paths(exc.problems)
        return None


def example_tree(tmp: Path) -> dict[str, Any]:
    """config.example.yaml made valid on this machine (its paths point at a real temp root)."""
    data = yaml.safe_load(EXAMPLE.read_text())
    (tmp / "train").mkdir(exist_ok=True)
    data["state_dir"] = str(tmp / "state")
    data["watches"][0]["root"] = str(tmp / "train")
    data["watches"][0]["output"] = str(tmp / "out/{watch}/{run}")
    return data


def node_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += node_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += node_paths(v, (*prefix, i))
    return out


def mutate(tree: dict[str, Any], path: tuple, op: str, value: Any) -> dict[str, Any]:
    tree = copy.deepcopy(tree)
    if not path:
        return value if op == "replace" else tree
    parent = tree
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    if op == "delete":
        del parent[last]
    elif op == "replace":
        parent[last] = value
    elif op == "unknown_key":
        target = parent[last]
        if isinstance(target, dict):
            target["no_such_key"] = value
        else:
            parent[last] = {"no_such_key": value}
    elif op == "retype":
        old = parent[last]
        parent[last] = [old] if not isinstance(old, list) else {"x": old}
    return tree


def test_example_config_made_local_is_valid(tmp_path: Path) -> None:
    assert isinstance(parse_config(example_tree(tmp_path)), Config)


@FUZZ
@given(data=st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6), st.integers()), yamlish,
                            max_size=8))
def test_random_trees_never_raise_anything_but_config_error(data: Any) -> None:
    check_outcome(data)


def test_a_top_level_that_is_not_a_mapping_is_a_problem_with_a_name() -> None:
    """The root has no key path of its own: the problem must still say where (not ': expected a mapping')."""
    for data in ([], ["a"], 5, "text", 1.5, True):
        with pytest.raises(ConfigError) as err:
            parse_config(data, "<fuzz>")
        for p in err.value.problems:
            assert PROBLEM.match(p), f"problem without a key path for a top level of {data!r}: {p!r}"


@FUZZ
@given(data=st.dictionaries(st.sampled_from(["state_dir", "log", "watches", "policies", "metrics",
                                             "max_parallel_runs", "rescan_interval"]), yamlish, max_size=6))
def test_random_top_level_sections(data: dict[str, Any]) -> None:
    check_outcome(data)


@FUZZ
@given(choice=st.data())
def test_mutations_of_the_example_config(tmp_path: Path, choice: st.DataObject) -> None:
    base = example_tree(tmp_path)
    tree = base
    for _ in range(choice.draw(st.integers(1, 3), label="mutations")):
        paths = node_paths(tree)
        path = choice.draw(st.sampled_from(paths), label="path")
        op = choice.draw(st.sampled_from(["delete", "replace", "unknown_key", "retype"]), label="op")
        tree = mutate(tree, path, op, choice.draw(yamlish, label="value"))
    result = check_outcome(tree)
    if result is None:
        return
    # a config that validates must be usable: every watch has its policy
    for watch in result.watches:
        assert result.policy_for(watch) is not None


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                      st.builds(lambda t: yaml.safe_dump(t), yamlish)))
def test_random_files_through_load_config(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        load_config(path)
    except ConfigError as exc:
        assert_key_paths(exc.problems)


BAD_CONFIGS = {
    "unknown key": "state_dir: /tmp/x\nwatches: []\nbogus: 1\n",
    "wrong types": "state_dir: 5\nwatches: [{name: w, root: 7, output: [1]}]\npolicies: {default: {average: "
                   "{top_k: zero}}}\n",
    "invalid yaml": "state_dir: [unclosed\n",
    "empty file": "",
    "top-level list": "- a\n- b\n",
    "binary garbage": "\x00\x01\x02\xff\xfe",
    "alias bomb": "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                  "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
                  "watches: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_ckptd_check_exits_2_with_key_paths_and_no_traceback(tmp_path: Path, name: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_CONFIGS[name], encoding="utf-8", errors="surrogateescape")
    res = subprocess.run([PYTHON, "-m", "ckptd.cli", "check", "-c", str(path)], capture_output=True, text=True,
                         env=subprocess_env(), timeout=120)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    problems = [ln.strip()[2:] for ln in (res.stderr + res.stdout).splitlines() if ln.strip().startswith("- ")]
    assert problems, res.stderr
    if name != "top-level list":  # the root's own problem is checked by the test above
        assert_key_paths(problems)


@pytest.mark.slow
def test_ckptd_check_on_a_missing_config_exits_2(tmp_path: Path) -> None:
    res = subprocess.run([PYTHON, "-m", "ckptd.cli", "check", "-c", str(tmp_path / "nope.yaml")],
                         capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
