"""The training machinery's parts: lr schedule, parameter groups, the MAE augmentation (against torchvision),
synthetic shapes, the distributed/resumable data order, bad images, logging, and the CLI's errors."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from samvit.cli import main
from samvit.config import mae_preset
from samvit.errors import ParameterError
from samvit.modeling.mae import MaskedAutoencoder
from samvit.train.data import IMAGENET_MEAN, IMAGENET_STD, Batches, TrainImages, mae_augment, sample_generator
from samvit.train.log import Logger
from samvit.train.optim import LRSchedule, build_optimizer, param_groups, scaled_lr
from samvit.train.masks_data import ShapeMasks
from samvit.train.shapes import SHAPE_KINDS, SHIFTED_KINDS, SyntheticShapes, render_shapes, render_shifted

TINY_RUN = ["train", "mae", "--data", "synthetic", "--model", "mae_tiny", "--synthetic-size", "8", "--batch-size", "2",
            "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")  # the arithmetic of the one-thread subprocesses


# -- lr schedule and parameter groups

def mae_adjust_learning_rate(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """facebookresearch/mae util/lr_sched.py adjust_learning_rate, transcribed (epochs = steps here)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def test_lr_schedule_is_mae_warmup_then_half_cycle_cosine():
    s = LRSchedule(peak=2e-3, warmup=10, decay=110, min_lr=1e-5)
    for step in range(110):
        assert s(step) == pytest.approx(mae_adjust_learning_rate(step, 2e-3, 1e-5, 10, 110), rel=1e-12)
    assert s(0) == 0 and s(5) == pytest.approx(1e-3) and s(10) == pytest.approx(2e-3)
    assert s(60) == pytest.approx(1e-5 + (2e-3 - 1e-5) / 2)  # half-way down the cosine
    assert s(110) == s(500) == 1e-5
    assert LRSchedule(1e-3, 4)(3) == pytest.approx(7.5e-4) and LRSchedule(1e-3, 4)(10 ** 6) == 1e-3  # no decay
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)  # MAE's 4096-image batch
    opt = build_optimizer(torch.nn.Linear(2, 2), 1.0)
    opt.param_groups[1]["lr_scale"] = 0.5
    assert s.apply(opt, 5) == pytest.approx(1e-3) and opt.param_groups[1]["lr"] == pytest.approx(5e-4)


def test_lr_in_the_log_follows_the_schedule_per_step(tmp_path):
    """--epochs: the cosine spans the run (8 images / batch 2 x 3 epochs = 12 steps), warmup 10% of it; with
    --lr-floor 0 the peak is MAE's rule alone (blr x batch / 256)."""
    out = str(tmp_path / "run")
    assert main(TINY_RUN + ["--epochs", "3", "--log-every", "1", "--lr-floor", "0", "--out", out]) == 0
    with open(os.path.join(out, "log.jsonl")) as fh:
        rows = list(map(json.loads, fh))
    assert [r["step"] for r in rows] == list(range(1, 13)) and rows[-1]["epoch"] == 2
    peak = 1.5e-4 * 2 / 256
    assert [r["lr"] for r in rows] == pytest.approx([mae_adjust_learning_rate(s, peak, 0.0, 1, 12) for s in range(12)])
    assert all(isinstance(r["step"], int) and isinstance(r["loss"], float) for r in rows)


def test_param_groups_no_decay_on_norms_biases_positions_and_tokens():
    model = MaskedAutoencoder(mae_preset("mae_tiny"))
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "pos_embed" not in trainable and "decoder_pos_embed" not in trainable  # fixed sine-cosine: not trained
    expect_no_decay = {n for n in trainable if n.endswith(".bias") or "norm" in n or n in ("cls_token", "mask_token")}
    assert set(no_decay["param_names"]) == expect_no_decay
    assert set(decay["param_names"]) == trainable - expect_no_decay
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "decoder_pred.weight"} <= set(decay["param_names"])
    assert [id(p) for p in decay["params"]] == [id(dict(model.named_parameters())[n]) for n in decay["param_names"]]
    opt = build_optimizer(model, 1e-3)
    assert opt.defaults["betas"] == (0.9, 0.95)
    # a plain model: the ndim rule alone, plus names the model lists
    lin = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    groups = param_groups(lin, 0.1, skip={"0.weight"})
    assert groups[0]["param_names"] == [] and groups[1]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]


