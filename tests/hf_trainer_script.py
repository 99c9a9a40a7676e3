"""Test helper: a real Hugging Face ``Trainer`` run of a tiny GPT-2 built from a config (no network), in its own
process. Writes ``OUT/full/checkpoint-{1,2}`` (model.safetensors next to optimizer.pt, scheduler.pt,
rng_state.pth, training_args.bin, trainer_state.json) and, with peft installed, ``OUT/lora/checkpoint-2`` (a PEFT
adapter folder). ``OUT/full/final.pt`` / ``OUT/lora/final.pt`` hold the trained models' own state dicts.

usage: python tests/hf_trainer_script.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments


def train(out: Path, *, lora: bool) -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    data = [{"input_ids": torch.randint(0, 64, (8,)), "labels": torch.randint(0, 64, (8,))} for _ in range(8)]
    args = TrainingArguments(str(out), max_steps=2, save_steps=1, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], logging_steps=1, eval_strategy="steps", eval_steps=1, disable_tqdm=True,
                             learning_rate=1e-2)
    Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4]).train()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, out / "final.pt")


def main() -> None:
    out = Path(sys.argv[1])
    train(out / "full", lora=False)
    try:
        import peft  # noqa: F401
    except ImportError:
        return
    train(out / "lora", lora=True)


if __name__ == "__main__":
    main()
