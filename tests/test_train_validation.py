"""Validation during training (--val-data, --val-every, --val-limit) for `samvit train mae|sam|distill`: the val_
metrics in log.jsonl at the right steps, the same training as without validation, best.* holding the best step's
weights (and best.json naming it), the best kept across --resume, and bad flags refused before anything is written."""
from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from samvit.cli import main
from samvit.config import mae_preset
from samvit.modeling.mae import MaskedAutoencoder
from samvit.train.ckpt import checkpoint_path, load_checkpoint
from samvit.train.data import ImageFiles
from samvit.train.log import Logger
from samvit.train.mae import HeldOutImages, mae_loss
from samvit.train.masks_data import ShapeMasks, save_mask_folder
from samvit.train.shapes import SyntheticShapes
from samvit.train.validate import held_out_means


pytestmark = pytest.mark.usefixtures("one_thread")  # bitwise comparisons between runs

MAE = ["train", "mae", "--data", "synthetic", "--model", "mae_tiny", "--synthetic-size", "8", "--batch-size", "2",
       "--lr", "1e-3", "--warmup-steps", "2", "--log-every", "1", "--keep-last", "20", "--quiet"]


def image_folder(path, n: int, size: int = 96, seed: int = 5, prefix: str = "held") -> str:
    os.makedirs(path, exist_ok=True)
    shapes = SyntheticShapes(n, size=size, seed=seed)
    for i in range(n):
        Image.fromarray(shapes.load(i)).save(os.path.join(path, f"{prefix}_{i}.png"))
    return str(path)


