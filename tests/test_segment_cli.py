"""`samvit segment`: prompts -> mask PNG and overlay, --embedding, --auto JSON, clean errors."""
from __future__ import annotations

import glob
import json
from functools import partial

import numpy as np
import pytest
import torch
from tests._masks_utils import liven_decoder_
from tests.helpers import TINY, randomize_
from PIL import Image
from safetensors.torch import save_file

from samvit.masks.automatic import AutomaticMaskGenerator, rle_to_coco_string
from samvit.cli import main


def _official_tiny_sam_8_heads():
    """An official Sam with the TINY encoder and a small decoder with 8 heads (the released head count, which is
    what load_decoder assumes since a checkpoint does not record it)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    c = TINY
    enc = ImageEncoderViT(img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth,
                          num_heads=c.num_heads, out_chans=c.out_chans, qkv_bias=True,
                          norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                          window_size=c.window_size, global_attn_indexes=c.global_attn_indexes)
    g = c.grid_size
    sam = Sam(enc, PromptEncoder(embed_dim=c.out_chans, image_embedding_size=(g, g),
                                 input_image_size=(c.img_size, c.img_size), mask_in_chans=16),
              MaskDecoder(transformer_dim=c.out_chans, iou_head_hidden_dim=64,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=c.out_chans, mlp_dim=64, num_heads=8)))
    return liven_decoder_(randomize_(sam, 5).eval())


@pytest.fixture(scope="module")
def setup(tmp_path_factory, coffee):
    """A full SAM checkpoint (.safetensors with the encoder config in its metadata), the photo as PNG, the model."""
    from segment_anything import SamPredictor

    d = tmp_path_factory.mktemp("segment")
    sam = _official_tiny_sam_8_heads()
    ckpt = str(d / "tiny_sam.safetensors")
    save_file({k: v.contiguous() for k, v in sam.state_dict().items() if not k.startswith("pixel_")}, ckpt,
              metadata={"samvit_config": TINY.to_json()})
    image = str(d / "coffee.png")
    Image.fromarray(coffee).save(image)
    official = SamPredictor(sam)
    official.set_image(coffee)
    return d, ckpt, image, official


def _run(args, capsys):
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _assert_mask_matches(mask_png, official, **prompt):
    masks, scores, _ = official.predict(**prompt)
    logits, _, _ = official.predict(**prompt, return_logits=True)
    best = int(np.argmax(scores))
    got = _png(mask_png)
    assert got.dtype == np.uint8 and got.shape == masks.shape[1:] and set(np.unique(got)) <= {0, 255}
    # the CLI encodes with the fast attention path (embedding within ~1e-6 of the official)
    assert not (((got == 255) != masks[best]) & (np.abs(logits[best]) > 1e-3)).any()
    assert 0.01 < masks[best].mean() < 0.99
    return scores[best]


def test_points_mask_and_overlay(setup, coffee, capsys):
    d, ckpt, image, official = setup
    out, overlay = d / "m.png", d / "ov.png"
    rc, stdout, _ = _run(["segment", image, "--point", "350,180", "--point", "120.5,300,0", "--checkpoint", ckpt,
                          "--out", str(out), "--overlay", str(overlay)], capsys)
    assert rc == 0
    _assert_mask_matches(out, official, point_coords=np.array([[350, 180], [120.5, 300]]),
                         point_labels=np.array([1, 0]), multimask_output=False)
    summary = json.loads(stdout)
    assert summary["area"] == int((_png(out) == 255).sum()) and len(summary["candidates"]) == 1
    ov = _png(overlay)
    assert ov.shape == coffee.shape
    inside = _png(out) == 255
    assert not np.array_equal(ov[inside], coffee[inside]) and np.array_equal(ov[~inside][:1000], coffee[~inside][:1000])


def test_multimask_picks_highest_score(setup, capsys, monkeypatch):
    d, ckpt, image, official = setup
    monkeypatch.setenv("SAMVIT_CHECKPOINT", ckpt)  # default checkpoint from the environment
    out = d / "mm.png"
    rc, stdout, _ = _run(["segment", image, "--point", "200,300", "--multimask", "--out", str(out)], capsys)
    assert rc == 0
    best = _assert_mask_matches(out, official, point_coords=np.array([[200, 300]]), point_labels=np.array([1]),
                                multimask_output=True)
    summary = json.loads(stdout)
    assert len(summary["candidates"]) == 3 and abs(summary["predicted_iou"] - best) <= 1e-4


def test_box_with_precomputed_embedding(setup, capsys):
    d, ckpt, image, official = setup
    assert _run(["embed", image, "--checkpoint", ckpt, "--out", str(d / "emb"), "--quiet"], capsys)[0] == 0
    emb = glob.glob(str(d / "emb" / "**" / "*.safetensors"), recursive=True)
    assert len(emb) == 1
    a, b = d / "box_direct.png", d / "box_emb.png"
    for out, extra in ((a, []), (b, ["--embedding", emb[0]])):
        rc, _, err = _run(["segment", image, "--box", "60,40,420,350", "--checkpoint", ckpt, "--out", str(out),
                           "--quiet", *extra], capsys)
        assert rc == 0, err
    assert np.array_equal(_png(a), _png(b))
    _assert_mask_matches(b, official, box=np.array([60, 40, 420, 350]), multimask_output=False)
    # an embedding of another image size is refused
    small = d / "small.png"
    Image.fromarray(np.zeros((50, 70, 3), np.uint8)).save(small)
    rc, _, err = _run(["segment", str(small), "--box", "1,1,20,20", "--checkpoint", ckpt, "--out", str(d / "x.png"),
                       "--embedding", emb[0]], capsys)
    assert rc == 2 and "holds the embedding of an image of size (400, 600)" in err


def test_embedding_store(setup, capsys):
    """An embedding from `samvit embed --store` (float16 by default) gives the mask without the encoder."""
    d, ckpt, image, official = setup
    store = str(d / "store")
    rc, _, err = _run(["embed", image, "--checkpoint", ckpt, "--store", store, "--quiet"], capsys)
    assert rc == 0, err
    a, b = d / "pt_direct.png", d / "pt_store.png"
    prompt = ["--point", "350,180", "--point", "120.5,300,0"]
    assert _run(["segment", image, *prompt, "--checkpoint", ckpt, "--out", str(a), "--quiet"], capsys)[0] == 0
    rc, _, err = _run(["segment", image, *prompt, "--checkpoint", ckpt, "--out", str(b), "--quiet", "--store", store],
                      capsys)
    assert rc == 0, err
    logits, _, _ = official.predict(point_coords=np.array([[350, 180], [120.5, 300]]), point_labels=np.array([1, 0]),
                                    multimask_output=False, return_logits=True)
    differ = _png(a) != _png(b)
    assert not (differ & (np.abs(logits[0]) > 0.05)).any()  # float16 storage moves logits by ~1e-3
    rc, _, err = _run(["segment", image, *prompt, "--checkpoint", ckpt, "--out", str(b), "--store", store,
                       "--key", "nope.png", "--force"], capsys)
    assert rc == 2 and "'nope.png' is not in the store" in err


def test_auto_json_and_overlay(setup, coffee, capsys):
    from samvit import Predictor

    d, ckpt, image, _ = setup
    out, overlay = d / "masks.json", d / "auto.png"
    settings = ["--points-per-side", "4", "--pred-iou-thresh", "0.5", "--stability-score-thresh", "0.5",
                "--box-nms-thresh", "1.0"]
    rc, stdout, err = _run(["segment", image, "--auto", "--checkpoint", ckpt, "--out", str(out),
                            "--overlay", str(overlay), *settings], capsys)
    assert rc == 0, err
    doc = json.loads(out.read_text())
    assert doc["image"] == {"file_name": "coffee.png", "height": 400, "width": 600}
    anns = doc["annotations"]
    assert len(anns) > 0 and json.loads(stdout)["masks"] == len(anns)
    ref = AutomaticMaskGenerator(Predictor.from_checkpoint(ckpt), points_per_side=4, pred_iou_thresh=0.5,
                                 stability_score_thresh=0.5, box_nms_thresh=1.0, output_mode="coco_rle",
                                 progress=False).generate(coffee)
    assert [a["segmentation"] for a in anns] == [r["segmentation"] for r in ref]
    assert [a["id"] for a in anns] == list(range(len(anns)))
    assert set(anns[0]) == {"id", "segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score",
                            "crop_box"}
    assert _png(overlay).shape == coffee.shape
    mask_utils = pytest.importorskip("pycocotools.mask")
    assert int(mask_utils.area(anns[0]["segmentation"])) == anns[0]["area"]
    # uncompressed counts on request
    rc, _, _ = _run(["segment", image, "--auto", "--checkpoint", ckpt, "--out", str(d / "u.json"), "--rle",
                     "uncompressed", "--quiet", *settings], capsys)
    u = json.loads((d / "u.json").read_text())["annotations"]
    assert [rle_to_coco_string(a["segmentation"]) for a in u] == [a["segmentation"] for a in anns]


@pytest.mark.parametrize("args,message", [
    (["--point", "700,10"], "outside the image"),
    (["--point", "a,b"], "expected comma-separated numbers"),
    (["--point", "1,2,3,4"], "expected 2 or 3"),
    (["--point", "10,10,2"], "LABEL must be 1"),
    (["--box", "100,10,50,200"], "x1 >= x0"),
    (["--box", "1,2,3"], "expected 4"),
    ([], "give prompts"),
    (["--auto", "--point", "1,1"], "not both"),
])
def test_bad_prompts_exit_2(setup, capsys, args, message):
    d, ckpt, image, _ = setup
    rc, _, err = _run(["segment", image, "--checkpoint", ckpt, "--out", str(d / "bad.png"), *args], capsys)
    assert rc == 2 and message in err and "Traceback" not in err


def test_missing_checkpoint(setup, capsys, monkeypatch):
    d, _, image, _ = setup
    monkeypatch.delenv("SAMVIT_CHECKPOINT", raising=False)
    rc, _, err = _run(["segment", image, "--point", "1,1", "--out", str(d / "n.png")], capsys)
    assert rc == 2 and "no checkpoint" in err
    enc_only = d / "encoder_only.safetensors"
    from safetensors.torch import load_file

    sd = load_file(setup[1])
    save_file({k: v for k, v in sd.items() if k.startswith("image_encoder.")}, str(enc_only),
              metadata={"samvit_config": TINY.to_json()})
    rc, _, err = _run(["segment", image, "--point", "1,1", "--checkpoint", str(enc_only), "--out",
                       str(d / "n.png")], capsys)
    assert rc == 2 and "prompt_encoder" in err
