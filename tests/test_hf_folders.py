"""Hugging Face Trainer ``checkpoint-N/`` folders as checkpoints: a real Trainer run (transformers + peft, no
network) and the exact file layouts written by hand (``pytorch_model.bin`` as transformers < 5 wrote it with
``save_safetensors=False``, ``adapter_model.bin``), with poisoned ``optimizer.pt``/``training_args.bin`` proving
that only the model's weights file is ever opened."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptd.cli import main
from ckptd.errors import CheckpointError, IncompleteCheckpointError
from ckptd.file_source import FileSource
from ckptd.formats import CheckpointFormat, check_complete, detect_format
from ckptd.safetensors_io import save_safetensors
from ckptd.weights import open_checkpoint
from tests.conftest import PYTHON, REPO, assert_same_state, subprocess_env


class Canary:
    """Unpickling this creates a file: proof that a file ckptd must never load was loaded."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file the reader opens."""
    paths: list[Path] = []
    original = FileSource.__init__

    def recording(self: FileSource, path: str | Path) -> None:
        paths.append(Path(path))
        original(self, path)

    monkeypatch.setattr(FileSource, "__init__", recording)
    return paths


# --- a real Trainer run ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None:
        pytest.skip("transformers/accelerate not installed (pip install transformers accelerate)")
    out = tmp_path_factory.mktemp("hf")
    proc = subprocess.run([PYTHON, str(REPO / "tests" / "hf_trainer_script.py"), str(out)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_trainer_checkpoint_folder_reads_only_the_model_file(trainer_run: Path, opened: list[Path]) -> None:
    folder = trainer_run / "full" / "checkpoint-2"
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "trainer_state.json",
            "model.safetensors"} <= {p.name for p in folder.iterdir()}
    assert detect_format(folder) is CheckpointFormat.HF_FOLDER
    assert check_complete(folder) is CheckpointFormat.HF_FOLDER
    ckpt = open_checkpoint(folder)
    assert opened == [folder / "model.safetensors"]
    assert ckpt.format is CheckpointFormat.HF_FOLDER and ckpt.layout == "plain"
    final = torch.load(trainer_run / "full" / "final.pt", weights_only=True)
    # the Trainer's model at step 2, minus lm_head.weight (tied to the embedding; HF drops it when saving)
    assert_same_state(ckpt.weights, {k: v for k, v in final.items() if k in ckpt.weights})
    assert set(final) - set(ckpt.weights) == {"lm_head.weight"}


@pytest.mark.slow
def test_peft_adapter_folder_is_labelled_as_an_adapter(trainer_run: Path, opened: list[Path]) -> None:
    lora = trainer_run / "lora"
    if not lora.exists():
        pytest.skip("peft not installed")
    folder = lora / "checkpoint-2"
    ckpt = open_checkpoint(folder)
    assert opened == [folder / "adapter_model.safetensors"]
    assert ckpt.layout == "hf-peft-adapter"
    final = torch.load(lora / "final.pt", weights_only=True)
    expected = {k: final[k.replace(".weight", ".default.weight")] for k in ckpt.weights}
    assert ckpt.weights and all(".lora_" in k for k in ckpt.weights)
    assert_same_state(ckpt.weights, expected)


@pytest.mark.slow
def test_cli_inspects_extracts_and_averages_trainer_folders(trainer_run: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    run = trainer_run / "full"
    one, two = run / "checkpoint-1", run / "checkpoint-2"
    assert main(["inspect", str(two)]) == 0
    assert "hf-folder" in capsys.readouterr().out
    assert main(["extract", str(two), "-o", str(tmp_path / "w.safetensors")]) == 0
    assert_same_state(load_file(tmp_path / "w.safetensors"), load_file(two / "model.safetensors"))
    assert main(["average", str(one), str(two), "-o", str(tmp_path / "avg.safetensors")]) == 0
    a, b, avg = load_file(one / "model.safetensors"), load_file(two / "model.safetensors"), \
        load_file(tmp_path / "avg.safetensors")
    for k in a:
        assert torch.allclose(avg[k], (a[k].double() + b[k].double()).div(2).to(a[k].dtype)), k
    # top-1 by the checkpoint's own eval_loss (trainer_state.json log_history at its global_step)
    losses = {p: next(e["eval_loss"] for e in json.loads((p / "trainer_state.json").read_text())["log_history"]
                      if "eval_loss" in e and e["step"] == int(p.name.split("-")[1])) for p in (one, two)}
    best = min(losses, key=losses.get)
    assert main(["average", str(one), str(two), "-o", str(tmp_path / "top1.safetensors"), "--top-k", "1",
                 "--metric", "trainer_state:eval_loss", "--mode", "min"]) == 0
    assert_same_state(load_file(tmp_path / "top1.safetensors"), load_file(best / "model.safetensors"))


# --- the exact layouts, written by hand (no transformers needed) -----------------------------------------------

def _trainer_folder(folder: Path, weights: dict[str, torch.Tensor], weights_name: str, canary: Path,
                    step: int = 10, eval_loss: float = 1.0) -> Path:
    """checkpoint-N/ as HF Trainer lays it out; everything but the weights file would run code if loaded."""
    folder.mkdir(parents=True)
    if weights_name.endswith(".safetensors"):
        save_safetensors(folder / weights_name, weights, {"format": "pt"})
    else:
        torch.save(weights, folder / weights_name)
    if weights_name.startswith("adapter_model"):
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    else:
        (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        torch.save({"payload": Canary(canary)}, folder / name)
    (folder / "trainer_state.json").write_text(json.dumps(
        {"global_step": step, "best_metric": 0.1, "log_history": [{"step": step, "eval_loss": eval_loss}]}))
    return folder


@pytest.mark.parametrize("weights_name", ["model.safetensors", "pytorch_model.bin", "adapter_model.safetensors",
                                          "adapter_model.bin"])
def test_handwritten_trainer_folders(tmp_path: Path, tiny, weights_name: str, opened: list[Path]) -> None:
    canary = tmp_path / "pwned"
    sd = tiny(seed=1).state_dict()
    folder = _trainer_folder(tmp_path / "run" / "checkpoint-10", sd, weights_name, canary)
    assert detect_format(folder) is CheckpointFormat.HF_FOLDER
    ckpt = open_checkpoint(folder)
    assert opened == [folder / weights_name]
    assert ckpt.layout == ("hf-peft-adapter" if weights_name.startswith("adapter") else "plain")
    assert_same_state(ckpt.weights, sd)
    assert not canary.exists(), "a non-weights file of the Trainer folder was unpickled"


def test_model_weights_win_over_an_adapter_and_safetensors_over_bin(tmp_path: Path, tiny) -> None:
    canary = tmp_path / "pwned"
    model, other = tiny(seed=1).state_dict(), tiny(seed=2).state_dict()
    folder = _trainer_folder(tmp_path / "checkpoint-1", model, "model.safetensors", canary)
    torch.save(other, folder / "pytorch_model.bin")
    save_safetensors(folder / "adapter_model.safetensors", other)
    (folder / "adapter_config.json").write_text("{}")
    assert_same_state(open_checkpoint(folder).weights, model)


def test_folders_that_are_not_checkpoints_say_what_was_expected(tmp_path: Path, tiny) -> None:
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    save_safetensors(folder / "adapter_model.safetensors", tiny().state_dict())  # no adapter_config.json
    (folder / "trainer_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"model\.safetensors or pytorch_model\.bin") as info:
        open_checkpoint(folder)
    assert str(folder) in str(info.value)


def test_a_truncated_weights_file_makes_the_folder_incomplete(tmp_path: Path, tiny) -> None:
    folder = _trainer_folder(tmp_path / "checkpoint-5", tiny().state_dict(), "model.safetensors", tmp_path / "x")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    with pytest.raises(IncompleteCheckpointError, match="truncated"):
        check_complete(folder)
    with pytest.raises(IncompleteCheckpointError):
        open_checkpoint(folder)
    shutil.rmtree(folder)
