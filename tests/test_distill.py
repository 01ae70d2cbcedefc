"""`samvit train distill`: a small student learns a (small, random) teacher's embeddings on synthetic shapes; its
embeddings and masks approach the teacher's on held-out images, its full SAM checkpoint loads in segment-anything
with the same logits as samvit's Predictor, and a stopped run resumes exactly."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import TINY, official_tiny_sam
from tests._masks_utils import liven_decoder_
from samvit import EncoderConfig, ImageEncoder, Predictor, load_decoder, load_encoder
from samvit.checkpoints.files import CONFIG_METADATA_KEY, write_tensors
from samvit.checkpoints.load import infer_config
from samvit.cli import main
from samvit.config import DecoderConfig
from samvit.data.preprocess import preprocess
from samvit.train.shapes import render_shapes

TEACHER = TINY  # 256 px, width 64, depth 3, 32-channel embedding on a 16x16 grid
STUDENT = EncoderConfig(img_size=256, embed_dim=32, depth=2, num_heads=2, window_size=4, global_attn_indexes=(1,),
                        out_chans=32, name="student")
DECODER = DecoderConfig(embed_dim=32, image_embedding_size=16, input_image_size=256, mlp_dim=64, num_heads=2,
                        iou_head_hidden_dim=64)
STEPS = 150
HELD_OUT = [render_shapes(i, seed=1234, size=256) for i in range(6)]  # another seed than the training set


def run_args(teacher, student_json, out, steps, extra=()):
    return ["train", "distill", "--teacher", teacher, "--student", student_json, "--data", "synthetic",
            "--synthetic-size", "32", "--batch-size", "4", "--steps", str(steps), "--lr", "3e-3", "--warmup-steps",
            "10", "--weight-decay", "0", "--cosine-weight", "1", "--log-every", "1", "--quiet", "--out", out,
            *extra]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    sam = liven_decoder_(official_tiny_sam(TEACHER, seed=3))
    teacher = str(tmp / "teacher.safetensors")  # full SAM, official names, the encoder config in the metadata
    write_tensors(teacher, sam.state_dict(), {CONFIG_METADATA_KEY: TEACHER.to_json()})
    student_json = str(tmp / "student.json")
    with open(student_json, "w") as fh:
        json.dump(STUDENT.to_dict(), fh)
    run = str(tmp / "run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(run_args(teacher, student_json, run, STEPS)) == 0
    finally:
        torch.set_num_threads(threads)
    return {"tmp": tmp, "teacher": teacher, "student_json": student_json, "run": run, "sam": sam}


def embeddings(encoder, images):
    with torch.inference_mode():
        return torch.cat([encoder(preprocess(s.image, 256).tensor[None]) for s in images])


def cosine(a, b):
    """Mean cosine per embedding position, and the same after removing each channel's mean over the image (what
    a constant per-channel offset cannot explain)."""
    raw = F.cosine_similarity(a, b, dim=1).mean().item()
    centred = F.cosine_similarity(a - a.mean((2, 3), keepdim=True), b - b.mean((2, 3), keepdim=True), dim=1)
    return raw, centred.mean().item()


def masks_iou(pred_a, pred_b, images):
    """Mean IoU of the single-mask outputs of two predictors for a point at the centre of each shape."""
    ious = []
    for s in images:
        pred_a.set_image(s.image), pred_b.set_image(s.image)
        for m in s.masks:
            ys, xs = np.nonzero(m)
            point = np.array([[xs.mean(), ys.mean()]])
            a = pred_a.predict(point, np.array([1]), multimask_output=False)[0][0]
            b = pred_b.predict(point, np.array([1]), multimask_output=False)[0][0]
            union = (a | b).sum()
            ious.append((a & b).sum() / union if union else 1.0)
    return float(np.mean(ious))


def test_student_approaches_teacher(setup):
    run = setup["run"]
    assert sorted(os.listdir(os.path.join(run, "teacher_store"))) and os.path.isfile(os.path.join(run, "log.jsonl"))
    with open(os.path.join(run, "log.jsonl")) as fh:
        log = [json.loads(line) for line in fh]
    assert len(log) == STEPS and log[-1]["loss"] < 0.5 * log[0]["loss"]
    teacher = load_encoder(checkpoint=setup["teacher"])
    student = load_encoder(checkpoint=os.path.join(run, "student.safetensors"))  # config from its metadata
    assert student.config == STUDENT
    torch.manual_seed(0)
    untrained = ImageEncoder(STUDENT).eval()
    t, s, u = embeddings(teacher, HELD_OUT), embeddings(student, HELD_OUT), embeddings(untrained, HELD_OUT)
    (cos_s, cen_s), (cos_u, cen_u) = cosine(s, t), cosine(u, t)
    print(f"held-out cosine: student {cos_s:.3f} (centred {cen_s:.3f}), untrained {cos_u:.3f} (centred {cen_u:.3f})")
    assert cos_s > 0.85 and cos_s > cos_u + 0.5
    assert cen_s > cen_u + 0.3

    decoder = load_decoder(setup["teacher"], DECODER)
    ref = Predictor(teacher, decoder)
    iou_s = masks_iou(ref, Predictor(student, decoder), HELD_OUT)
    iou_u = masks_iou(ref, Predictor(untrained, decoder), HELD_OUT)
    print(f"held-out mask IoU vs the teacher's: student {iou_s:.3f}, untrained {iou_u:.3f}")
    assert iou_s > iou_u + 0.15 and iou_s > 0.55

    # `samvit embed` takes the student like any encoder checkpoint
    from PIL import Image

    img = str(setup["tmp"] / "held_out.png")
    Image.fromarray(HELD_OUT[0].image).save(img)
    out = str(setup["tmp"] / "emb")
    assert main(["embed", img, "--checkpoint", os.path.join(run, "student.safetensors"), "--out", out]) == 0
    from safetensors.torch import load_file

    emb = load_file(os.path.join(out, "held_out.safetensors"))["embedding"]
    assert torch.allclose(emb, s[0], atol=1e-4)


def test_sam_student_loads_in_segment_anything(setup):
    from segment_anything import SamPredictor

    path = os.path.join(setup["run"], "sam_student.pth")
    official = official_tiny_sam(STUDENT, seed=9)  # the same architecture, other weights, then the file's
    official.load_state_dict(torch.load(path, weights_only=True), strict=True)
    ours = Predictor(load_encoder(STUDENT, path), load_decoder(path, DECODER))
    theirs = SamPredictor(official)
    for s in HELD_OUT[:2]:
        ours.set_image(s.image)
        theirs.set_image(s.image)
        ys, xs = np.nonzero(s.masks[0])
        point, label = np.array([[xs.mean(), ys.mean()]]), np.array([1])
        a, iou_a, low_a = ours.predict(point, label, return_logits=True)
        b, iou_b, low_b = theirs.predict(point, label, return_logits=True)
        assert np.abs(a - b).max() <= 1e-4 and np.abs(low_a - low_b).max() <= 1e-4
        assert np.abs(iou_a - iou_b).max() <= 1e-4
    # the decoder is the teacher's, unchanged
    sd = torch.load(path, weights_only=True)
    for k, v in setup["sam"].state_dict().items():
        if not k.startswith("image_encoder."):
            assert torch.equal(sd[k], v), k


def test_resume_equals_straight_run(setup):
    """Stopped at step 4 and resumed to 8: the same losses and the same student as 8 steps at once; the stored
    teacher embeddings are reused, not recomputed."""
    tmp, teacher, js = setup["tmp"], setup["teacher"], setup["student_json"]
    a, b = str(tmp / "a"), str(tmp / "b")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(run_args(teacher, js, a, 8)) == 0
        assert main(run_args(teacher, js, b, 4)) == 0
        store_log = os.path.join(b, "teacher_store")
        before = {f: os.path.getmtime(os.path.join(store_log, f)) for f in os.listdir(store_log)}
        assert main(run_args(teacher, js, b, 8, ["--resume"])) == 0
    finally:
        torch.set_num_threads(threads)
    with open(os.path.join(a, "log.jsonl")) as fa, open(os.path.join(b, "log.jsonl")) as fb:
        la = [(r["step"], r["loss"]) for r in map(json.loads, fa)]
        lb = [(r["step"], r["loss"]) for r in map(json.loads, fb)]
    assert la == lb and len(la) == 8
    sa = load_encoder(checkpoint=os.path.join(a, "student.safetensors")).state_dict()
    sb = load_encoder(checkpoint=os.path.join(b, "student.safetensors")).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    after = {f: os.path.getmtime(os.path.join(store_log, f)) for f in before}
    assert {f: t for f, t in after.items() if f.endswith(".npy")} == {f: t for f, t in before.items()
                                                                       if f.endswith(".npy")}


def test_cli_errors(setup, capsys):
    tmp = setup["tmp"]
    assert main(["train", "distill", "--teacher", setup["teacher"], "--student", "vit_x", "--data", "synthetic",
                 "--out", str(tmp / "e1"), "--batch-size", "2", "--steps", "1"]) == 2
    assert "unknown model preset 'vit_x'" in capsys.readouterr().err
    bad = EncoderConfig(img_size=256, embed_dim=32, depth=2, num_heads=2, window_size=4, global_attn_indexes=(1,),
                        out_chans=16)
    js = str(tmp / "bad.json")
    with open(js, "w") as fh:
        json.dump(bad.to_dict(), fh)
    assert main(["train", "distill", "--teacher", setup["teacher"], "--student", js, "--data", "synthetic",
                 "--out", str(tmp / "e2"), "--batch-size", "2", "--steps", "1"]) == 2
    assert "16 channels, the teacher's 32" in capsys.readouterr().err
    assert main(["train", "distill", "--teacher", setup["teacher"], "--student", setup["student_json"], "--data",
                 "synthetic", "--teacher-store", str(tmp / "nope"), "--out", str(tmp / "e3"), "--batch-size", "2",
                 "--steps", "1"]) == 2
    assert "no such store" in capsys.readouterr().err
    assert not any(os.path.exists(tmp / d) for d in ("e1", "e2", "e3"))  # refused before writing anything


@pytest.mark.parametrize("name,width,heads", [("vit_t", 192, 3), ("vit_s", 384, 6)])
def test_student_presets(name, width, heads, capsys):
    """SAM's arrangement at small width with the same neck: the released decoder's (B,256,64,64) embedding; no
    released weights (samvit info says so)."""
    import samvit

    cfg = samvit.preset(name)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.window_size, cfg.global_attn_indexes, cfg.use_rel_pos,
            cfg.out_chans, cfg.img_size) == (width, 12, heads, 14, (2, 5, 8, 11), True, 256, 1024)
    assert main(["info", "--model", name, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["released_weights"] is False and info["embedding"] == [256, 64, 64]
    assert main(["info", "--model", "vit_b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["released_weights"] is True
    with torch.device("meta"):  # shapes only
        enc = ImageEncoder(cfg)
        assert enc(torch.empty(1, 3, 1024, 1024)).shape == (1, 256, 64, 64)
    # a sam_student.pth of this preset (no metadata) is recognised from its tensors
    assert infer_config(dict(enc.state_dict())).name == name
