"""Real coremltools conversions of tiny models, verified on Linux by graph parity, spec and a reference run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from ckptd.errors import ExportError
from ckptd.export.coreml import export_coreml
from ckptd.export.request import ExportRequest
from ckptd.export.runner import publish_package, run_export
from ckptd.safetensors_io import save_safetensors
from tests import export_models
from tests.conftest import PYTHON, REPO, subprocess_env

pytestmark = pytest.mark.slow


def _weights(tmp_path: Path, model: torch.nn.Module, name: str = "w.safetensors") -> str:
    path = tmp_path / name
    save_safetensors(path, {k: v.contiguous() for k, v in model.state_dict().items()})
    return str(path)


def _req(tmp_path: Path, weights: str, factory: str, inputs: list[dict], **kw: object) -> ExportRequest:
    return ExportRequest(weights=weights, factory=factory, output=str(tmp_path / "out.mlpackage"), inputs=inputs,
                         python_path=[str(REPO)], **kw)  # type: ignore[arg-type]


CASES = {
    "convnet_bn_fp32": ("ckptd.examples:build_tiny_convnet", lambda: export_models.TinyConvNet(),
                        [{"name": "image", "shape": [1, 3, 8, 8]}], {"precision": "float32", "outputs": ["logits"]}),
    "convnet_bn_fp16": ("ckptd.examples:build_tiny_convnet", lambda: export_models.TinyConvNet(),
                        [{"name": "image", "shape": [1, 3, 8, 8]}], {"precision": "float16"}),
    "transformer_fp16": ("tests.export_models:build_encoder", export_models.build_encoder,
                         [{"name": "tokens", "shape": [1, 5, 16]}], {"precision": "float16"}),
    "transformer_fp32": ("tests.export_models:build_encoder", export_models.build_encoder,
                         [{"name": "tokens", "shape": [1, 5, 16]}], {"precision": "float32"}),
    "two_inputs": ("tests.export_models:build_two_inputs", export_models.build_two_inputs,
                   [{"name": "vec", "shape": [1, 6]}, {"name": "img", "shape": [1, 3, 4, 4]}],
                   {"precision": "float32"}),
    "dict_output": ("tests.export_models:build_dict_output", export_models.build_dict_output,
                    [{"name": "x", "shape": [1, 3, 8, 8]}], {"precision": "float32"}),
    "image_input": ("ckptd.examples:build_tiny_convnet", lambda: export_models.TinyConvNet(),
                    [{"name": "photo", "shape": [1, 3, 8, 8], "kind": "image", "scale": 1 / 255,
                      "bias": [-0.5, -0.4, -0.3]}], {"precision": "float32"}),
    "flexible_range": ("ckptd.examples:build_tiny_convnet", lambda: export_models.TinyConvNet(),
                       [{"name": "image", "shape": [1, 3, [8, 32], [8, 32]]}], {"precision": "float32"}),
    "enumerated": ("ckptd.examples:build_tiny_convnet", lambda: export_models.TinyConvNet(),
                   [{"name": "image", "shape": [1, 3, 8, 8], "enumerated_shapes": [[1, 3, 8, 8], [1, 3, 16, 16]]}],
                   {"precision": "float16"}),
    "int8_weights": ("tests.export_models:build_encoder", export_models.build_encoder,
                     [{"name": "tokens", "shape": [1, 5, 16]}], {"precision": "float32", "compression": "int8"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_real_conversion_is_verified(tmp_path: Path, case: str) -> None:
    factory, build, inputs, extra = CASES[case]
    torch.manual_seed(1)
    model = build()
    weights = _weights(tmp_path, model)
    result = export_coreml(_req(tmp_path, weights, factory, inputs, metadata={"source": "/x/ckpt.pt", "metric": "0.5"},
                                **extra))
    v = result.verification
    assert result.status == "ok", v
    assert v["graph_parity"] == "ok" and v["spec"] == "ok" and v["package_run"] == "ok", v
    assert v["package_max_rel_err"] <= v["tolerance"]
    assert v["predict"].startswith("skipped") or v["predict"] == "ok"
    assert (tmp_path / "out.mlpackage" / "Manifest.json").exists()
    import coremltools as ct

    spec = ct.utils.load_spec(str(tmp_path / "out.mlpackage"))
    assert [i.name for i in spec.description.input] == [i["name"] for i in inputs]
    meta = dict(spec.description.metadata.userDefined)
    assert meta["source"] == "/x/ckpt.pt" and meta["metric"] == "0.5" and meta["ckptd_version"]
    assert meta["torch_version"] == torch.__version__
    if case == "dict_output":
        assert v["outputs"] == ["logits", "probs"]
    if case == "image_input":
        assert spec.description.input[0].type.WhichOneof("Type") == "imageType"
    if case.startswith("flexible"):
        assert v["capture"] == "torch.jit.trace"


def test_negative_control_different_weights_fail_verification(tmp_path: Path) -> None:
    torch.manual_seed(1)
    a = _weights(tmp_path, export_models.TinyConvNet(), "a.safetensors")
    torch.manual_seed(2)
    b = _weights(tmp_path, export_models.TinyConvNet(), "b.safetensors")
    req = _req(tmp_path, a, "ckptd.examples:build_tiny_convnet", [{"name": "image", "shape": [1, 3, 8, 8]}],
               precision="float32", verify_weights=b)
    with pytest.raises(ExportError, match="verification failed: package_run"):
        export_coreml(req)


def test_unsupported_op_reports_partial_not_ok(tmp_path: Path) -> None:
    weights = _weights(tmp_path, export_models.build_cumsum())
    result = export_coreml(_req(tmp_path, weights, "tests.export_models:build_cumsum", [{"name": "x", "shape": [1, 4]}],
                                precision="float32"))
    assert result.status == "partial"
    assert result.verification["package_run"].startswith("partial") and "cumsum" in result.verification["package_run"]


def test_failures_in_the_subprocess_are_clear(tmp_path: Path) -> None:
    weights = _weights(tmp_path, export_models.TinyConvNet())
    inputs = [{"name": "image", "shape": [1, 3, 8, 8]}]
    bad_import = run_export(_req(tmp_path, weights, "no_such_pkg.models:build", inputs), timeout=120)
    assert bad_import.status == "failed" and "cannot import factory 'no_such_pkg.models:build'" in bad_import.reason
    mismatch = run_export(_req(tmp_path, weights, "tests.export_models:build_encoder", inputs), timeout=120)
    assert mismatch.status == "failed" and "do not fit the factory's model" in mismatch.reason
    shape = run_export(_req(tmp_path, weights, "ckptd.examples:build_tiny_convnet",
                            [{"name": "image", "shape": [1, 5, 8, 8]}]), timeout=120)
    assert shape.status == "failed" and "fails on the configured inputs" in shape.reason
    slow = run_export(_req(tmp_path, weights, "tests.export_models:build_slow", inputs), timeout=4)
    assert slow.status == "failed" and "timed out after 4s" in slow.reason
    assert not (tmp_path / "out.mlpackage").exists()


def test_publish_swaps_atomically_and_keeps_versions(tmp_path: Path) -> None:
    out = tmp_path / "run"
    for i in range(5):
        staging = out / "coreml" / f".ckptd-tmp-staging-{i}.mlpackage"
        (staging / "Data").mkdir(parents=True)
        (staging / "Manifest.json").write_text(str(i))
        publish_package(staging, out, label=f"v{i}", keep=2)
        link = out / "best.mlpackage"
        assert link.is_symlink() and (link / "Manifest.json").read_text() == str(i)
    versions = sorted(p.name for p in (out / "coreml").iterdir())
    assert versions == ["best-v0003-v2.mlpackage", "best-v0004-v3.mlpackage", "best-v0005-v4.mlpackage"]


def test_cli_export_coreml(tmp_path: Path) -> None:
    torch.manual_seed(3)
    weights = tmp_path / "ckpt.pt"
    torch.save({"model_state_dict": export_models.TinyConvNet().state_dict(), "epoch": 1}, weights)
    res = subprocess.run([PYTHON, "-m", "ckptd.cli", "export-coreml", "--weights", str(weights), "--factory",
                          "ckptd.examples:build_tiny_convnet", "--input", "image:1x3x8x8", "--output-name", "logits",
                          "--precision", "float32", "-o", str(tmp_path / "m.mlpackage")],
                         capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert res.returncode == 0, res.stderr
    assert "package_run   ok" in res.stderr and (tmp_path / "m.mlpackage" / "Manifest.json").exists()
    res = subprocess.run([PYTHON, "-m", "ckptd.cli", "export-coreml", "--weights", str(weights), "--factory",
                          "ckptd.examples:build_tiny_convnet", "--input", "image:1x3x8",
                          "-o", str(tmp_path / "n.mlpackage"),
                          "--timeout", "2m"], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert res.returncode == 1 and "export failed" in res.stderr
    assert not (tmp_path / "n.mlpackage").exists()
    assert "best-v0001-ckpt.mlpackage" in os.path.realpath(tmp_path / "m.mlpackage")
