"""A real evaluation program for ckptd's evaluation gate (used by the tests and the benchmark).

ckptd runs it with the candidate's model-only weights in ``CKPTD_WEIGHTS``; it loads them into the tiny MLP of
``tests/soup_models.py`` (4 -> 16 -> 1, ReLU), computes the mean squared error on fixed synthetic data and prints
one JSON line ``{"loss": ..., "n": 256}``. NumPy only (no torch import): one evaluation costs ~0.2 s, so tests can
afford real evaluation processes. ``soup_models`` trains on the same data (``data()`` here is the one source).

With ``EVAL_MODE`` set it misbehaves on purpose: ``fail`` (exit 3), ``hang`` (starts a helper child, which stays in
the evaluator's process group, then both sleep), ``lie`` (prints no JSON), ``nan`` (a non-finite metric),
``touch`` (appends to its input weights file after reading it), ``inplace`` (overwrites the end of its input in
place after reading it and restores its mtime: only a private copy stops that reaching what ckptd publishes),
``delete`` (deletes its input after reading it). ``EVAL_SLEEP`` (seconds) makes a well-behaved evaluation take
longer. Its first stdout line (chatter, logged) names the weights file and ``CKPTD_EVALUATION_ID``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

IN, N = 4, 256
TEACHER = np.array([[1.0], [-2.0], [0.5], [1.5]], dtype=np.float32)


def data() -> tuple[np.ndarray, np.ndarray]:
    """The fixed synthetic regression data (float32): x of shape (256, 4), y of shape (256, 1)."""
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((N, IN)).astype(np.float32)
    y = (np.sin(x @ TEACHER) + 0.1 * x[:, :1] ** 2).astype(np.float32)
    return x, y


def loss(weights: dict[str, np.ndarray]) -> float:
    """MSE of the MLP with these weights (keys of ``nn.Sequential(Linear, ReLU, Linear)``), in float64."""
    x, y = (a.astype(np.float64) for a in data())
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    hidden = np.maximum(x @ w["0.weight"].T + w["0.bias"], 0.0)
    return float(np.mean((hidden @ w["2.weight"].T + w["2.bias"] - y) ** 2))


def main() -> int:
    mode = os.environ.get("EVAL_MODE", "")
    weights = os.environ["CKPTD_WEIGHTS"]
    print(f"evaluating {weights} ({os.environ.get('CKPTD_CANDIDATE')}, evaluation "  # chatter: logged, not parsed
          f"{os.environ.get('CKPTD_EVALUATION_ID')})")
    if mode == "fail":
        print("boom", file=sys.stderr)
        return 3
    if mode == "hang":  # a forked helper too: killing only the direct child would leave it behind
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        time.sleep(3600)
    if mode == "lie":
        print("loss is low, trust me")
        return 0
    time.sleep(float(os.environ.get("EVAL_SLEEP", "0")))
    from safetensors.numpy import load_file

    value = loss(load_file(weights))
    if mode == "touch":  # after reading: its answer is right, but it wrote to its input
        with open(weights, "ab") as fh:
            fh.write(b"\0")
    if mode == "inplace":  # after reading: same size, same mtime, different bytes
        st = os.stat(weights)
        with open(weights, "r+b") as fh:
            fh.seek(-64, os.SEEK_END)
            fh.write(b"\x7f" * 64)
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    if mode == "delete":
        os.remove(weights)
    print(json.dumps({"loss": float("nan") if mode == "nan" else value, "n": N}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
