"""``ckptd check --explain``: a dry run. Per run and stream, each candidate with its metric and step and where each
came from, the files ignored and why, and the top-k the daemon would pick — without writing anything (no ledger,
no outputs, no temp files).

It reads what the daemon reads (the trainer plan, each candidate's object) and decides with the daemon's own pure
policy (``policy.ranked``), so what it shows is what ``ckptd run`` would do on the files present now.
Duplicates by content are not detected here (that needs each file's sha256, too costly for a dry run).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptd.daemon.config import Config, Policy, Watch, run_plan
from ckptd.daemon.discovery import list_runs, walk_run
from ckptd.daemon.paths import resolve_output, run_name
from ckptd.daemon.policy import Record, ranked
from ckptd.errors import CkptdError
from ckptd.file_checks import refusal
from ckptd.metric_sources import find_value
from ckptd.remote.display import shown_output, shown_path
from ckptd.trainers import StreamPlan, pick_weights

MAX_LISTED = 200  # ignored files listed per run (the rest are counted)


def _load(path: Path, allow_globals: tuple[str, ...]) -> tuple[Any, Mapping[str, str] | None, str]:
    """(object, safetensors metadata, error) — the same safe loader the daemon uses; never raises."""
    from ckptd.weights import load_object

    try:
        _, obj, metadata = load_object(path, allow_globals=allow_globals)
        return obj, metadata, ""
    except (CkptdError, OSError) as exc:
        return None, None, str(exc)


def explain_stream(stream: StreamPlan, candidates: list[tuple[str, Path, Any, Mapping[str, str] | None, str]],
                   policy: Policy) -> dict[str, Any]:
    """One stream: what each candidate yields and the top-k the daemon's policy would keep."""
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    records: list[Record] = []
    for rel, path, obj, metadata, error in candidates:
        if not stream.feeds(path.name):
            continue
        pick = pick_weights(stream, obj) if not error or obj is not None else None
        if pick is None and not error:
            if stream.optional:
                skipped.append({"path": rel, "reason": f"no {stream.name} weights in this file "
                                f"({', '.join(w.describe() for w in stream.weights)}): does not feed it"})
                continue
            error = f"no weights for stream {stream.name} ({', '.join(w.describe() for w in stream.weights)})"
        metric = find_value(stream.metric_sources, path, obj, metadata, "metric")
        step = find_value(stream.step_sources, path, obj, metadata, "step")
        try:
            mtime = path.stat().st_mtime
        except OSError:
            mtime = 0.0
        step_value = None if step.value is None else int(step.value)
        row = {"path": rel, "metric": metric.value, "metric_source": metric.source, "metric_where": metric.where,
               "step": step_value, "step_source": step.source,
               "step_where": step.where, "weights": pick.why if pick else None,
               "weights_key": pick.key if pick else None, "error": error or None}
        rows.append(row)
        if not error:
            records.append(Record(len(records), rel, "", metric.value, step_value, mtime))
    top = ranked(records, policy.metric.mode)[: policy.average.top_k]
    return {
        "name": stream.name, "files": list(stream.files), "weights": [w.describe() for w in stream.weights],
        "metric_sources": [s.describe() for s in stream.metric_sources],
        "step_sources": [s.describe() for s in stream.step_sources],
        "mode": policy.metric.mode, "top_k": policy.average.top_k, "candidates": rows, "not_fed": skipped,
        "unranked": [r["path"] for r in rows if r["metric"] is None and not r["error"]],
        "picked": [{"path": r.path, "metric": r.metric, "step": r.step} for r in top],
        "best": top[0].path if top else None,
        "average": len(top) >= policy.average.min_members,
    }


def explain_run(watch: Watch, policy: Policy, run_dir: Path, output: Path | None = None) -> dict[str, Any]:
    plan = run_plan(watch, policy, run_dir)
    entries = walk_run(plan, run_dir, watch.max_depth, skip=watch.output_root if watch.output else None)
    ignored: list[dict[str, str]] = []
    resume: list[dict[str, str]] = []
    loaded: list[tuple[str, Path, Any, Mapping[str, str] | None, str]] = []
    allow = tuple(dict.fromkeys((*policy.weights.allow_globals, *plan.allow_globals)))
    for rel, is_dir in entries:
        verdict = plan.classify(rel, is_dir)
        if verdict.kind == "ignored":
            ignored.append({"path": rel, "reason": verdict.reason})
        elif verdict.kind == "resume":
            resume.append({"path": rel, "reason": verdict.reason + " (recorded, not ranked)"})
        else:
            refused = refusal(run_dir / rel, watch.root)  # FIFOs, devices, symlinks out of the root: never opened
            loaded.append((rel, run_dir / rel, None, None, refused) if refused else
                          (rel, run_dir / rel, *_load(run_dir / rel, allow)))
    return {
        "watch": watch.name, "run": run_name(watch.root, run_dir), "run_dir": shown_path(watch, run_dir),
        "output": shown_output(watch, run_name(watch.root, run_dir), output) if output else None,
        "trainer": plan.trainer,
        "detected_because": plan.detected_because, "metric_where": plan.metric_where,
        "problems": list(plan.problems),
        "streams": [explain_stream(s, loaded, policy) for s in plan.streams],
        "disabled_streams": [{"name": n, "reason": why} for n, why in plan.disabled],
        "resume_states": resume, "ignored": ignored,
    }


