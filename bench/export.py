"""Benchmark: CoreML export + verification of a ~25M-parameter conv net (ResNet-50-sized, built by hand).

Runs the real export path the daemon uses (a child process with a timeout) and reports its wall time and the
child's peak RSS, plus the in-process split: capture+convert vs the Linux verification. Baseline in the same
run: a bare `ct.convert` of the same traced model (what an export without ckptd's checks costs).

    python bench/export.py [--precision float16|float32]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class BigConvNet(nn.Module):
    """Plain VGG/ResNet-like stack; widths chosen for ~25M parameters."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        widths = [64, 128, 256, 512, 640]
        layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
        cin = 64
        for i, w in enumerate(widths):
            layers.append(block(cin, w, 1 if i == 0 else 2))
            layers.append(block(w, w, 1))
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def build() -> nn.Module:
    return BigConvNet()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="float16", choices=["float16", "float32"])
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    from ckptd.export.coreml import _quiet
    from ckptd.export.request import ExportRequest
    from ckptd.export.runner import run_export
    from ckptd.safetensors_io import save_safetensors

    torch.manual_seed(0)
    model = BigConvNet().eval()
    params = sum(p.numel() for p in model.parameters())
    work = Path(tempfile.mkdtemp(prefix="ckptd-bench-export-"))
    try:
        weights = work / "w.safetensors"
        save_safetensors(weights, model.state_dict())
        print(f"model: {params / 1e6:.1f}M parameters ({weights.stat().st_size / 2**20:.0f} MiB fp32), "
              f"input 1x3x{args.size}x{args.size}, {args.precision}")
        # baseline: bare trace + convert, no verification
        import coremltools as ct

        x = torch.randn(1, 3, args.size, args.size)
        t0 = time.perf_counter()
        with _quiet(), torch.no_grad():
            traced = torch.jit.trace(model, (x,))
            ml = ct.convert(traced, inputs=[ct.TensorType(name="image", shape=x.shape)], convert_to="mlprogram",
                            compute_precision=ct.precision.FLOAT16 if args.precision == "float16"
                            else ct.precision.FLOAT32, minimum_deployment_target=ct.target.iOS17)
            ml.save(str(work / "bare.mlpackage"))
        bare = time.perf_counter() - t0
        req = ExportRequest(weights=str(weights), factory="bench.export:build", output=str(work / "x.mlpackage"),
                            inputs=[{"name": "image", "shape": [1, 3, args.size, args.size]}],
                            python_path=[str(Path(__file__).resolve().parent.parent)], precision=args.precision)
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        result = run_export(req, timeout=1800)
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        v = result.verification
        print(f"ckptd export (child process): {result.status}, {result.seconds:.1f} s wall, child peak RSS "
              f"{max(peak_kib, before) / 2**10:.0f} MiB")
        print(f"  capture {v.get('capture')}; graph parity {v.get('graph_parity')} "
              f"(max rel err {v.get('graph_max_rel_err', 0):.1e}); spec {v.get('spec')}; "
              f"package run {v.get('package_run')} (max rel err {v.get('package_max_rel_err', 0):.1e}, "
              f"tolerance {v.get('tolerance')})")
        print(f"baseline: bare trace + ct.convert + save, in process, no checks: {bare:.1f} s "
              f"-> ckptd's full export with verification costs {result.seconds / bare:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
