"""The run's side of the evaluation gate: what the published average holds, the manifest's evaluation objects,
and applying an evaluation job's decision (publish the winner, or record why the candidate lost).

Invariant: ``average.members`` in the manifest always describes the file actually published. With an evaluated
average (``average.gate`` or ``average.strategy: greedy``) that is the gate's state in the ledger, not the top-k:
the pipeline carries the published average unchanged when the top-k changes and asks for an evaluation; only an
evaluation that wins replaces it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptd.daemon import evaluation_store as store
from ckptd.daemon.evaluation_store import GateState
from ckptd.daemon.ledger import MemberRow
from ckptd.daemon.outputs import localize
from ckptd.daemon.policy import Record
from ckptd.daemon.publish import AVERAGE
from ckptd.daemon.soup import SoupDecision, winner

if TYPE_CHECKING:
    from ckptd.daemon.pipeline import RunProcessor


def _where(proc: RunProcessor) -> tuple[str, str, str]:
    return proc.ctx.watch.name, proc.ctx.run, proc.ctx.stream


def load(proc: RunProcessor) -> GateState:
    state = store.load_gate(proc.ledger, *_where(proc))
    if not state.members:
        return state
    members = tuple(localize(m, proc.ctx.output) for m in state.members)  # another daemon's copies: ours
    return state if members == state.members else replace(state, members=members)


def decision_key(proc: RunProcessor, members: Sequence[MemberRow]) -> str:
    """What a decision was made for: the top-k set, and everything in the policy that could change the decision
    (the evaluator, the strategy, the gate, the margin, min_members). A different key means: evaluate again."""
    avg, ev = proc.ctx.policy.average, proc.ctx.policy.evaluate
    settings = f"{ev.signature()}|{avg.strategy}|{avg.gate}|{avg.margin!r}|{avg.min_members}"
    return store.evaluation_key(settings, [m.record.sha256 for m in members])


def average_members(proc: RunProcessor, members: Sequence[MemberRow], state: GateState | None = None
                    ) -> list[MemberRow]:
    """The members of the average to publish with this top-k (empty: no average yet)."""
    policy = proc.ctx.policy
    if len(members) < policy.average.min_members:
        return []
    if not policy.average.evaluated:
        return list(members)
    state = load(proc) if state is None else state
    if not (proc.ctx.output / AVERAGE).is_file() and not all(Path(m.file).is_file() for m in state.members):
        return []  # neither the published file nor its member copies are left: the next evaluation decides again
    return list(state.members)


def evaluation_blocks(proc: RunProcessor, members: Sequence[MemberRow], averaged: Sequence[MemberRow],
                      state: GateState | None = None) -> dict[str, Any] | None:
    """The manifest's ``best.evaluation`` and ``average.evaluation`` (None when the policy does not evaluate)."""
    ev = proc.ctx.policy.evaluate
    if not ev.enabled or not members:
        return None
    sig = ev.signature()

    def looked_up(subset: Sequence[MemberRow]) -> dict[str, Any]:
        row = store.cached(proc.ledger, *_where(proc), store.evaluation_key(sig, [m.record.sha256 for m in subset]))
        return {"metric": ev.metric, "mode": ev.mode, "value": row.value if row else None,
                "status": "ok" if row else "pending"}

    state = load(proc) if state is None else state
    average: dict[str, Any] | None = None
    if averaged:
        decided = state.evaluation is not None and store.set_key([m.record.sha256 for m in state.members]) == \
            store.set_key([m.record.sha256 for m in averaged])
        average = dict(state.evaluation) if decided and state.evaluation else looked_up(averaged)
        # False: the newest top-k (or a changed policy) is still being evaluated, or an evaluation failed
        average["current"] = state.topk_key == decision_key(proc, members)
    elif state.evaluation is not None and (state.evaluation.get("rejected") or state.evaluation.get("tried")):
        average = dict(state.evaluation)  # nothing published yet, but say why
        average["current"] = state.topk_key == decision_key(proc, members)
    return {"best": looked_up(members[:1]), "average": average}