def log(run) -> list:
    with open(os.path.join(run, "log.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def best_json(run) -> dict:
    with open(os.path.join(run, "best.json")) as fh:
        return json.load(fh)


def val_steps(run, key: str) -> list:
    return [r["step"] for r in log(run) if key in r]


def assert_best_is_the_best(run, key: str, higher: bool) -> dict:
    rows = [r for r in log(run) if key in r]
    pick = (max if higher else min)(rows, key=lambda r: r[key])
    best = best_json(run)
    assert best["metric"] == key and best["step"] == pick["step"] and best["value"] == pick[key]
    return best


@pytest.fixture(scope="module")
def val_images(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("val") / "images", 3)


def test_mae_validation_steps_best_and_no_effect_on_training(tmp_path, val_images):
    """val_loss at steps 2, 4 and 5 (the end) with --val-every 2; the training losses are bitwise those of a run
    without validation; each val_loss is the held-out loss of that step's checkpoint (deterministic crops and
    masks); best.pt is the lowest step's weights and export-encoder takes it."""
    plain, val = str(tmp_path / "plain"), str(tmp_path / "val")
    assert main(MAE + ["--out", plain, "--steps", "5"]) == 0
    assert main(MAE + ["--out", val, "--steps", "5", "--val-data", val_images, "--val-every", "2",
                       "--ckpt-every", "1"]) == 0
    assert val_steps(val, "val_loss") == [2, 4, 5]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in log(plain)] == \
        [(r["step"], r["loss"], r["grad_norm"]) for r in log(val)]
    model = MaskedAutoencoder(mae_preset("mae_tiny"))
    images = HeldOutImages(ImageFiles(val_images), model.config.img_size, model.config.num_patches, seed=0)
    for r in log(val):
        if "val_loss" in r:
            model.load_state_dict(load_checkpoint(checkpoint_path(val, r["step"]))["model"])
            with torch.no_grad():
                again = held_out_means(model.eval(), images, 2, None, "fp32", lambda m, b: {"loss": mae_loss()(m, b)})
            assert abs(again["loss"] - r["val_loss"]) <= 1e-6 * r["val_loss"], (r, again)
    best = assert_best_is_the_best(val, "val_loss", higher=False)
    assert best["files"] == ["best.pt"] and best["data"]["val_data"] == os.path.abspath(val_images)
    saved = torch.load(os.path.join(val, "best.pt"), weights_only=True)
    at_step = load_checkpoint(checkpoint_path(val, best["step"]))["model"]
    assert saved.keys() == at_step.keys() and all(torch.equal(saved[k], at_step[k]) for k in saved)
    enc = tmp_path / "enc.json"
    enc.write_text(json.dumps({"embed_dim": 64, "depth": 3, "num_heads": 2, "global_attn_indexes": [2]}))
    assert main(["train", "export-encoder", os.path.join(val, "best.pt"), "--preset", str(enc), "--out",
                 str(tmp_path / "enc.safetensors")]) == 0


def test_default_every_checkpoint_and_resume_keeps_the_best(tmp_path, val_images):
    """Without --val-every: at every checkpoint and at the end. A resumed run keeps the best of best.json: a worse
    validation after the resume does not replace best.pt; validation added on --resume is allowed; another
    --val-limit measures something else, so its first validation starts a new best."""
    run = str(tmp_path / "run")
    assert main(MAE + ["--out", run, "--steps", "2"]) == 0  # started without validation
    assert main(MAE + ["--out", run, "--steps", "7", "--ckpt-every", "3", "--val-data", val_images,
                       "--resume"]) == 0
    assert val_steps(run, "val_loss") == [3, 6, 7]
    assert_best_is_the_best(run, "val_loss", higher=False)
    best = best_json(run)
    best["value"] = -1.0  # a best no later validation can beat (the weights stay those of its step)
    with open(os.path.join(run, "best.json"), "w") as fh:
        json.dump(best, fh)
    before = open(os.path.join(run, "best.pt"), "rb").read()
    assert main(MAE + ["--out", run, "--steps", "9", "--ckpt-every", "3", "--val-data", val_images, "--val-every",
                       "1", "--resume"]) == 0
    assert val_steps(run, "val_loss") == [3, 6, 7, 8, 9]
    assert best_json(run) == best and open(os.path.join(run, "best.pt"), "rb").read() == before
    assert main(MAE + ["--out", run, "--steps", "10", "--val-data", val_images, "--val-limit", "2", "--resume"]) == 0
    now = best_json(run)
    assert now["step"] == 10 and now["data"]["val_limit"] == 2 and now["value"] == log(run)[-1]["val_loss"]


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    """The tiny SAM with a livened decoder (masks of a few logits that depend on the prompt: mIoUs not all 0),
    and 2 held-out images of shapes."""
    from samvit.checkpoints.files import CONFIG_METADATA_KEY, write_tensors

    from tests._finetune_utils import SMALL, tiny_sam as build
    from tests._masks_utils import liven_decoder_

    tmp = tmp_path_factory.mktemp("sam")
    with torch.no_grad():
        sam = liven_decoder_(build(0))
    checkpoint = str(tmp / "tiny.safetensors")
    write_tensors(checkpoint, sam.state_dict(), {CONFIG_METADATA_KEY: SMALL.to_json(), "format": "samvit"})
    return checkpoint, save_mask_folder(ShapeMasks(2, size=128, seed=11), tmp / "val_masks")


def test_sam_validation_is_samvit_evaluate(tmp_path, tiny_sam):
    """train sam: `samvit evaluate`'s mIoUs at --val-every steps; best.pth is the best step's checkpoint and
    `samvit evaluate` on best.safetensors gives best.json's metrics."""
    checkpoint, masks = tiny_sam
    run = str(tmp_path / "run")
    assert main(["train", "sam", "--data", "synthetic", "--synthetic-size", "4", "--masks-per-image", "2",
                 "--iterations", "1", "--lr", "3e-3", "--warmup-steps", "0", "--log-every", "1", "--device", "cpu",
                 "--quiet", "--checkpoint", checkpoint, "--batch-size", "2", "--steps", "3", "--train", "decoder",
                 "--out", run, "--val-data", masks, "--val-every", "2", "--ckpt-every", "1", "--keep-last", "5"]) == 0
    assert val_steps(run, "val_point1_miou") == [2, 3]
    rows = [r for r in log(run) if "val_point1_miou" in r]
    assert all({"val_box_miou", "val_clicks1_miou", "val_clicks3_miou", "val_clicks5_miou"} <= r.keys()
               and r["val_n_images"] == 2 for r in rows)
    best = assert_best_is_the_best(run, "val_point1_miou", higher=True)
    assert best["files"] == ["best.pth", "best.safetensors"]
    saved = torch.load(os.path.join(run, "best.pth"), weights_only=True)
    at_step = load_checkpoint(checkpoint_path(run, best["step"]))["model"]
    assert all(torch.equal(saved[k], at_step[k]) for k in saved)
    out = str(tmp_path / "eval.json")
    assert main(["evaluate", "--data", masks, "--checkpoint", os.path.join(run, "best.safetensors"), "--json", out,
                 "--quiet"]) == 0
    with open(out) as fh:
        evaluated = json.load(fh)
    for k in ("point1_miou", "box_miou", "clicks1_miou", "clicks5_miou"):
        # equal here; 1e-3 leaves room for a pixel flipped by another attention kernel's rounding
        assert abs(evaluated[k] - best["metrics"]["val_" + k]) <= 1e-3, k


def test_distill_validation(tmp_path):
    """train distill: val_mse and val_cosine, the teacher's embeddings of --val-data computed once into
    RUN_DIR/val_teacher_store; best_student.safetensors is the lowest-MSE step's student."""
    from samvit import load_encoder
    from samvit.checkpoints.files import CONFIG_METADATA_KEY, write_tensors
    from samvit.config import EncoderConfig

    from tests.helpers import TINY, official_tiny_sam

    teacher = str(tmp_path / "teacher.safetensors")
    write_tensors(teacher, official_tiny_sam(TINY, seed=3).state_dict(), {CONFIG_METADATA_KEY: TINY.to_json()})
    student = str(tmp_path / "student.json")
    with open(student, "w") as fh:
        json.dump(EncoderConfig(img_size=256, embed_dim=32, depth=1, num_heads=2, window_size=4,
                                global_attn_indexes=(0,), out_chans=32, name="student").to_dict(), fh)
    val = image_folder(tmp_path / "val", 2, size=64)
    run = str(tmp_path / "run")
    assert main(["train", "distill", "--teacher", teacher, "--student", student, "--data", "synthetic",
                 "--synthetic-size", "4", "--batch-size", "2", "--steps", "4", "--lr", "3e-3", "--log-every", "1",
                 "--quiet", "--out", run, "--val-data", val, "--val-every", "1", "--ckpt-every", "1",
                 "--keep-last", "5"]) == 0
    assert val_steps(run, "val_mse") == val_steps(run, "val_cosine") == [1, 2, 3, 4]
    assert sorted(os.listdir(os.path.join(run, "val_teacher_store")))
    best = assert_best_is_the_best(run, "val_mse", higher=False)
    assert best["files"] == ["best_student.safetensors", "best_sam_student.pth"]
    saved = load_encoder(checkpoint=os.path.join(run, "best_student.safetensors")).state_dict()
    at_step = load_checkpoint(checkpoint_path(run, best["step"]))["model"]
    assert all(torch.equal(saved[k], at_step[k]) for k in saved)
    full = torch.load(os.path.join(run, "best_sam_student.pth"), weights_only=True)
    assert all(torch.equal(full["image_encoder." + k], v) for k, v in at_step.items())

    # a --teacher-store that holds the validation images too: read from it, nothing computed into the run
    data, store, again = image_folder(tmp_path / "data", 2, size=64, seed=9, prefix="train"), str(tmp_path / "s"), \
        str(tmp_path / "again")
    for folder in (data, val):
        assert main(["embed", folder, "--store", store, "--checkpoint", teacher, "--dtype", "float32", "--quiet"]) == 0
    assert main(["train", "distill", "--teacher", teacher, "--student", student, "--data", data, "--teacher-store",
                 store, "--batch-size", "2", "--steps", "2", "--quiet", "--out", again, "--val-data", val]) == 0
    assert not os.path.exists(os.path.join(again, "val_teacher_store")) and val_steps(again, "val_mse") == [2]


def test_bad_flags_are_usage_errors(tmp_path, val_images, tiny_sam, capsys):
    data = image_folder(tmp_path / "data", 2)
    inner = image_folder(tmp_path / "data" / "inner", 1)
    os.makedirs(tmp_path / "empty")
    os.makedirs(tmp_path / "out2" / "held")
    image_folder(tmp_path / "out2" / "held", 1)
    base = ["train", "mae", "--model", "mae_tiny", "--batch-size", "1", "--steps", "1", "--quiet"]
    cases = [
        (["--data", "synthetic", "--out", str(tmp_path / "a"), "--val-every", "2"], "need --val-data"),
        (["--data", "synthetic", "--out", str(tmp_path / "b"), "--val-data", str(tmp_path / "nope")],
         "--val-data " + str(tmp_path / "nope") + ": no such directory"),
        (["--data", "synthetic", "--out", str(tmp_path / "c"), "--val-data", str(tmp_path / "empty")],
         "no images found"),
        (["--data", data, "--out", str(tmp_path / "d"), "--val-data", data], "is the training data"),
        (["--data", data, "--out", str(tmp_path / "e"), "--val-data", inner], "overlaps the training data"),
        (["--data", "synthetic", "--out", str(tmp_path / "out2"), "--val-data", str(tmp_path / "out2" / "held")],
         "inside"),
        (["--data", "synthetic", "--out", str(tmp_path / "f"), "--val-data", val_images, "--val-every", "0"],
         "--val-every must be a positive number"),
    ]
    for args, message in cases:
        assert main(base + args) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    checkpoint, _ = tiny_sam
    assert main(["train", "sam", "--data", "synthetic", "--checkpoint", checkpoint, "--batch-size", "1", "--steps",
                 "1", "--quiet", "--out", str(tmp_path / "g"), "--val-data", val_images]) == 2  # no masks/
    assert "--val-data " + val_images + ": expected a folder with images/ and masks/" in capsys.readouterr().err
    assert not any(os.path.exists(tmp_path / d) for d in "abcdefg")


def test_validation_goes_to_tensorboard_under_val():
    class Writer:
        def __init__(self):
            self.tags = []

        def add_scalar(self, tag, value, step):
            self.tags.append((tag, step))

        def close(self):
            pass

    writer = Writer()
    import tempfile

    with tempfile.TemporaryDirectory() as run:
        logger = Logger(run, 10, 0, quiet=True, tensorboard=lambda _: writer)
        logger.log(4, {"loss": 1.0, "val_loss": 2.0})
        logger.close()
    assert writer.tags == [("train/loss", 4), ("val/loss", 4)]


@pytest.mark.slow  # about 40 s: a 2-process torchrun start-up and three runs
def test_two_processes_ddp_and_fsdp_validate_as_one(tmp_path, val_images):
    """2 processes (DDP, and FSDP2: the full weights gathered for a copy on the main process) validate at the same
    steps with the val_loss of 1 process at the same global batch (within 1e-5: other batch sums), train the same,
    and write a full best.pt."""
    from tests._torchrun_utils import torchrun_samvit

    common = ["train", "mae", "--data", "synthetic", "--model", "mae_tiny", "--synthetic-size", "8", "--lr", "1e-3",
              "--warmup-steps", "2", "--log-every", "1", "--steps", "4", "--device", "cpu", "--quiet", "--val-data",
              val_images, "--val-every", "2"]
    one, ddp, fsdp = str(tmp_path / "one"), str(tmp_path / "ddp"), str(tmp_path / "fsdp")
    assert main(common + ["--batch-size", "4", "--out", one]) == 0
    two = ["--batch-size", "1", "--accum", "2"]
    torchrun_samvit(tmp_path, [common + two + ["--out", ddp], common + two + ["--fsdp", "--out", fsdp]])
    for run in (ddp, fsdp):
        assert val_steps(run, "val_loss") == val_steps(one, "val_loss") == [2, 4]
        for ra, rb in zip(log(one), log(run)):
            for k in ("loss", "val_loss"):
                if k in ra:
                    assert abs(ra[k] - rb[k]) <= 1e-5 * abs(ra[k]), (run, k, ra, rb)
        assert_best_is_the_best(run, "val_loss", higher=False)
        MaskedAutoencoder(mae_preset("mae_tiny")).load_state_dict(
            torch.load(os.path.join(run, "best.pt"), weights_only=True))  # strict: every key, full shapes
