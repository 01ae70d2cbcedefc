"""AutomaticMaskGenerator vs the official SamAutomaticMaskGenerator (same random weights), and its pieces."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tests._masks_utils import liven_decoder_, samvit_models
from tests.helpers import TINY, official_tiny_sam

from samvit import AutomaticMaskGenerator, Predictor
from samvit.masks.automatic import (box_nms, build_point_grid, generate_crop_boxes, mask_to_rle, masks_to_boxes,
                              remove_small_regions, rle_area, rle_to_coco_string, rle_to_mask)


@pytest.fixture(scope="module")
def models():
    sam = liven_decoder_(official_tiny_sam())
    return sam, Predictor(*samvit_models(sam, TINY, num_heads=2))


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def assert_same_records(official, ours):
    """Same number of masks; each official mask has one of ours with IoU >= 0.99 (and the reverse), with the
    same scores, box, area and prompt point. In practice the lists are equal in order and mask for mask."""
    assert len(ours) == len(official)
    masks0 = [rle_to_mask(r["segmentation"]) for r in official]
    masks1 = [rle_to_mask(r["segmentation"]) for r in ours]
    iou = np.array([[_mask_iou(a, b) for b in masks1] for a in masks0]).reshape(len(masks0), len(masks1))
    if len(official):
        assert (iou.max(1) >= 0.99).all() and (iou.max(0) >= 0.99).all()
    used = set()
    for i, r0 in enumerate(official):  # pair up; among equal masks, by the closest predicted IoU
        j = min((j for j in range(len(ours)) if iou[i, j] >= 0.99 and j not in used),
                key=lambda j: abs(ours[j]["predicted_iou"] - r0["predicted_iou"]))
        used.add(j)
        r1 = ours[j]
        assert r1["bbox"] == r0["bbox"] and r1["crop_box"] == r0["crop_box"]
        assert abs(r1["area"] - r0["area"]) <= 0.01 * max(r0["area"], 1)
        assert abs(r1["predicted_iou"] - r0["predicted_iou"]) <= 1e-4
        assert abs(r1["stability_score"] - r0["stability_score"]) <= 1e-3
        assert np.allclose(r1["point_coords"], r0["point_coords"])
    return iou


SETTINGS = {
    # random weights: predicted IoUs spread around 1 +- 1.3 and stability around 0.6 +- 0.2 (see liven_decoder_),
    # so these thresholds keep some masks and drop others. Random-weight masks are speckled over the whole image,
    # so their boxes nearly coincide: box_nms_thresh 1.0 keeps the duplicates (a large set to compare), and the
    # default 0.7 leaves one per crop.
    "no-nms": dict(points_per_side=4, pred_iou_thresh=0.5, stability_score_thresh=0.5, box_nms_thresh=1.0),
    "nms": dict(points_per_side=4, pred_iou_thresh=0.5, stability_score_thresh=0.3, box_nms_thresh=0.7),
    "crops": dict(points_per_side=4, pred_iou_thresh=0.5, stability_score_thresh=0.5, box_nms_thresh=1.0,
                  crop_n_layers=1, crop_n_points_downscale_factor=2),
    "small-regions": dict(points_per_side=3, pred_iou_thresh=0.5, stability_score_thresh=0.5, box_nms_thresh=1.0,
                          min_mask_region_area=200),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_automatic_masks_match_official(models, coffee, name):
    from segment_anything import SamAutomaticMaskGenerator

    kwargs = dict(SETTINGS[name], output_mode="uncompressed_rle")
    if kwargs.get("min_mask_region_area"):
        pytest.importorskip("cv2", reason="the official small-region removal needs OpenCV")
    sam, predictor = models
    official = SamAutomaticMaskGenerator(sam, **kwargs).generate(coffee)
    ours = AutomaticMaskGenerator(predictor, progress=False, **kwargs).generate(coffee)
    assert len(official) > 0
    iou = assert_same_records(official, ours)
    if name == "no-nms":
        assert len(ours) >= 10
        assert np.array_equal(iou.argmax(1), np.arange(len(ours)))  # same order too


def test_thresholds_filter_something(models, coffee):
    """The comparison settings are not vacuous: each filter removes masks that a looser one keeps."""
    _, predictor = models
    n = {}
    for thr in ((0.0, 0.0), (0.5, 0.0), (0.5, 0.5)):
        gen = AutomaticMaskGenerator(predictor, points_per_side=4, pred_iou_thresh=thr[0],
                                     stability_score_thresh=thr[1], box_nms_thresh=1.0, progress=False)
        n[thr] = len(gen.generate(coffee))
    assert n[(0.0, 0.0)] > n[(0.5, 0.0)] > n[(0.5, 0.5)] > 0, n


def test_generate_from_embedding_and_output_modes(models, coffee):
    _, predictor = models
    kw = dict(points_per_side=4, pred_iou_thresh=0.5, stability_score_thresh=0.5, box_nms_thresh=1.0,
              progress=False)
    rle = AutomaticMaskGenerator(predictor, output_mode="uncompressed_rle", **kw).generate(coffee)
    predictor.set_image(coffee)
    from_emb = AutomaticMaskGenerator(predictor, output_mode="uncompressed_rle", **kw).generate()
    assert [r["segmentation"] for r in from_emb] == [r["segmentation"] for r in rle]
    binary = AutomaticMaskGenerator(predictor, output_mode="binary_mask", **kw).generate()
    assert all(np.array_equal(b["segmentation"], rle_to_mask(r["segmentation"])) for b, r in zip(binary, rle))
    assert all(b["segmentation"].shape == coffee.shape[:2] and b["segmentation"].dtype == bool for b in binary)
    coco = AutomaticMaskGenerator(predictor, output_mode="coco_rle", **kw).generate()
    assert all(isinstance(c["segmentation"]["counts"], str) for c in coco)
    with pytest.raises(ValueError, match="needs the image"):
        AutomaticMaskGenerator(predictor, crop_n_layers=1, **kw).generate()


def test_bad_settings():
    p = object()
    with pytest.raises(ValueError, match="exactly one of points_per_side and point_grids"):
        AutomaticMaskGenerator(p, points_per_side=None)
    with pytest.raises(ValueError, match="output_mode"):
        AutomaticMaskGenerator(p, output_mode="png")
    with pytest.raises(ValueError, match="point_grids: 1 grids for 2 crop layers"):
        AutomaticMaskGenerator(p, points_per_side=None, point_grids=[build_point_grid(2)], crop_n_layers=1)


# ---- the pieces, against the official helpers and torchvision ----

def test_box_nms_matches_torchvision():
    from torchvision.ops import nms

    g = torch.Generator().manual_seed(0)
    for n in (0, 1, 7, 300):
        xy = torch.randint(0, 80, (n, 2), generator=g)
        wh = torch.randint(0, 40, (n, 2), generator=g)  # includes zero-area boxes
        boxes = torch.cat([xy, xy + wh], 1)
        boxes[n // 2:n // 2 + 3] = boxes[:3] if n > 6 else boxes[n // 2:n // 2 + 3]  # exact duplicates
        scores = torch.rand(n, generator=g).round(decimals=1)  # many ties
        for thr in (0.0, 0.3, 0.7, 1.0):
            ours, ref = box_nms(boxes, scores, thr), nms(boxes.float(), scores, thr)
            assert set(ours.tolist()) == set(ref.tolist())
            assert torch.equal(scores[ours], scores[ref])


def test_rle_and_boxes_match_official():
    from segment_anything.utils.amg import (area_from_rle, batched_mask_to_box, build_all_layer_point_grids,
                                            generate_crop_boxes as official_crops, mask_to_rle_pytorch)
    from segment_anything.utils.amg import rle_to_mask as official_rle_to_mask

    g = torch.Generator().manual_seed(1)
    masks = torch.rand(6, 37, 53, generator=g) > 0.6
    masks[0] = False
    masks[1] = True
    masks[2, 5:9, 11:30] = True
    ours, ref = mask_to_rle(masks), mask_to_rle_pytorch(masks)
    assert ours == ref
    for r in ours:
        assert np.array_equal(rle_to_mask(r), official_rle_to_mask(r))
        assert rle_area(r) == area_from_rle(r)
    assert torch.equal(masks_to_boxes(masks), batched_mask_to_box(masks))
    for size in ((400, 600), (1024, 77), (5, 5)):
        for layers in (0, 1, 2):
            assert generate_crop_boxes(size, layers, 512 / 1500) == official_crops(size, layers, 512 / 1500)
    assert all(np.array_equal(build_point_grid(n), build_all_layer_point_grids(n, 0, 1)[0]) for n in (1, 4, 32))


def test_coco_rle_string_matches_pycocotools():
    mask_utils = pytest.importorskip("pycocotools.mask")
    g = torch.Generator().manual_seed(2)
    masks = torch.rand(4, 64, 48, generator=g) > 0.5
    masks[1] = False
    masks[2, :, :20] = True
    for r in mask_to_rle(masks):
        ref = mask_utils.frPyObjects(r, *r["size"])
        assert rle_to_coco_string(r)["counts"] == ref["counts"].decode()


def test_remove_small_regions_matches_official():
    pytest.importorskip("cv2")
    from segment_anything.utils.amg import remove_small_regions as official

    g = np.random.default_rng(3)
    for _ in range(5):
        mask = g.random((60, 80)) > 0.55
        for mode in ("holes", "islands"):
            for area in (3, 30, 10000):
                a, ca = remove_small_regions(mask, area, mode)
                b, cb = official(mask, area, mode)
                assert ca == cb and np.array_equal(a, b)
