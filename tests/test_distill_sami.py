"""SAMI-style pre-training: `samvit train mae --target teacher-features --teacher CK` reconstructs a teacher's
embeddings of the masked patches; the pixel MAE is unchanged (its own tests)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from tests.helpers import TINY, official_tiny_sam
from samvit import load_encoder, preprocess
from samvit.checkpoints.files import CONFIG_METADATA_KEY, write_tensors
from samvit.cli import main
from samvit.train.ckpt import latest_checkpoint
from samvit.train.data import IMAGENET_MEAN, IMAGENET_STD
from samvit.train.mae import teacher_targets
from samvit.train.shapes import render_shapes

ARGS = ["train", "mae", "--data", "synthetic", "--model", "mae_tiny", "--synthetic-size", "16", "--batch-size", "4",
        "--lr", "2e-3", "--warmup-steps", "3", "--log-every", "1", "--quiet"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sami") / "teacher.safetensors")
    write_tensors(path, official_tiny_sam(TINY, seed=5).state_dict(), {CONFIG_METADATA_KEY: TINY.to_json()})
    return path


def test_targets_are_the_teachers_embedding(teacher):
    """At the teacher's own size and grid (no resize, no pooling) the targets are the teacher's embedding of the
    image as samvit.preprocess (the official preprocessing) prepares it."""
    enc = load_encoder(checkpoint=teacher)
    rgb = render_shapes(0, seed=7, size=256).image
    x = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    got = teacher_targets(enc, x[None], grid=16)
    with torch.inference_mode():
        want = enc(preprocess(rgb, 256).tensor[None]).flatten(2).transpose(1, 2)
    assert got.shape == (1, 256, 32)
    assert (got - want).abs().max().item() < 1e-4
    assert teacher_targets(enc, torch.zeros(2, 3, 224, 224), grid=14).shape == (2, 196, 32)  # mae_tiny's grid


def test_sami_loss_falls_and_exports(teacher, tmp_path):
    run = str(tmp_path / "sami")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(ARGS + ["--target", "teacher-features", "--teacher", teacher, "--steps", "30", "--out",
                            run]) == 0
    finally:
        torch.set_num_threads(threads)
    with open(os.path.join(run, "log.jsonl")) as fh:
        loss = [json.loads(line)["loss"] for line in fh]
    print(f"SAMI loss: step 1 {loss[0]:.4f}, step 30 {loss[-1]:.4f}")
    assert len(loss) == 30 and np.mean(loss[-5:]) < 0.5 * np.mean(loss[:5])
    state = latest_checkpoint(run)
    assert state["model"]["decoder_pred.weight"].shape == (32, 64)  # a linear head to the teacher's width
    with open(os.path.join(run, "config.json")) as fh:
        task = json.load(fh)["identity"]["task"]
    assert task["target"] == "teacher-features" and len(task["teacher_sha256"]) == 64
    enc_json = str(tmp_path / "enc.json")
    with open(enc_json, "w") as fh:
        json.dump(dict(TINY.to_dict(), depth=3, global_attn_indexes=[2]), fh)
    out = str(tmp_path / "enc.safetensors")
    assert main(["train", "export-encoder", run, "--preset", enc_json, "--out", out]) == 0
    assert load_encoder(checkpoint=out).config.embed_dim == 64


def test_sami_argument_errors(teacher, tmp_path, capsys):
    assert main(ARGS + ["--target", "teacher-features", "--steps", "1", "--out", str(tmp_path / "a")]) == 2
    assert "needs --teacher" in capsys.readouterr().err
    assert main(ARGS + ["--teacher", teacher, "--steps", "1", "--out", str(tmp_path / "b")]) == 2
    assert "needs --teacher" in capsys.readouterr().err
    assert main(ARGS + ["--target", "teacher-features", "--teacher", teacher, "--vis-every", "1", "--steps", "1",
                        "--out", str(tmp_path / "c")]) == 2
    assert "pixel reconstructions" in capsys.readouterr().err
    assert not any(os.path.exists(tmp_path / d) for d in "abc")
