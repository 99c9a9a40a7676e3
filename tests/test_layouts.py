"""Model weights extracted from every supported foreign layout, compared value by value to the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from ckptd.errors import WeightsNotFoundError
from ckptd.layouts import resolve_key_path, strip_prefixes
from ckptd.safetensors_io import save_safetensors
from ckptd.weights import extract_weights, open_checkpoint
from tests.conftest import assert_same_state


def _layouts(sd: dict, ema_sd: dict) -> dict[str, tuple[object, str, str]]:
    """name -> (object to torch.save, expected layout, which weights: main|ema)."""
    lit = {f"model.{k}": v for k, v in sd.items()}
    return {
        "plain": (sd, "plain", "main"),
        "cvnets": ({"model_state_dict": sd, "optim_state_dict": {"state": {}}, "ema_state_dict": ema_sd,
                    "iterations": 10, "epoch": 1, "best_metric": 0.5}, "training-state", "main"),
        "lightning": ({"state_dict": lit, "pytorch-lightning_version": "2.4.0", "epoch": 3, "global_step": 30,
                       "callbacks": {"ModelCheckpoint{'monitor': 'val/acc', 'mode': 'max'}":
                                     {"current_score": torch.tensor(0.71), "best_model_score": torch.tensor(0.8)}},
                       "optimizer_states": [{}], "lr_schedulers": []}, "lightning", "main"),
        "timm": ({"state_dict": sd, "state_dict_ema": ema_sd, "arch": "tiny", "epoch": 2, "metric": 0.4},
                 "timm", "main"),
        "fairseq": ({"model": sd, "cfg": {"task": "x"}, "optimizer_history": []}, "fairseq", "main"),
        "deepspeed": ({"module": sd, "ds_version": "0.14", "optimizer": None}, "deepspeed", "main"),
        "ddp_prefixed": ({f"module.{k}": v for k, v in sd.items()}, "plain", "main"),
        "compiled_ddp": ({f"module._orig_mod.{k}": v for k, v in sd.items()}, "plain", "main"),
        "averaged_model": ({f"module.{k}": v for k, v in ema_sd.items()} | {"n_averaged": torch.tensor(4)},
                           "plain", "ema"),
    }


@pytest.mark.parametrize("name", list(_layouts({}, {})))
def test_extracts_model_weights_from_layout(tmp_path: Path, tiny, name: str) -> None:
    sd, ema_sd = tiny(seed=1).state_dict(), tiny(seed=2).state_dict()
    obj, layout, which = _layouts(sd, ema_sd)[name]
    path = tmp_path / f"{name}.ckpt"
    torch.save(obj, path)
    ckpt = open_checkpoint(path)
    assert ckpt.layout == layout
    assert_same_state(ckpt.weights, ema_sd if which == "ema" else sd)
    # and written out: safetensors with provenance metadata, values intact
    out = tmp_path / f"{name}.safetensors"
    extract_weights(path, out, metric=0.5, step=7)
    assert_same_state(load_file(out), ema_sd if which == "ema" else sd)


@pytest.mark.parametrize("obj_kind", ["cvnets", "timm"])
def test_prefer_ema_picks_ema_weights(tmp_path: Path, tiny, obj_kind: str) -> None:
    sd, ema_sd = tiny(seed=1).state_dict(), tiny(seed=2).state_dict()
    obj, _, _ = _layouts(sd, ema_sd)[obj_kind]
    torch.save(obj, tmp_path / "c.pt")
    assert_same_state(open_checkpoint(tmp_path / "c.pt", prefer_ema=True).weights, ema_sd)


def test_lightning_ema_callback_state(tmp_path: Path, tiny) -> None:
    sd, ema_sd = tiny(seed=1).state_dict(), tiny(seed=2).state_dict()
    obj = {"state_dict": {f"net.{k}": v for k, v in sd.items()}, "pytorch-lightning_version": "2.5.0",
           "callbacks": {"EMACallback": {"ema_state_dict": {f"net.{k}": v for k, v in ema_sd.items()}}}}
    torch.save(obj, tmp_path / "l.ckpt")
    assert_same_state(open_checkpoint(tmp_path / "l.ckpt").weights, sd)
    ema = open_checkpoint(tmp_path / "l.ckpt", prefer_ema=True)
    assert ema.layout == "lightning-ema"
    assert_same_state(ema.weights, ema_sd)


def test_explicit_key_path_and_clear_error(tmp_path: Path, tiny) -> None:
    sd = tiny().state_dict()
    torch.save({"nested": {"weights": sd}, "epoch": 1}, tmp_path / "n.pt")
    assert_same_state(open_checkpoint(tmp_path / "n.pt", key="nested.weights").weights, sd)
    with pytest.raises(WeightsNotFoundError, match=r"nested\.nope"):
        open_checkpoint(tmp_path / "n.pt", key="nested.nope")
    torch.save({"epoch": 1, "note": "no weights"}, tmp_path / "empty.pt")
    with pytest.raises(WeightsNotFoundError, match="top-level keys: epoch, note"):
        open_checkpoint(tmp_path / "empty.pt")


def test_safetensors_file(tmp_path: Path, tiny) -> None:
    sd = tiny().state_dict()
    save_safetensors(tmp_path / "m.safetensors", sd, {"metric": "0.5"})
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    assert ckpt.metadata["metric"] == "0.5"
    assert_same_state(ckpt.weights, sd)


@pytest.mark.parametrize("shard_kind", ["safetensors", "bin"])
def test_hf_sharded_folder(tmp_path: Path, tiny, shard_kind: str) -> None:
    sd = tiny().state_dict()
    keys = list(sd)
    halves = {f"model-0000{i + 1}-of-00002.{shard_kind}": {k: sd[k] for k in keys[i::2]} for i in range(2)}
    folder = tmp_path / "hf"
    folder.mkdir()
    weight_map = {}
    for fname, part in halves.items():
        if shard_kind == "safetensors":
            save_safetensors(folder / fname, part)
        else:
            torch.save(part, folder / fname)
        weight_map.update({k: fname for k in part})
    index = "model.safetensors.index.json" if shard_kind == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ckpt = open_checkpoint(folder)
    assert str(ckpt.format) == "hf-sharded"
    assert_same_state(ckpt.weights, sd)


def test_dcp_folder_is_read_without_unsafe_pickle(tmp_path: Path, tiny) -> None:
    sd = tiny().state_dict()
    dcp.save({"model": dict(sd), "epoch": 3}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    ckpt = open_checkpoint(tmp_path / "dcp")
    assert str(ckpt.format) == "torch-dcp"
    assert ckpt.obj["epoch"] == 3
    assert_same_state(ckpt.weights, sd)


def test_key_path_globs_span_dotted_keys() -> None:
    obj = {"callbacks": {"ModelCheckpoint{'monitor': 'val.acc', 'filename': 'e={epoch}.ckpt'}": {"current_score": 2}}}
    assert resolve_key_path(obj, "callbacks.ModelCheckpoint*.current_score") == 2
    assert strip_prefixes({"module._orig_mod.a": 1}, ["module.", "_orig_mod."]) == ({"a": 1}, ("module.", "_orig_mod."))
    # a prefix not carried by every key is left alone
    assert strip_prefixes({"module.a": 1, "b": 2}, ["module."])[0] == {"module.a": 1, "b": 2}