# -- data

def test_mae_augment_equals_torchvisions_mae_transform():
    """The oracle: MAE's main_pretrain.py transform_train from torchvision, with the same random draws."""
    from torchvision import transforms as T

    tv = T.Compose([T.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    rgb = np.array(Image.fromarray(render_shapes(3).image).resize((300, 200)))
    for seed in range(12):
        torch.manual_seed(seed)
        want = tv(Image.fromarray(rgb))
        assert torch.equal(mae_augment(rgb, 224, torch.Generator().manual_seed(seed)), want), seed
    # a strip: no crop of an allowed aspect ratio fits in 10 tries, both fall back to the same central crop
    strip = np.random.default_rng(0).integers(0, 255, (12, 400, 3), dtype=np.uint8)
    tv32 = T.Compose([T.RandomResizedCrop(32, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for seed in range(3):
        torch.manual_seed(seed)
        want = tv32(Image.fromarray(strip))
        assert torch.equal(mae_augment(strip, 32, torch.Generator().manual_seed(seed)), want), seed


def test_synthetic_shapes_are_deterministic_with_instance_masks():
    a, b, c = render_shapes(7, seed=1), render_shapes(7, seed=1), render_shapes(8, seed=1)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (224, 224, 3) and a.image.dtype == np.uint8
    for i in range(20):
        s = render_shapes(i, size=96)
        masks = s.masks
        assert 1 <= len(s.kinds) <= 4 and set(s.kinds) <= set(SHAPE_KINDS)
        assert masks.shape[1:] == (96, 96) and len(masks) >= 1
        assert masks.sum(0).max() <= 1  # instances do not overlap (later shapes cover earlier ones)
        assert np.array_equal(masks.any(0), s.labels > 0)
        for m in masks:  # a shape has its own colour: its pixels differ from the background around it
            assert m.sum() > 0
    ds = SyntheticShapes(5, size=64, seed=2)
    assert len(ds) == 5 and np.array_equal(ds.load(3), render_shapes(3, 2, 64).image)
    with pytest.raises(IndexError):
        ds[5]



def test_shifted_shapes_are_another_deterministic_distribution():
    from scipy import ndimage

    a, b = render_shifted(5, seed=3, size=128), render_shifted(5, seed=3, size=128)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, render_shapes(5, seed=3, size=128).image)
    kinds, holes = [], 0
    for i in range(20):
        s = render_shifted(i, size=128)
        masks = s.masks
        assert 2 <= len(s.kinds) <= 6 and set(s.kinds) <= set(SHIFTED_KINDS)
        assert masks.shape[1:] == (128, 128) and masks.sum(0).max() <= 1
        assert np.array_equal(masks.any(0), s.labels > 0)
        kinds += s.kinds
        for k, kind in enumerate(s.kinds, 1):  # a ring has a hole: filling it adds background pixels
            m = s.labels == k
            holes += kind == "ring" and m.any() and ndimage.binary_fill_holes(m).sum() > m.sum()
    assert set(kinds) == set(SHIFTED_KINDS) and holes > 0
    src = ShapeMasks(3, size=64, seed=4, style="shifted")
    rgb, masks, _ = src.load(2)
    assert np.array_equal(rgb, render_shifted(2, 4, 64).image) and len(masks) >= 1
    assert src.key(2) == "shifted_000002.png" and src.name(2) == "shifted:4:2"
    with pytest.raises(ParameterError, match="style 'blobs'"):
        SyntheticShapes(3, style="blobs")

def test_batches_split_over_processes_and_resume_mid_epoch():
    ds = TrainImages(SyntheticShapes(12, size=32), 32)
    one = Batches(ds, 4, seed=3)
    ranks = [Batches(ds, 2, world=2, rank=r, seed=3) for r in range(2)]
    assert one.per_epoch == 3 and ranks[0].per_epoch == 3
    seen = []
    for _ in range(5):  # crosses the epoch boundary
        b1, r0, r1 = next(one), next(ranks[0]), next(ranks[1])
        assert sorted(b1["index"].tolist()) == sorted(r0["index"].tolist() + r1["index"].tolist())
        by_index = dict(zip(b1["index"].tolist(), b1["image"]))
        for r in (r0, r1):  # the same sample (same epoch and index) is the same tensor wherever it is drawn
            for i, img in zip(r["index"].tolist(), r["image"]):
                assert torch.equal(by_index[i], img)
        seen.append(b1)
    assert (one.epoch, one.pos) == (1, 2)
    assert sorted(torch.cat([b["index"] for b in seen[:3]]).tolist()) == list(range(12))  # an epoch is a permutation
    assert not torch.equal(seen[0]["image"][0], seen[3]["image"][0]) or seen[0]["index"][0] != seen[3]["index"][0]
    later = Batches(ds, 4, seed=3, epoch=1, pos=1, num_workers=1)  # resumed mid-epoch, in a worker process
    assert torch.equal(next(later)["image"], seen[4]["image"])


def test_bad_images_are_skipped_and_logged(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(data / "a.png")
    Image.fromarray(rng.integers(0, 255, (50, 50), dtype=np.uint8)).save(data / "sub" / "gray.jpg")  # L -> RGB
    Image.fromarray(rng.integers(0, 255, (64, 30, 4), dtype=np.uint8)).save(data / "sub" / "rgba.png")
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (data / "empty.jpg").write_bytes(b"")
    out = str(tmp_path / "run")
    assert main(["train", "mae", "--data", str(data), "--model", "mae_tiny", "--batch-size", "5", "--steps", "2",
                 "--num-workers", "0", "--quiet", "--out", out]) == 0
    with open(os.path.join(out, "bad_images.jsonl")) as fh:
        bad = [json.loads(line) for line in fh]
    assert sorted(os.path.basename(b["path"]) for b in bad) == ["broken.png", "empty.jpg"]  # once each
    assert all(b["error"] for b in bad)


def test_logger_writes_jsonl_and_tensorboard_scalars(tmp_path):
    calls = []

    class FakeWriter:
        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def close(self):
            calls.append("closed")

    logger = Logger(str(tmp_path), total_steps=10, start_step=0, quiet=True, tensorboard=lambda d: FakeWriter())
    logger.log(3, {"loss": torch.tensor(0.5).item(), "lr": 1e-4, "epoch": 0})
    logger.close()
    assert json.loads((tmp_path / "log.jsonl").read_text()) == {"step": 3, "loss": 0.5, "lr": 1e-4, "epoch": 0}
    assert ("train/loss", 0.5, 3) in calls and calls[-1] == "closed"
    off = Logger(str(tmp_path / "nowhere"), 10, 0, enabled=False)  # other ranks write nothing
    off.log(1, {"loss": 1.0})
    off.close()
    assert not (tmp_path / "nowhere").exists()


def test_sample_generator_depends_on_seed_epoch_and_index():
    draws = {(s, e, i): torch.rand(1, generator=sample_generator(s, e, i)).item()
             for s in (0, 1) for e in (0, 1) for i in (0, 1)}
    assert len(set(draws.values())) == 8
    assert torch.rand(1, generator=sample_generator(1, 0, 1)).item() == draws[(1, 0, 1)]


# -- the CLI

def error_of(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert "no such directory" in error_of(capsys, ["train", "mae", "--data", str(tmp_path / "nope"), "--model",
                                                    "mae_tiny", "--batch-size", "2", "--steps", "1", "--out", out])
    (tmp_path / "empty").mkdir()
    assert "no images found" in error_of(capsys, ["train", "mae", "--data", str(tmp_path / "empty"), "--model",
                                                  "mae_tiny", "--batch-size", "2", "--steps", "1", "--out", out])
    for bad, word in ((["--batch-size", "0", "--steps", "1"], "--batch-size"),
                      (["--batch-size", "2", "--steps", "-3"], "--steps"),
                      (["--batch-size", "2", "--steps", "1", "--accum", "0"], "--accum"),
                      (["--batch-size", "2", "--steps", "1", "--lr", "-1"], "--lr"),
                      (["--batch-size", "2", "--steps", "1", "--mask-ratio", "1.5"], "--mask-ratio"),
                      (["--batch-size", "2", "--steps", "1", "--warmup-steps", "5", "--decay-steps", "5"],
                       "--decay-steps"),
                      (["--batch-size", "2", "--steps", "1", "--synthetic-size", "1"], "fewer than one batch"),
                      (["--batch-size", "2", "--steps", "1", "--fsdp"], "torchrun")):
        argv = ["train", "mae", "--data", "synthetic", "--model", "mae_tiny", "--out", out + "x"] + bad
        assert word in error_of(capsys, argv), bad
    assert "fp16 is refused" in error_of(capsys, ["train", "mae", "--data", "synthetic", "--model", "mae_vit_h",
                                                  "--batch-size", "2", "--steps", "1", "--precision", "fp16",
                                                  "--out", out + "h"])
    assert not os.path.exists(out) and not os.path.exists(out + "h")
    # an existing run: refused without --resume, and with --resume under another config
    assert main(TINY_RUN + ["--steps", "1", "--out", out]) == 0
    capsys.readouterr()
    assert "pass --resume" in error_of(capsys, TINY_RUN + ["--steps", "2", "--out", out])
    err = error_of(capsys, TINY_RUN + ["--steps", "2", "--seed", "5", "--out", out])
    assert "different config" in err and "seed" in err
    assert "different config" in error_of(capsys, TINY_RUN + ["--steps", "2", "--lr", "1e-2", "--resume",
                                                              "--out", out])
    os.makedirs(tmp_path / "other")
    (tmp_path / "other" / "x.txt").write_text("x")
    assert "not empty" in error_of(capsys, TINY_RUN + ["--steps", "1", "--out", str(tmp_path / "other")])
    # export-encoder
    assert "no such run directory" in error_of(capsys, ["train", "export-encoder", str(tmp_path / "nope"),
                                                        "--preset", "vit_b", "--out", str(tmp_path / "e.safetensors")])
    assert "outside it" in error_of(capsys, ["train", "export-encoder", out, "--preset", "vit_b", "--out",
                                             os.path.join(out, "e.safetensors")])
    assert "does not fit" in error_of(capsys, ["train", "export-encoder", out, "--preset", "vit_b", "--out",
                                               str(tmp_path / "e.safetensors")])
    assert "name a task" in error_of(capsys, ["train"])
    with pytest.raises(SystemExit):  # argparse: --steps and --epochs together
        main(TINY_RUN + ["--steps", "1", "--epochs", "1", "--out", out])


def test_export_encoder_from_a_run_directory(tmp_path):
    import samvit

    out = str(tmp_path / "run")
    assert main(TINY_RUN + ["--steps", "1", "--out", out]) == 0
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"embed_dim": 64, "depth": 3, "num_heads": 2, "global_attn_indexes": [2],
                               "out_chans": 32, "name": "tiny_from_mae"}))
    enc_path = str(tmp_path / "enc.safetensors")
    assert main(["train", "export-encoder", out, "--preset", str(cfg), "--out", enc_path]) == 0
    enc = samvit.load_encoder(None, enc_path)
    state = torch.load(os.path.join(out, "ckpt_00000001.pt"), weights_only=True)["model"]
    assert torch.equal(enc.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])
    assert torch.equal(enc.patch_embed.proj.weight, state["patch_embed.proj.weight"])
    assert enc.config.name == "tiny_from_mae" and enc.config.img_size == 1024
