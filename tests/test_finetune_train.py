"""`samvit train sam` on the shared loop: the exported model is SAM (segment-anything loads final.pth strictly and
its SamPredictor gives samvit's logits), exact resume, 2-process torchrun equal to 1 process, decoder-only from an
embedding store (computed once with the embed pipeline), and user errors without a traceback."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from samvit.cli import main
from samvit.embeddings.store import EmbeddingStore
from samvit.masks.predictor import Predictor
from samvit.train.masks_data import ShapeMasks, save_mask_folder

from tests._finetune_utils import SMALL, official_small_sam, write_tiny_checkpoint
from tests._torchrun_utils import torchrun_samvit
from tests.test_train_distributed import log
from tests.test_train_resume import assert_same_state, final_state, losses

TASK = ["train", "sam", "--data", "synthetic", "--synthetic-size", "8", "--masks-per-image", "2",
        "--iterations", "1", "--lr", "1e-3", "--warmup-steps", "2", "--log-every", "1", "--device", "cpu", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")  # the arithmetic of the one-thread subprocesses


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny.safetensors")


def test_exported_model_is_sam(tmp_path, checkpoint):
    """Full fine-tuning (with checkpointing, bf16, layer decay, drop path) and LoRA (merged on export): final.pth loads
    strictly into segment-anything's Sam, and its SamPredictor's logits equal samvit's Predictor's on the same image
    and prompts (max abs <= 1e-4)."""
    from segment_anything import SamPredictor

    image = ShapeMasks(1, size=100, seed=7).load(0)[0]
    for extra in (["--train", "encoder,prompt,decoder", "--checkpointing", "--precision", "bf16", "--layer-decay",
                   "0.8", "--drop-path", "0.1"],
                  ["--train", "decoder", "--lora-rank", "2", "--lora-targets", "qkv,proj,mlp"]):
        run = str(tmp_path / ("lora" if "--lora-rank" in extra else "full"))
        assert main(TASK + ["--checkpoint", checkpoint, "--out", run, "--batch-size", "2", "--steps", "2"]
                    + extra) == 0
        sd = torch.load(os.path.join(run, "final.pth"), weights_only=True)
        official = official_small_sam()
        official.load_state_dict(sd, strict=True)
        last = torch.load(os.path.join(run, "ckpt_00000002.pt"), weights_only=True)["model"]
        if "--lora-rank" not in extra:  # the last step's weights are what was exported
            assert all(torch.equal(sd[k], last[k]) for k in sd)
        else:  # adapters merged: the official names only
            assert any(".lora_a." in k for k in last) and not any("lora" in k for k in sd)
        ref = SamPredictor(official)
        ref.set_image(image)
        ours = Predictor.from_checkpoint(os.path.join(run, "final.safetensors"))  # config from its metadata
        ours.set_image(image)
        for prompt in ({"point_coords": np.array([[40.0, 30.0], [60.0, 70.0]]), "point_labels": np.array([1, 0])},
                       {"box": np.array([10.0, 20.0, 80.0, 90.0])}):
            want, want_iou, want_low = ref.predict(**prompt, multimask_output=True, return_logits=True)
            got, got_iou, got_low = ours.predict(**prompt, multimask_output=True, return_logits=True)
            assert np.abs(got_low - want_low).max() <= 1e-4 and np.abs(got - want).max() <= 1e-4
            assert np.abs(got_iou - want_iou).max() <= 1e-4
        pth = Predictor.from_checkpoint(os.path.join(run, "final.pth"), model=SMALL)  # the .pth with its config
        pth.set_image(image)
        assert np.array_equal(pth.predict(box=np.array([10.0, 20.0, 80.0, 90.0]))[0],
                              ours.predict(box=np.array([10.0, 20.0, 80.0, 90.0]))[0])


def test_stop_and_resume_equals_straight_run(tmp_path, checkpoint):
    """6 steps straight == 3 steps, then --resume to 6: the same losses (correction clicks included) and state."""
    common = TASK + ["--checkpoint", checkpoint, "--batch-size", "2", "--train", "prompt,decoder,encoder"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(common + ["--out", a, "--steps", "6"]) == 0
    assert main(common + ["--out", b, "--steps", "3"]) == 0
    assert main(common + ["--out", b, "--steps", "6", "--resume"]) == 0
    assert losses(a) == losses(b) and len(losses(a)) == 6
    assert_same_state(final_state(a), final_state(b))
    for name in ("final.pth",):
        sa = torch.load(os.path.join(a, name), weights_only=True)
        sb = torch.load(os.path.join(b, name), weights_only=True)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_two_processes_equal_one(tmp_path, checkpoint):
    """2 processes x batch 1 x accumulation 2 (DDP, and FSDP2) = 1 process x batch 4; tolerances as the MAE test
    (losses and gradient norms within 1e-5 relative: the processes sum gradients in another order)."""
    common = TASK + ["--checkpoint", checkpoint, "--steps", "4"]
    one, ddp, fsdp = str(tmp_path / "one"), str(tmp_path / "ddp"), str(tmp_path / "fsdp")
    assert main(common + ["--batch-size", "4", "--out", one]) == 0
    two = ["--batch-size", "1", "--accum", "2"]
    torchrun_samvit(tmp_path, [common + two + ["--out", ddp], common + two + ["--fsdp", "--out", fsdp]])
    for run in (ddp, fsdp):
        assert json.load(open(os.path.join(run, "config.json")))["processes"] == 2
        for ra, rb in zip(log(one), log(run)):
            assert ra["step"] == rb["step"] and ra["lr"] == rb["lr"]
            for k in ("loss", "focal_dice", "iou_mse", "grad_norm"):
                assert abs(ra[k] - rb[k]) <= 1e-5 * abs(ra[k]) + 1e-7, (run, k, ra, rb)
        assert len(log(run)) == 4 and os.path.exists(os.path.join(run, "final.pth"))


def test_decoder_only_from_a_store(tmp_path, checkpoint):
    """With a frozen encoder, --store reads the embeddings from a store the embed pipeline fills once; the losses
    are those of running the encoder, within the store's float16 rounding."""
    data = save_mask_folder(ShapeMasks(6, size=128, seed=0), tmp_path / "shapes")
    store = str(tmp_path / "store")
    common = TASK[:2] + ["--data", data] + TASK[4:] + ["--checkpoint", checkpoint, "--batch-size", "2", "--steps",
                                                       "3", "--train", "prompt,decoder", "--num-workers", "0"]
    assert main(common + ["--out", str(tmp_path / "enc")]) == 0
    assert main(common + ["--out", str(tmp_path / "st"), "--store", store]) == 0
    s = EmbeddingStore(store)
    assert sorted(s.keys()) == sorted(os.listdir(os.path.join(data, "images")))
    for ra, rb in zip(log(str(tmp_path / "enc")), log(str(tmp_path / "st"))):
        assert abs(ra["loss"] - rb["loss"]) <= 2e-3 * abs(ra["loss"]), (ra, rb)
    mtime = {k: os.path.getmtime(os.path.join(store, "index", f)) for k, f in
             enumerate(sorted(os.listdir(os.path.join(store, "index"))))}
    assert main(common + ["--out", str(tmp_path / "st2"), "--store", store]) == 0  # nothing left to embed
    assert {k: os.path.getmtime(os.path.join(store, "index", f)) for k, f in
            enumerate(sorted(os.listdir(os.path.join(store, "index"))))} == mtime


def test_user_errors_without_traceback(tmp_path, checkpoint, capsys):
    base = ["train", "sam", "--checkpoint", checkpoint, "--batch-size", "1", "--steps", "1", "--quiet"]
    cases = [
        (["--data", "synthetic", "--out", str(tmp_path / "a"), "--store", str(tmp_path / "s")], "frozen encoder"),
        (["--data", "synthetic", "--out", str(tmp_path / "b"), "--train", "decoder", "--store", str(tmp_path / "s")],
         "needs image files"),
        (["--data", "synthetic", "--out", str(tmp_path / "c"), "--train", "neck"], "subset of encoder"),
        (["--data", str(tmp_path / "x.json"), "--out", str(tmp_path / "d")], "no such file"),
        (["--data", "synthetic", "--out", str(tmp_path / "e"), "--lora-rank", "2"], "instead of the encoder"),
    ]
    for args, message in cases:
        assert main(base + args) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
