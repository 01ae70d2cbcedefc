"""SAM's prompt simulation: first points inside the mask, box noise of 10% of the side clipped at 20 px (1024
frame), correction clicks inside the error region with the right label, samples fixed by (seed, epoch, index)."""
from __future__ import annotations

import numpy as np
import torch

from samvit.train.finetune import correction_clicks
from samvit.masks.automatic import masks_to_boxes
from samvit.train.masks_data import MaskSamples, ShapeMasks, noisy_box


def test_first_points_lie_in_their_masks_and_boxes_stay_near_the_mask_box():
    source = ShapeMasks(12, size=96, seed=3)  # 96 px pictures into a 128 input: scale 4/3
    ds = MaskSamples(source, img_size=128, low_res=32, masks_per_image=4, seed=0)
    n_points = n_box = 0
    for i in range(len(source)):
        _, masks, _ = source.load(i)
        s = ds[(0, i)]
        for j in range(int(s["valid"].sum())):
            # which instance: the one whose low-res target this is
            k = next(k for k in range(len(masks)) if torch.equal(
                torch.from_numpy(ds_target(ds, masks[k])), s["targets"][j]))
            x, y = (s["point"][j] * 96 / 128).round().long().tolist()
            assert masks[k][y, x], (i, j)
            tight = masks_to_boxes(torch.from_numpy(masks[k][None]).bool())[0].double() * 128 / 96
            cap = 20 * 128 / 1024
            assert (s["box"][j] - tight).abs().max() <= cap + 1e-4
            n_points += 1
            n_box += bool(s["use_box"][j])
    assert n_points >= 20 and 0.2 < n_box / n_points < 0.8  # both kinds at equal odds
    again = ds[(0, 5)]
    assert all(torch.equal(again[k], ds[(0, 5)][k]) for k in again)  # fixed by (seed, epoch, index)
    assert not torch.equal(ds[(1, 5)]["point"], again["point"])  # another epoch, other draws


def ds_target(ds, mask):
    from samvit.train.masks_data import low_res_targets

    return low_res_targets(mask[None], ds.img_size, ds.low_res)[0]


def test_box_noise_has_std_of_ten_percent_of_the_side_and_is_clipped_at_20px():
    g = torch.Generator().manual_seed(0)
    box = np.array([300.0, 400.0, 400.0, 450.0])  # 100 x 50 in a 1024 frame: std 10 px and 5 px
    draws = np.stack([noisy_box(box, (1024, 1024), 1024, g) for _ in range(4000)]) - box
    assert np.abs(draws).max() <= 20 + 1e-9
    std = draws.std(0)
    # x: std 10 clipped at 2 sigma (which leaves 0.96 sigma); y: 5 px, clipping at 4 sigma changes nothing
    assert 0.92 * 10 < std[0] < 1.0 * 10 and 0.92 * 10 < std[2] < 1.0 * 10, std
    assert 0.95 * 5 < std[1] < 1.05 * 5 and 0.95 * 5 < std[3] < 1.05 * 5, std
    big = np.array([0.0, 0.0, 1000.0, 1000.0])
    out = np.stack([noisy_box(big, (1024, 1024), 1024, g) for _ in range(500)])
    assert out.min() >= 0 and out.max() <= 1024 and (out[:, 2] >= out[:, 0]).all()


def test_correction_clicks_fall_in_the_error_region_with_the_right_label():
    g = torch.Generator().manual_seed(1)
    targets = torch.zeros(3, 32, 32, dtype=torch.bool)
    targets[:, 8:20, 8:20] = True
    logits = torch.full((3, 32, 32), -1.0)
    logits[0, 8:20, 8:14] = 1.0  # a miss on the right: positive clicks there
    logits[1] = torch.where(targets[1], 1.0, -1.0)
    logits[1, 0:4, 0:4] = 1.0  # a spill in the corner: negative clicks there
    logits[2] = torch.where(targets[2], 1.0, -1.0)  # perfect: a padding point
    gens = [torch.Generator().manual_seed(s) for s in (10, 11, 12)]
    seen = set()
    for _ in range(200):
        xy, lab = correction_clicks(logits, targets, gens, img_size=128)
        px = ((xy + 0.5) / 4 - 0.5).round().long()  # back to low-res pixels (stride 4)
        assert lab[0] == 1 and 8 <= px[0, 1] < 20 and 14 <= px[0, 0] < 20
        assert lab[1] == 0 and px[1, 0] < 4 and px[1, 1] < 4
        assert lab[2] == -1
        seen.add(tuple(px[0].tolist()))
    assert len(seen) > 40  # uniform over the 72-pixel miss, not one fixed point
    assert torch.equal(xy[:, 0] % 4, torch.full((3,), 1.5).where(lab != -1, torch.zeros(3)))  # cell centres
    del g
