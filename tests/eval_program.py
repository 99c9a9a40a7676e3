"""A real evaluation program for ckptd's evaluation gate (used by the tests and the benchmark).

ckptd runs it with the candidate's model-only weights in CKPTD_WEIGHTS; it loads them into the tiny model of
``tests/soup_models.py``, computes the loss on the fixed synthetic data and prints one JSON line. With
``EVAL_MODE`` set it misbehaves on purpose: ``fail`` (exit 3), ``hang`` (sleeps), ``lie`` (prints no JSON),
``nan`` (a non-finite metric), ``touch`` (modifies its input).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from safetensors.torch import load_file  # noqa: E402

import soup_models  # noqa: E402


def main() -> int:
    mode = os.environ.get("EVAL_MODE", "")
    weights = os.environ["CKPTD_WEIGHTS"]
    print(f"evaluating {weights} ({os.environ.get('CKPTD_CANDIDATE')})")  # chatter: logged, not parsed
    if mode == "fail":
        print("boom", file=sys.stderr)
        return 3
    if mode == "hang":
        time.sleep(3600)
    if mode == "lie":
        print("loss is low, trust me")
        return 0
    if mode == "touch":
        with open(weights, "ab") as fh:
            fh.write(b"\0")
    loss = soup_models.loss_of(load_file(weights))
    print(json.dumps({"loss": float("nan") if mode == "nan" else loss, "n": 256}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
