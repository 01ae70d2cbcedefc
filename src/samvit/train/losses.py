"""SAM's mask losses (Kirillov et al. 2023, section 3 and appendix A): 20 x focal + 1 x dice on the mask logits,
plus the mean squared error between the IoU head's prediction and the predicted mask's real IoU.

Every function takes logits (..., H, W) and binary targets of the same shape and returns one value per mask
(the leading dimensions), so that the caller can pick the best of several masks and weight masks as it needs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..masks.automatic import mask_iou

FOCAL_WEIGHT = 20.0
DICE_WEIGHT = 1.0
IOU_WEIGHT = 1.0


def _wide(x: torch.Tensor) -> torch.Tensor:
    """bfloat16/float16 (autocast) -> float32; float32 and float64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
               ) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017) averaged over the pixels of each mask: (..., H, W) -> (...).
    Elementwise the arithmetic of torchvision.ops.sigmoid_focal_loss."""
    logits = _wide(logits)
    targets = targets.to(logits.dtype)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - (2 |P T| + eps) / (|P| + |T| + eps) with P = sigmoid(logits), per mask: (..., H, W) -> (...)."""
    p = torch.sigmoid(_wide(logits)).flatten(-2)
    t = targets.to(p.dtype).flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)


def mask_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """20 x focal + 1 x dice per mask: (..., H, W) -> (...)."""
    return FOCAL_WEIGHT * focal_loss(logits, targets) + DICE_WEIGHT * dice_loss(logits, targets)


def iou_loss(iou_pred: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(IoU prediction - real IoU of the predicted mask)^2 per mask; the real IoU is a constant target."""
    return (_wide(iou_pred) - mask_iou(logits.detach() > 0, targets).to(_wide(iou_pred).dtype)) ** 2
