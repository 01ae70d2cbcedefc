"""Mask data: folders (grey, palette, 16-bit and RGB label PNGs), COCO polygons / RLE / uncompressed RLE (decoded
as pycocotools decodes them), masks resized and padded like the image, bad or empty annotations skipped and
counted, never a crash."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from samvit.data.preprocess import get_preprocess_shape
from samvit.train.masks_data import (CocoMasks, MaskFolder, MaskSamples, labels_to_masks, low_res_targets,
                                     open_masks)


def rects(h: int, w: int) -> np.ndarray:
    a = np.zeros((3, h, w), dtype=bool)
    a[0, 5:20, 4:30] = True
    a[1, 25:40, 10:18] = True
    a[2, 2:8, 40:55] = True
    return a


def test_mask_folder_label_kinds_and_problems(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    masks = rects(48, 64)
    img = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    labels = np.zeros((48, 64), np.uint16)
    for k, m in enumerate(masks):
        labels[m] = [1, 7, 300][k]
    Image.fromarray(img).save(tmp_path / "images" / "a16.png")
    Image.fromarray(labels).save(tmp_path / "masks" / "a16.png")  # 16-bit labels
    Image.fromarray(img).save(tmp_path / "images" / "grey.jpg")
    Image.fromarray((labels > 0).astype(np.uint8) * 3 + masks[1]).save(tmp_path / "masks" / "grey.png")  # 3 and 4
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[masks[0]] = (255, 0, 0)
    rgb[masks[2]] = (0, 0, 1)
    Image.fromarray(img).save(tmp_path / "images" / "colour.png")
    Image.fromarray(rgb).save(tmp_path / "masks" / "colour.png")
    Image.fromarray(img).save(tmp_path / "images" / "nomask.png")
    Image.fromarray(img).save(tmp_path / "images" / "wrongsize.png")
    Image.fromarray(np.ones((10, 10), np.uint8)).save(tmp_path / "masks" / "wrongsize.png")
    src = open_masks(str(tmp_path))
    assert isinstance(src, MaskFolder) and src.problems == {"image without mask": 1}
    by_key = {src.key(i): i for i in range(len(src))}
    _, got, _ = src.load(by_key["a16.png"])
    assert np.array_equal(got, masks)
    _, got, _ = src.load(by_key["grey.jpg"])
    assert len(got) == 2 and np.array_equal(got[1], masks[1])
    _, got, _ = src.load(by_key["colour.png"])
    assert len(got) == 2 and {tuple(np.argwhere(m)[0]) for m in got} == {(5, 4), (2, 40)}
    ds = MaskSamples(src, 128, 32, 2, report=str(tmp_path / "skipped.jsonl"))
    for i in range(len(src)):  # the mismatched mask is skipped and reported, its key served by the next image
        assert ds[(0, i)]["valid"].any()
    lines = [json.loads(ln) for ln in open(tmp_path / "skipped.jsonl")]
    assert len(lines) == 1 and "wrongsize" in lines[0]["item"] and "mask is 10x10" in lines[0]["reason"]


def test_low_res_targets_follow_the_image_resize_and_padding():
    h, w = 60, 100  # -> input 77 x 128 (long side 128), padded to 128 x 128, low-res 32 x 32
    full = np.ones((1, h, w), dtype=bool)
    nh, nw = get_preprocess_shape(h, w, 128)
    t = low_res_targets(full, 128, 32)[0]
    assert nh == 77 and t[:19].all() and not t[19:].any()  # rows 0..18 lie inside the 77 resized rows
    left = np.zeros((1, h, w), dtype=bool)
    left[:, :, :50] = True
    t = low_res_targets(left, 128, 32)[0]
    assert np.flatnonzero(t.any(0))[-1] == nw // 2 // 4 - 1  # half the width: columns 0..15


def coco_file(tmp_path, masks: np.ndarray, img: np.ndarray) -> str:
    Image.fromarray(img).save(tmp_path / "a.png")
    h, w = img.shape[:2]
    rle = mask_utils.encode(np.asfortranarray(masks[1].astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    flat = masks[2].flatten(order="F").astype(np.uint8)  # uncompressed RLE: run lengths, column-major, zeros first
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    anns = [
        {"id": 1, "image_id": 1, "segmentation": [[4, 5, 30, 5, 30, 20, 4, 20]], "iscrowd": 0},  # polygon
        {"id": 2, "image_id": 1, "segmentation": rle, "iscrowd": 0},  # compressed RLE
        {"id": 3, "image_id": 1, "segmentation": {"size": [h, w], "counts": counts}, "iscrowd": 0},
        {"id": 4, "image_id": 1, "segmentation": [[1, 2, 3]], "iscrowd": 0},  # malformed polygon
        {"id": 5, "image_id": 1, "segmentation": rle, "iscrowd": 1},  # crowd
        {"id": 6, "image_id": 1},  # no segmentation
        {"id": 7, "image_id": 1, "segmentation": {"size": [h, w], "counts": [h * w]}, "iscrowd": 0},  # empty
        {"id": 8, "image_id": 1, "segmentation": {"size": [h + 1, w], "counts": "xyz"}, "iscrowd": 0},  # bad RLE
        {"id": 9, "image_id": 2, "segmentation": [[0, 0, 5, 0, 5, 5]], "iscrowd": 0},  # its image file is missing
    ]
    images = [{"id": 1, "file_name": "a.png", "height": h, "width": w},
              {"id": 2, "file_name": "missing.png", "height": h, "width": w},
              {"id": 3, "file_name": "unannotated.png"}]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": []}))
    return str(path)


def test_coco_polygons_rle_and_counted_problems(tmp_path):
    masks = rects(48, 64)
    img = np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    src = open_masks(coco_file(tmp_path, masks, img), images=str(tmp_path))
    assert isinstance(src, CocoMasks) and len(src) == 1
    assert src.problems == {"malformed polygon": 1, "crowd region": 1, "no segmentation": 1,
                            "image file missing": 1, "image without usable annotations": 1}
    rgb, got, problems = src.load(0)
    assert np.array_equal(rgb, img) and len(got) == 3
    poly = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[4, 5, 30, 5, 30, 20, 4, 20]], 48, 64)))
    assert np.array_equal(got[0], poly.astype(bool))
    assert np.array_equal(got[1], masks[1]) and np.array_equal(got[2], masks[2])
    assert sorted(r.split(" (")[0] for _, r in problems) == ["cannot decode segmentation", "empty mask"]


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="needs --images"):
        open_masks(str(tmp_path / "x.json"))
    with pytest.raises(FileNotFoundError, match="images/ and masks/"):
        open_masks(str(tmp_path))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read a COCO"):
        open_masks(str(tmp_path / "bad.json"), images=str(tmp_path))
    with pytest.raises(ValueError, match="masks-per-image"):
        MaskSamples(open_masks("synthetic", synthetic_size=2), 128, 32, 0)
    assert labels_to_masks(np.zeros((4, 4), np.uint8)).shape == (0, 4, 4)
    assert torch.is_tensor(MaskSamples(open_masks("synthetic", synthetic_size=2, synthetic_px=64), 128, 32, 3)[0]
                           ["image"])
