"""Benchmark: ckptd's streaming average vs the naive whole-file average, for k = 2, 5, 10.

Builds ~300 MB fp32 models (plain state dicts, and training states with Adam's two moment buffers, ~900 MB),
then measures everything in one run, each job in a fresh process. Also measures model-only extraction from a
training checkpoint: mmap (ckptd) vs full load, with the bytes of the file actually touched.

    python bench/average.py                 # full size (needs ~13 GB of disk under bench/_work)
    python bench/average.py --mb 40 --ks 2 5  # quick
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import measure

MiB = 2**20


def build(workdir: Path, mb: int, k: int) -> tuple[list[str], list[str]]:
    tensors = 12
    per = mb * MiB // 4 // tensors
    plain, training = [], []
    for i in range(k):
        torch.manual_seed(i)
        sd = {f"layer{j}.weight": torch.randn(per // 1024, 1024) for j in range(tensors)}
        sd["bn.num_batches_tracked"] = torch.tensor(i)
        p = workdir / f"plain_{i}.pt"
        torch.save(sd, p)
        plain.append(str(p))
        optim = {"state": {j: {"step": torch.tensor(10.0), "exp_avg": torch.randn_like(v),
                               "exp_avg_sq": torch.rand_like(v)}
                           for j, v in enumerate(sd.values()) if v.is_floating_point()},
                 "param_groups": [{"lr": 1e-3, "params": list(range(tensors))}]}
        t = workdir / f"training_{i}.pt"
        torch.save({"model_state_dict": sd, "optim_state_dict": optim, "epoch": i, "iterations": i * 100}, t)
        training.append(str(t))
        del sd, optim
    return plain, training


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=300, help="model size in MiB (fp32)")
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 5, 10])
    ap.add_argument("--workdir", default=str(Path(__file__).resolve().parent / "_work"))
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        kmax = max(args.ks)
        print(f"building {kmax} plain ({args.mb} MiB) and {kmax} training-state (~{3 * args.mb} MiB) checkpoints …",
              flush=True)
        plain, training = build(work, args.mb, kmax)
        model_bytes = args.mb * MiB
        print(f"\nAVERAGING (model {args.mb} MiB fp32; peak = anonymous RSS above the interpreter baseline)")
        print(f"{'layout':9} {'k':>3} {'naive s':>9} {'ckptd s':>9} {'speedup':>8} {'naive peak':>11} "
              f"{'ckptd peak':>11} {'ckptd peak/model':>17}")
        for layout, files in (("plain", plain), ("training", training)):
            for k in args.ks:
                naive = measure("naive_average", paths=files[:k], out=str(work / "naive.pt"))
                ours = measure("ckptd_average", paths=files[:k], out=str(work / "ckptd.safetensors"))
                print(f"{layout:9} {k:>3} {naive['wall_s']:>9.2f} {ours['wall_s']:>9.2f} "
                      f"{naive['wall_s'] / ours['wall_s']:>7.2f}x {naive['peak_anon_bytes'] / MiB:>8.0f} MiB "
                      f"{ours['peak_anon_bytes'] / MiB:>8.1f} MiB {ours['peak_anon_bytes'] / model_bytes:>16.3f}",
                      flush=True)
        print("\nEXTRACT model-only weights from one training checkpoint "
              f"({Path(training[0]).stat().st_size / MiB:.0f} MiB file, {args.mb} MiB of model)")
        full = measure("full_load_extract", path=training[0], out=str(work / "full.safetensors"))
        ours = measure("ckptd_extract", path=training[0], out=str(work / "ours.safetensors"))
        for name, r in (("full torch.load", full), ("ckptd (reads)", ours)):
            touched = r["peak_file_rss_bytes"] + r["read_syscall_bytes"]
            print(f"  {name:16} {r['wall_s']:6.2f} s   peak anon {r['peak_anon_bytes'] / MiB:7.1f} MiB   "
                  f"file bytes read {touched / MiB:7.1f} MiB (read() {r['read_syscall_bytes'] / MiB:.1f} + "
                  f"mapped pages {r['peak_file_rss_bytes'] / MiB:.1f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
