"""When is a checkpoint complete? Pure bookkeeping over scan observations; time is passed in.

Layers: a commit signal where the writer gives one (a rename into place, seen as a move event; DCP's
``.metadata`` newer than its shards) makes a candidate ready at once; otherwise size and mtime must stay
unchanged for ``settle`` seconds. The structural check and the trial load happen later, in the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ckptd.daemon.discovery import Observation


@dataclass
class _Seen:
    signature: tuple[int, int]
    since: float
    committed: bool = False


class ReadinessTracker:
    def __init__(self) -> None:
        self._seen: dict[Path, _Seen] = {}
        self._moved_in: set[Path] = set()

    def note_moved_in(self, path: Path) -> None:
        """A watcher saw ``path`` renamed into place: the writer's commit signal."""
        self._moved_in.add(path)

    def observe(self, obs: Observation, now: float) -> None:
        seen = self._seen.get(obs.path)
        if seen is None or seen.signature != obs.signature:
            seen = self._seen[obs.path] = _Seen(obs.signature, now)
        if obs.path in self._moved_in:
            self._moved_in.discard(obs.path)
            seen.committed = True

    def is_ready(self, obs: Observation, now: float, settle: float) -> bool:
        seen = self._seen.get(obs.path)
        if seen is None or seen.signature != obs.signature or not obs.commit_ok:
            return False
        return seen.committed or now - seen.since >= settle

    def deadline(self, obs: Observation, settle: float) -> float | None:
        """When ``obs`` becomes ready if nothing changes (None: not tracked or waiting for a commit marker)."""
        seen = self._seen.get(obs.path)
        if seen is None or not obs.commit_ok:
            return None
        return seen.since if seen.committed else seen.since + settle

    def forget_missing(self, present: set[Path]) -> None:
        for path in [p for p in self._seen if p not in present]:
            del self._seen[path]
