"""Fine-tuning learns: on synthetic shapes, a tiny SAM on CPU, the held-out 1-point and box mIoU rise well above
the untrained model's; the same with LoRA adapters and decoder-only from an embedding store.

A randomly initialised SAM first learns to predict nothing (focal loss, mostly background) and only then to
localise the prompt: that takes about 200-500 steps of 4 images x 2 masks (after 600 steps the held-out 1-point
mIoU was 0.20 with full fine-tuning and with LoRA, 0.10 decoder-only, from 0.055 untrained; after 1200 steps 0.355
full, 0.255 LoRA, 0.175 decoder-only from the store; box 0.028 -> 0.346 full, 0.268 LoRA). The full runs are
therefore marked slow; the default suite keeps a short run that checks the start of it: the loss falls.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from samvit.cli import main
from samvit.masks.predictor import Predictor
from samvit.train.evaluate import evaluate
from samvit.train.masks_data import ShapeMasks, save_mask_folder

from tests._finetune_utils import write_tiny_checkpoint

HELD_OUT = {"shapes": ShapeMasks(16, size=128, seed=1)}  # the training set is seed 0
STEPS = 1200


def finetune(tmp_path, steps: int, extra=(), data=("--data", "synthetic", "--synthetic-size", "64"), lr="1e-3",
             log_every: int = 10):
    """Train the tiny SAM, return (untrained, trained) held-out evaluations and the run directory."""
    ck = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    out = str(tmp_path / "run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "sam", *data, "--checkpoint", ck, "--out", out, "--batch-size", "4", "--steps",
                     str(steps), "--lr", lr, "--warmup-steps", "0", "--masks-per-image", "2", "--iterations", "0",
                     "--log-every", str(log_every), "--num-workers", "0", "--quiet", *extra]) == 0
        before = evaluate(Predictor.from_checkpoint(ck), HELD_OUT, clicks=(1,))
        after = evaluate(Predictor.from_checkpoint(os.path.join(out, "final.safetensors")), HELD_OUT, clicks=(1,))
    finally:
        torch.set_num_threads(threads)
    return before, after, out


def assert_learned(before, after, margin: float = 0.15) -> None:
    for k in ("point1_miou", "box_miou"):
        assert after[k] > before[k] + margin, (k, before[k], after[k])


def train_losses(run_dir: str):
    with open(os.path.join(run_dir, "log.jsonl")) as fh:
        return [r["loss"] for r in map(json.loads, fh)]


def test_short_run_loss_falls(tmp_path):
    """The default suite's short version: 40 steps, the training loss falls by more than half (measured 3.3 ->
    1.4; this is the first phase, before the masks localise)."""
    _, _, out = finetune(tmp_path, 40, log_every=1)
    loss = train_losses(out)
    first, last = sum(loss[:3]) / 3, sum(loss[-10:]) / 10
    assert last < 0.5 * first, (first, last)


@pytest.mark.slow
def test_full_finetuning_learns(tmp_path):
    before, after, _ = finetune(tmp_path, STEPS, ["--train", "encoder,prompt,decoder"])
    assert_learned(before, after)


@pytest.mark.slow
def test_lora_learns(tmp_path):
    before, after, _ = finetune(tmp_path, STEPS, ["--train", "prompt,decoder", "--lora-rank", "4", "--lora-targets",
                                                "qkv,proj,mlp"])
    assert_learned(before, after)


@pytest.mark.slow
def test_decoder_only_from_store_learns(tmp_path):
    """The decoder alone learns more slowly over a frozen random encoder (its features are random projections of
    the patches): measured 0.055 -> 0.175 (1 point) after 1200 steps, hence the smaller margin."""
    data = save_mask_folder(ShapeMasks(64, size=128, seed=0), tmp_path / "shapes")
    before, after, _ = finetune(tmp_path, STEPS, ["--train", "prompt,decoder", "--store", str(tmp_path / "store")],
                                data=("--data", data))
    assert_learned(before, after, margin=0.1)