def _evaluation_object(proc: RunProcessor, decision: SoupDecision, kept: Sequence[MemberRow],
                       value: float | None) -> dict[str, Any]:
    ev, avg = proc.ctx.policy.evaluate, proc.ctx.policy.average
    if value is not None:
        status = "ok"  # the published average has this evaluated value
    elif decision.rejected is not None and decision.rejected.get("value") is not None:
        status = "rejected"  # nothing published yet: the candidate lost
    else:
        status = "failed"  # nothing published yet: an evaluation failed
    obj: dict[str, Any] = {"metric": ev.metric, "mode": ev.mode, "status": status,
                           "strategy": avg.strategy, "margin": avg.margin, "value": value,
                           "best_value": decision.best_value, "tried": decision.tried,
                           "kept": [m.record.path for m in kept]}
    if decision.excluded:
        obj["excluded"] = decision.excluded
    if decision.rejected is not None:
        obj["rejected"] = decision.rejected
    return obj


def apply(proc: RunProcessor, decision: SoupDecision | None, topk_key: str | None, files: dict[str, Path],
          best_value: float | None) -> None:
    """Called by the evaluation job: publish the winning average, or keep the previous one and record why."""
    policy, ev = proc.ctx.policy, proc.ctx.policy.evaluate
    best_sha = None
    if (decision is not None and decision.failures) or (decision is None and best_value is None):
        topk_key = None  # not decided: an evaluation failed; it is retried (and after a restart)
    with proc.manifest_lock:
        if proc.retired:  # a reload replaced this run's processor (another policy): its decision is void
            proc.log.info("evaluation.superseded", action="drop", reason="the config was reloaded while the "
                          "evaluation ran; the new policy decides")
            return
        members = proc.members()
        if members:
            best_sha = members[0].record.sha256
        old = load(proc)
        if decision is None:  # no average due yet (fewer than min_members): the best's value is recorded
            state = GateState(topk_key, old.members, old.evaluation, winner(best_value, None, ev))
            store.save_gate(proc.ledger, *_where(proc), state)
            proc.write_manifest()
            _export_winner(proc, state, best_sha)
            return
        if not policy.average.evaluated:  # recorded, not gated: the pipeline published this average already
            state = GateState(topk_key, tuple(decision.kept),
                              _evaluation_object(proc, decision, decision.kept, decision.value),
                              winner(best_value, decision.value, ev))
            store.save_gate(proc.ledger, *_where(proc), state)
            proc.write_manifest()
            _export_winner(proc, state, best_sha)
            return
        if decision.publish:
            kept, value = list(decision.kept), decision.value
            if not all(Path(m.file).is_file() for m in kept):  # the top-k moved on and pruned a member's copy
                proc.log.info("evaluation.superseded", action="evaluate the newer top-k",
                              reason="a member of the winning set left the top-k while it was evaluated; its "
                                     "decision is not published")
                return
        else:
            kept = list(old.members)
            value = (old.evaluation or {}).get("value") if kept else None
        state = GateState(topk_key, tuple(kept), _evaluation_object(proc, decision, kept, value),
                          winner(best_value, value if kept else None, ev))
        new_key = store.set_key([m.record.sha256 for m in kept])
        changed = bool(kept) and new_key != store.set_key([m.record.sha256 for m in old.members])
        if changed:
            proc.publish_evaluated_average(members, state, files.get(new_key),
                                           lambda: store.save_gate(proc.ledger, *_where(proc), state))
        else:
            store.save_gate(proc.ledger, *_where(proc), state)
            proc.write_manifest()
    _report(proc, decision, kept, value, changed)
    if changed and proc.exporter is not None and policy.coreml.source == "average":
        proc.exporter.request_average(proc, kept)
    _export_winner(proc, state, best_sha)