def explain_config(config: Config) -> list[dict[str, Any]]:
    """Every run of every watch, explained. Runs whose output cannot be resolved are reported, not explained."""
    out: list[dict[str, Any]] = []
    for watch in config.watches:
        policy = config.policy_for(watch)
        if watch.remote:
            problem = _list_remote(watch)
            if problem:
                out.append({"watch": watch.name, "run_dir": shown_path(watch, watch.root), "error": problem})
                continue
        for run_dir in list_runs(watch):
            try:
                output = resolve_output(watch.output, watch.name, run_name(watch.root, run_dir))
            except CkptdError as exc:
                out.append({"watch": watch.name, "run_dir": shown_path(watch, run_dir), "error": str(exc)})
                continue
            out.append(explain_run(watch, policy, run_dir, output))
    return out


def _list_remote(watch: Watch) -> str | None:
    """An object-store watch is explained from a fresh listing (its mirror's stubs registered, so reads go to the
    store: a dry run reads checkpoints, so it needs the store, unlike plain ``ckptd check``). The reason on
    failure."""
    from ckptd.daemon.logs import get_logger
    from ckptd.remote.mirror import ObjectMirror

    try:
        ObjectMirror(watch, get_logger()).refresh()
    except Exception as exc:  # noqa: BLE001 (any store failure: reported for this watch)
        return f"cannot list {shown_path(watch, watch.root)}: {type(exc).__name__}: {exc}"
    return None


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


def render_text(runs: list[dict[str, Any]]) -> str:
    """The text view of :func:`explain_config`; every line made terminal-safe (file and run names, reasons)."""
    from ckptd.daemon.status import terminal_safe

    lines: list[str] = []
    for r in runs:
        if "error" in r:
            lines.append(f"run {r['run_dir']} ({r['watch']}): SKIPPED: {r['error']}")
            continue
        lines.append(f"run {r['watch']}/{r['run']}: {r['run_dir']}")
        lines.append(f"  trainer {r['trainer']}: {r['detected_because']}")
        lines.append(f"  metric from: {r['metric_where']}")
        lines.extend(f"  PROBLEM: {p}" for p in r["problems"])
        for s in r["streams"]:
            lines.append(f"  stream {s['name']} ← {', '.join(s['files'])} (weights {' | '.join(s['weights'])}; "
                         f"{s['mode']}, top-{s['top_k']})")
            if not s["candidates"]:
                lines.append("    no candidates yet")
            for c in s["candidates"]:
                if c["error"]:
                    lines.append(f"    {c['path']}: NOT USABLE: {c['error']}")
                    continue
                metric = (f"metric {_num(c['metric'])} from {c['metric_where']}" if c["metric"] is not None
                          else f"no metric (unranked): {c['metric_where']}")
                step = (f"step {c['step']} from {c['step_where']}" if c["step"] is not None
                        else "step - (none found; ordered by mtime)")
                lines.append(f"    {c['path']}: {metric}; {step}")
            for c in s["not_fed"]:
                lines.append(f"    {c['path']}: {c['reason']}")
            picked = ", ".join(f"{p['path']} ({_num(p['metric'])})" for p in s["picked"]) or "none"
            lines.append(f"    would keep top-{s['top_k']}: {picked}")
            if s["best"]:
                lines.append(f"    best: {s['best']}; average: " + ("yes" if s["average"] else "not yet (min_members)"))
        for d in r["disabled_streams"]:
            lines.append(f"  stream {d['name']}: off ({d['reason']})")
        if r["resume_states"]:
            lines.append("  resume states:")
            lines.extend(f"    {x['path']}: {x['reason']}" for x in r["resume_states"])
        if r["ignored"]:
            lines.append("  ignored:")
            lines.extend(f"    {x['path']}: {x['reason']}" for x in r["ignored"][:MAX_LISTED])
            if len(r["ignored"]) > MAX_LISTED:
                lines.append(f"    … {len(r['ignored']) - MAX_LISTED} more")
    return "\n".join(terminal_safe(line) for line in lines)
