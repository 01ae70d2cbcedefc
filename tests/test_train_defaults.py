"""Defaults that learn: with the default lr (no --lr, no --blr: the task's floor for small batches, see
samvit.train.optim.LR_FLOOR and docs/training.md), `train mae`, `train sam --train decoder --store` and
`train distill` lower their loss by at least 20% within 200 steps on a small folder (tiny models, tiny images).
The first two are slow-marked: `pytest --runslow tests/test_train_defaults.py`."""
from __future__ import annotations

import json
import os

import pytest
import torch

from samvit.cli import main
from samvit.train.masks_data import ShapeMasks, save_mask_folder
from samvit.train.optim import LR_FLOOR

from tests._finetune_utils import write_tiny_checkpoint

STEPS = 200
COMMON = ["--steps", str(STEPS), "--log-every", "1", "--quiet", "--device", "cpu"]


def _run(args, out) -> list:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args + COMMON + ["--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    with open(os.path.join(out, "log.jsonl")) as fh:
        return list(map(json.loads, fh))


def _assert_learns(log, floor):
    assert len(log) == STEPS and all(r["lr"] == floor for r in log)  # the floor, no warmup without a cosine
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-10:]) / 10
    assert last <= 0.8 * first, (first, last)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny.safetensors")


@pytest.mark.slow  # mae_tiny works at 224 px: minutes on a loaded 2-core machine
def test_mae_default_lr_learns(tmp_path):
    log = _run(["train", "mae", "--data", "synthetic", "--model", "mae_tiny", "--synthetic-size", "32",
                "--batch-size", "8"], tmp_path / "run")
    _assert_learns(log, LR_FLOOR["mae"])


@pytest.mark.slow  # 200 steps x 2 rounds: over 20 s on 2 cores
def test_sam_decoder_from_store_default_lr_learns(tmp_path, checkpoint):
    data = save_mask_folder(ShapeMasks(8, size=128, seed=0), tmp_path / "shapes")
    log = _run(["train", "sam", "--data", data, "--checkpoint", checkpoint, "--train", "decoder", "--store",
                str(tmp_path / "store"), "--batch-size", "2", "--masks-per-image", "2", "--iterations", "1",
                "--num-workers", "0"], tmp_path / "run")
    _assert_learns(log, LR_FLOOR["sam"])


def test_distill_default_lr_learns(tmp_path, checkpoint):
    student = tmp_path / "student.json"
    student.write_text(json.dumps({"img_size": 128, "embed_dim": 32, "depth": 2, "num_heads": 2, "window_size": 4,
                                   "global_attn_indexes": [1], "out_chans": 64, "name": "student"}))
    log = _run(["train", "distill", "--teacher", checkpoint, "--student", str(student), "--data", "synthetic",
                "--synthetic-size", "16", "--batch-size", "4"], tmp_path / "run")
    _assert_learns(log, LR_FLOOR["distill"])
