"""A real trainer-like writer process for the fault suite: reads JSON commands on stdin, one per line, and
writes checkpoints with torch.save; answers one JSON line per command on stdout.

    python -m bench.chaos_writer

Commands:
  {"op": "save", "path", "seed", "metric", "step", "kb", "arch", "how", "chunk_delay", "poison"}
      how: atomic | inplace | rplus | slow (see bench.chaos_data.save); "slow" answers {"started": true}
      as soon as the file exists, then {"ok": true} when done (or never: the harness kills it mid-file).
  {"op": "loop", "items": [{"path", "seed", "metric", "step"}...], "kb", "how", "pause": [lo, hi], "seed"}
      writes the items in order with random pauses between them, answering {"wrote": i} after each.
  {"op": "prepare", <save fields>}  build the checkpoint object now, answer {"prepared": true}
  {"op": "commit"}  save the prepared object at once (the harness times the truncation to the ms)
  {"op": "exit"}
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from bench.chaos_data import checkpoint, save


def _say(**kw: object) -> None:
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def _save(cmd: dict, on_start: object = None) -> None:
    obj = checkpoint(cmd["seed"], cmd["metric"], cmd.get("step", 0), cmd.get("kb", 64), cmd.get("arch", "a"),
                     cmd.get("poison", ""))
    save(obj, Path(cmd["path"]), cmd.get("how", "atomic"), cmd.get("chunk_delay", 0.0), on_start)


def main() -> None:
    _say(ready=True)
    prepared: tuple[object, dict] | None = None
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "exit":
            _say(ok=True)
            return
        if op == "save":
            _save(cmd, on_start=(lambda: _say(started=True)) if cmd.get("how") == "slow" else None)
            _say(ok=True)
        elif op == "prepare":
            prepared = (checkpoint(cmd["seed"], cmd["metric"], cmd.get("step", 0), cmd.get("kb", 64),
                                   cmd.get("arch", "a"), cmd.get("poison", "")), cmd)
            _say(prepared=True)
        elif op == "commit":
            assert prepared is not None
            obj, prep = prepared
            save(obj, Path(prep["path"]), prep.get("how", "inplace"))
            prepared = None
            _say(ok=True)
        elif op == "loop":
            rng = random.Random(cmd.get("seed", 0))
            lo, hi = cmd.get("pause", [0.2, 0.8])
            for i, item in enumerate(cmd["items"]):
                _save({**item, "kb": cmd.get("kb", 64), "how": cmd.get("how", "inplace")})
                _say(wrote=i, t=time.time())
                time.sleep(rng.uniform(lo, hi))
            _say(ok=True)
        else:
            _say(error=f"unknown op {op!r}")


if __name__ == "__main__":
    main()