def _report(proc: RunProcessor, decision: SoupDecision, kept: list[MemberRow], value: float | None,
            changed: bool) -> None:
    rejected = decision.rejected
    if changed:
        proc.log.info("average.published", action="publish", members=len(kept), value=value,
                      strategy=proc.ctx.policy.average.strategy, reason="it evaluated at least as well as what it "
                      "was compared against" + (f"; {rejected['reason']}" if rejected else ""))
        proc.note_evaluated_average(kept)
    elif rejected is not None:
        proc.log.warning("average.rejected", action="keep previous", value=rejected.get("value"),
                         against=rejected.get("against"), reason=rejected["reason"])
        proc.note_event("average_rejected")
    else:
        proc.note_event("evaluated")


def _export_winner(proc: RunProcessor, state: GateState, best_sha: str | None) -> None:
    """``export.coreml.source: winner``: export whichever of best and the published average evaluated better."""
    if proc.exporter is None or proc.ctx.policy.coreml.source != "winner":
        return
    members = proc.members()
    if state.winner == "average" and state.members:
        proc.exporter.request_average(proc, list(state.members))
    elif state.winner == "best" and members and members[0].record.sha256 == best_sha:
        proc.exporter.request_best(proc, members[0])


def export_decided(proc: RunProcessor) -> None:
    """Request the export the gate's state calls for (restart catch-up): the winner, or the evaluated average."""
    state, members = load(proc), proc.members()
    if proc.exporter is None or not members:
        return
    if proc.ctx.policy.coreml.source == "winner":
        _export_winner(proc, state, members[0].record.sha256)
    elif state.members:
        proc.exporter.request_average(proc, list(state.members))


def adopt_published(proc: RunProcessor) -> bool:
    """The gate has no state but an average is published: a policy that just became evaluated (``gate: true`` or
    ``greedy`` added to a running setup), or a lost ledger (rebuilt from the member copies). The published
    average stays, described by the gate as it is described by its manifest, until an evaluation decides; its
    members must still have their pinned copies and checkpoint rows (restored from those copies)."""
    from ckptd.daemon.outputs import published_manifest

    state = load(proc)
    if not proc.ctx.policy.average.evaluated or state.topk_key is not None or state.members:
        return False
    manifest = published_manifest(proc.ctx.output) or {}
    average = manifest.get("average") or {}
    if not average.get("path") or not (proc.ctx.output / AVERAGE).is_file():
        return False
    adopted: list[MemberRow] = []
    for entry in average.get("members") or []:
        file = proc.ctx.output / str(entry.get("path", ""))
        row = proc.ledger.query("SELECT id, mtime_ns FROM checkpoints WHERE watch=? AND run=? AND stream=? AND "
                                "path=? AND sha256=? ORDER BY id DESC LIMIT 1",
                                (*_where(proc), entry.get("source"), entry.get("sha256")))
        if not row or not file.is_file():
            return False  # cannot describe it exactly: the next evaluation decides from the top-k
        ckpt_id, mtime_ns = row[0]
        adopted.append(MemberRow(Record(ckpt_id, entry["source"], entry["sha256"], entry.get("metric"),
                                        entry.get("step"), mtime_ns / 1e9 if mtime_ns > 0 else file.stat().st_mtime),
                                 str(file)))
    if not adopted:
        return False
    evaluation = average.get("evaluation")
    store.save_gate(proc.ledger, *_where(proc), GateState(None, tuple(adopted),
                                                          evaluation if isinstance(evaluation, dict) else None,
                                                          None))
    return True


def winner_target(state: GateState, members: Sequence[MemberRow]) -> str | None:
    """The content identity the 'winner' export should have (None: not decided yet)."""
    from ckptd.daemon.export_state import average_signature

    if state.winner == "average" and state.members:
        return average_signature(state.members)
    if state.winner == "best" and members:
        return members[0].record.sha256
    return None
