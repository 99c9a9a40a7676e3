"""Test helper: the demo's tiny real training run as a separate process (a trainer writing checkpoints).

usage: python tests/trainer_script.py OUT_DIR EPOCHS [--delete-non-topk K] [--pause S]
Prints one JSON line per checkpoint: {"path", "metric", "epoch"}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ckptd.demo import synthetic_training


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("epochs", type=int)
    ap.add_argument("--delete-non-topk", type=int, default=0)
    ap.add_argument("--pause", type=float, default=0.3)
    args = ap.parse_args()
    for record in synthetic_training(Path(args.out), args.epochs, pause=args.pause,
                                     delete_non_topk=args.delete_non_topk):
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
