"""SAM's losses against references: focal against torchvision.ops.sigmoid_focal_loss (alpha 0.25, gamma 2), dice and
IoU against the textbook formulas written out here, on random inputs (tolerance 1e-6)."""
from __future__ import annotations

import torch
from torchvision.ops import sigmoid_focal_loss

from samvit.masks.automatic import mask_iou
from samvit.train.losses import dice_loss, focal_loss, iou_loss, mask_loss


def random_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(3, 5, 16, 16, generator=g, dtype=torch.float64)
    targets = (torch.rand(3, 5, 16, 16, generator=g) < 0.3).double()
    return logits, targets


def test_focal_equals_torchvision():
    logits, targets = random_case()
    ref = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2, reduction="none").mean((-2, -1))
    got = focal_loss(logits, targets)
    assert got.shape == (3, 5)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-6)


def test_dice_equals_reference_formula():
    logits, targets = random_case(1)
    ref = torch.empty(3, 5, dtype=torch.float64)
    for i in range(3):
        for j in range(5):
            p, t = torch.sigmoid(logits[i, j]).flatten(), targets[i, j].flatten()
            ref[i, j] = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    torch.testing.assert_close(dice_loss(logits, targets).double(), ref, rtol=0, atol=1e-6)


def test_iou_and_iou_loss_equal_reference_formula():
    logits, targets = random_case(2)
    pred_iou = torch.rand(3, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = torch.empty(3, 5, dtype=torch.float64)
    for i in range(3):
        for j in range(5):
            p, t = logits[i, j] > 0, targets[i, j] > 0.5
            ref[i, j] = (p & t).sum() / (p | t).sum()
    torch.testing.assert_close(mask_iou(logits > 0, targets), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(iou_loss(pred_iou, logits, targets).double(), (pred_iou - ref) ** 2, rtol=0,
                               atol=1e-6)
    empty = torch.zeros(1, 4, 4)
    assert mask_iou(empty > 0, empty).item() == 1.0  # nothing predicted, nothing there


def test_mask_loss_is_20_focal_plus_dice_and_backpropagates():
    logits, targets = random_case(4)
    logits.requires_grad_(True)
    loss = mask_loss(logits, targets)
    ref = 20 * sigmoid_focal_loss(logits, targets, reduction="none").mean((-2, -1)) + dice_loss(logits, targets)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-6)
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
