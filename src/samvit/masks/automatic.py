"""Automatic mask generation: a grid of point prompts, IoU and stability filtering, box NMS, optional crops.

Same algorithm and settings as the official SamAutomaticMaskGenerator. Differences, all without effect on the
masks: masks are upsampled only after the predicted-IoU filter (the official upsamples every candidate first);
box NMS is plain torch (no torchvision); min_mask_region_area uses scipy.ndimage instead of OpenCV (same
8-connected components); 'coco_rle' is encoded here (no pycocotools needed).
"""
from __future__ import annotations

import math
from itertools import product
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.images import ImageInput, load_image
from ..runtime import ProgressArg, progress_callback
from .predictor import Predictor

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


# ---- geometry helpers (official amg.py semantics) ----

def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) points (x, y) evenly spaced in [0,1]^2, half a step in from the edges, x fastest."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    return np.stack(np.meshgrid(side, side), axis=-1).reshape(-1, 2)


def generate_crop_boxes(im_size: Tuple[int, int], n_layers: int, overlap_ratio: float
                        ) -> Tuple[List[List[int]], List[int]]:
    """The whole image, then (2^i)^2 overlapping crops in layer i: XYXY boxes and their layer indices."""
    im_h, im_w = im_size
    boxes, layers = [[0, 0, im_w, im_h]], [0]
    for i in range(n_layers):
        n = 2 ** (i + 1)
        overlap = int(overlap_ratio * min(im_h, im_w) * (2 / n))
        crop_w = int(math.ceil((overlap * (n - 1) + im_w) / n))
        crop_h = int(math.ceil((overlap * (n - 1) + im_h) / n))
        xs = [int((crop_w - overlap) * j) for j in range(n)]
        ys = [int((crop_h - overlap) * j) for j in range(n)]
        for x0, y0 in product(xs, ys):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(i + 1)
    return boxes, layers


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N,H,W) bool -> (N,4) XYXY integer boxes (inclusive max pixel), [0,0,0,0] for an empty mask."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(0, 4, dtype=torch.long, device=masks.device)
    rows, cols = masks.any(-1), masks.any(-2)
    ar_h, ar_w = torch.arange(h, device=masks.device), torch.arange(w, device=masks.device)
    bottom = (rows * ar_h).amax(-1)
    top = torch.where(rows, ar_h, h).amin(-1)
    right = (cols * ar_w).amax(-1)
    left = torch.where(cols, ar_w, w).amin(-1)
    out = torch.stack([left, top, right, bottom], -1)
    return out * ~((right < left) | (bottom < top))[:, None]


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of masks (..., H, W) (nonzero = inside), pair by pair along the leading dims: exact integer counts divided
    in float64; 1 where both are empty."""
    a, b = a.bool().flatten(-2), b.bool().flatten(-2)
    inter, union = (a & b).sum(-1), (a | b).sum(-1)
    return torch.where(union > 0, inter.double() / union.clamp(min=1).double(), 1.0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of XYXY boxes (areas as (x1-x0)*(y1-y0), as torchvision)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: indices kept, by decreasing score (torchvision.ops.nms semantics)."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.argsort(scores.cpu(), descending=True, stable=True)
    iou = box_iou(*(boxes.float().cpu()[order],) * 2).numpy() > iou_threshold
    removed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if not removed[i]:
            keep.append(i)
            removed |= iou[i]
    return order[torch.as_tensor(keep, dtype=torch.long)]


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks thresholded at threshold + offset and threshold - offset (one holds the other)."""
    inter = (logits > threshold + offset).sum((-1, -2), dtype=torch.int32)
    union = (logits > threshold - offset).sum((-1, -2), dtype=torch.int32)
    return inter / union


# ---- run-length encodings ----

def mask_to_rle(masks: torch.Tensor) -> List[Dict[str, Any]]:
    """(N,H,W) bool -> uncompressed COCO RLEs {'size': [H, W], 'counts': [...]}, column-major, starting with 0s."""
    n, h, w = masks.shape
    flat = masks.transpose(1, 2).reshape(n, h * w)
    change = (flat[:, 1:] ^ flat[:, :-1]).nonzero().cpu()
    per_row = torch.bincount(change[:, 0], minlength=n).tolist() if n else []
    first = flat[:, 0].cpu().tolist()
    out, start = [], 0
    for i in range(n):
        idx = change[start:start + per_row[i], 1] + 1
        start += per_row[i]
        bounds = torch.cat([torch.zeros(1, dtype=idx.dtype), idx, torch.tensor([h * w], dtype=idx.dtype)])
        counts = ([0] if first[i] else []) + (bounds[1:] - bounds[:-1]).tolist()
        out.append({"size": [h, w], "counts": counts})
    return out


def rle_to_mask(rle: Dict[str, Any]) -> np.ndarray:
    """Uncompressed RLE -> (H,W) bool array."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(w, h).T


def rle_area(rle: Dict[str, Any]) -> int:
    return int(sum(rle["counts"][1::2]))


def rle_to_coco_string(rle: Dict[str, Any]) -> Dict[str, Any]:
    """Uncompressed RLE -> compressed COCO RLE {'size', 'counts': str}, as pycocotools' frPyObjects writes it."""
    cnts, chars = rle["counts"], []
    for i, x in enumerate(cnts):
        x = int(x) - (int(cnts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            chars.append(chr((c | 0x20 if more else c) + 48))
    return {"size": list(rle["size"]), "counts": "".join(chars)}


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> Tuple[np.ndarray, bool]:
    """Fill holes ('holes') or drop islands ('islands') under area_thresh pixels (8-connected); (mask, changed)."""
    try:
        from scipy import ndimage
    except ImportError:
        raise ImportError("min_mask_region_area > 0 needs scipy (pip install scipy)") from None
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    regions, n = ndimage.label(holes ^ mask, structure=np.ones((3, 3), dtype=int))
    sizes = np.bincount(regions.ravel(), minlength=n + 1)[1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask, False
    fill = [0] + small
    if not holes:
        fill = [i for i in range(n + 1) if i not in fill] or [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True


# ---- the generator ----

class AutomaticMaskGenerator:
    """Masks for a whole image from a grid of point prompts (official SamAutomaticMaskGenerator settings)."""

    def __init__(self, predictor: Predictor, points_per_side: Optional[int] = 32, points_per_batch: int = 64,
                 pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
                 stability_score_offset: float = 1.0, box_nms_thresh: float = 0.7, crop_n_layers: int = 0,
                 crop_nms_thresh: float = 0.7, crop_overlap_ratio: float = 512 / 1500,
                 crop_n_points_downscale_factor: int = 1, point_grids: Optional[Sequence[np.ndarray]] = None,
                 min_mask_region_area: int = 0, output_mode: str = "binary_mask",
                 progress: ProgressArg = None) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side and point_grids")
        if points_per_side is not None:
            if points_per_side < 1 or crop_n_points_downscale_factor < 1:
                raise ValueError("points_per_side and crop_n_points_downscale_factor must be at least 1")
            point_grids = [build_point_grid(int(points_per_side / crop_n_points_downscale_factor ** i))
                           for i in range(crop_n_layers + 1)]
        if len(point_grids) < crop_n_layers + 1:
            raise ValueError(f"point_grids: {len(point_grids)} grids for {crop_n_layers + 1} crop layers")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {', '.join(OUTPUT_MODES)}, got {output_mode!r}")
        if points_per_batch < 1 or crop_n_layers < 0:
            raise ValueError("points_per_batch must be at least 1 and crop_n_layers at least 0")
        self.predictor = predictor
        self.point_grids = [np.asarray(g, dtype=np.float64) for g in point_grids]
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.progress = progress

    @torch.inference_mode()
    def generate(self, image: Optional[ImageInput] = None) -> List[Dict[str, Any]]:
        """Mask records for an image (path, PIL or HxWx3 array), or, with image=None and no crop layers, for the
        predictor's current embedding. Each record: segmentation, area, bbox (XYWH), predicted_iou,
        point_coords, stability_score, crop_box (XYWH), as the official generator."""
        if image is None:
            if self.crop_n_layers > 0:
                raise ValueError("crop_n_layers > 0 needs the image itself (crops are re-encoded)")
            self.predictor.require_image()
            orig_size = self.predictor.original_size
            rgb = None
        else:
            rgb = load_image(image)
            orig_size = rgb.shape[:2]
        crop_boxes, layers = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        data = MaskData()
        total = sum(len(self.point_grids[i]) for i in layers)
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            bar(done[0], total)

        with progress_callback(self.progress, "masks", "pt", total=total) as bar:
            for crop_box, layer in zip(crop_boxes, layers):
                data.cat(self._process_crop(rgb, crop_box, layer, orig_size, advance))
        if len(crop_boxes) > 1 and data.get("rles"):
            cb = data["crop_boxes"].float()
            scores = 1 / ((cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1]))
            data.filter(box_nms(data["boxes"], scores, self.crop_nms_thresh))
        if self.min_mask_region_area > 0 and data.get("rles"):
            self._remove_small_regions(data, max(self.box_nms_thresh, self.crop_nms_thresh))
        return self._records(data)

    def _process_crop(self, rgb: Optional[np.ndarray], crop_box: List[int], layer: int,
                      orig_size: Tuple[int, int], advance: Callable[[int], None]) -> "MaskData":
        p = self.predictor
        x0, y0, x1, y1 = crop_box
        if rgb is not None:
            p.set_image(rgb[y0:y1, x0:x1])
        crop_h, crop_w = p.original_size
        points = self.point_grids[layer] * np.array([[crop_w, crop_h]], dtype=np.float64)
        data = MaskData()
        for s in range(0, len(points), self.points_per_batch):
            batch = points[s:s + self.points_per_batch]
            data.cat(self._process_batch(batch, (crop_h, crop_w), crop_box, orig_size))
            advance(len(batch))
        if rgb is not None:
            p.reset_image()
        if not data.get("rles"):
            return MaskData()
        data.filter(box_nms(data["boxes"], data["iou_preds"], self.box_nms_thresh))
        offset = torch.tensor([x0, y0, x0, y0])
        data["boxes"] = data["boxes"] + offset
        data["points"] = data["points"] + offset[:2].double()
        data["crop_boxes"] = torch.tensor([crop_box] * len(data["rles"]))
        return data

    def _process_batch(self, points: np.ndarray, crop_size: Tuple[int, int], crop_box: List[int],
                       orig_size: Tuple[int, int]) -> "MaskData":
        p = self.predictor
        pts = torch.as_tensor(points)
        coords = p.to_input_frame(pts)[:, None]
        labels = torch.ones(len(points), 1, dtype=torch.int32, device=p.device)
        low, iou = p.decode((coords, labels), None, None, multimask_output=True)
        m = low.shape[1]
        low, iou = low.flatten(0, 1), iou.flatten(0, 1)
        pts = pts.repeat_interleave(m, dim=0)
        keep = iou > self.pred_iou_thresh if self.pred_iou_thresh > 0.0 else torch.ones_like(iou, dtype=torch.bool)
        low, iou, pts = low[keep], iou[keep], pts[keep.cpu()]
        logits = p.postprocess_masks(low[:, None])[:, 0]
        stab = stability_score(logits, p.mask_threshold, self.stability_score_offset)
        if self.stability_score_thresh > 0.0:
            keep = stab >= self.stability_score_thresh
            logits, iou, pts, stab = logits[keep], iou[keep], pts[keep.cpu()], stab[keep]
        masks = logits > p.mask_threshold
        boxes = masks_to_boxes(masks)
        oh, ow = orig_size
        keep = ~_near_crop_edge(boxes, crop_box, [0, 0, ow, oh])
        masks, boxes, iou, pts, stab = masks[keep], boxes[keep], iou[keep], pts[keep.cpu()], stab[keep]
        x0, y0, x1, y1 = crop_box
        if (x0, y0, x1, y1) != (0, 0, ow, oh):
            masks = torch.nn.functional.pad(masks, (x0, ow - x1, y0, oh - y1), value=False)
        return MaskData(rles=mask_to_rle(masks), boxes=boxes.cpu(), iou_preds=iou.cpu(), points=pts,
                        stability_score=stab.cpu())

    def _remove_small_regions(self, data: "MaskData", nms_thresh: float) -> None:
        masks, scores = [], []
        for rle in data["rles"]:
            mask = rle_to_mask(rle)
            mask, changed_h = remove_small_regions(mask, self.min_mask_region_area, "holes")
            mask, changed_i = remove_small_regions(mask, self.min_mask_region_area, "islands")
            masks.append(torch.as_tensor(mask))
            scores.append(float(not (changed_h or changed_i)))
        masks_t = torch.stack(masks)
        boxes = masks_to_boxes(masks_t)
        keep = box_nms(boxes, torch.tensor(scores), nms_thresh)
        for i in keep.tolist():
            if scores[i] == 0.0:
                data["rles"][i] = mask_to_rle(masks_t[i:i + 1])[0]
                data["boxes"][i] = boxes[i]
        data.filter(keep)

    def _records(self, data: "MaskData") -> List[Dict[str, Any]]:
        out = []
        for i, rle in enumerate(data.get("rles", [])):
            if self.output_mode == "binary_mask":
                seg: Any = rle_to_mask(rle)
            elif self.output_mode == "coco_rle":
                seg = rle_to_coco_string(rle)
            else:
                seg = rle
            x0, y0, x1, y1 = data["boxes"][i].tolist()
            cx0, cy0, cx1, cy1 = data["crop_boxes"][i].tolist()
            out.append({"segmentation": seg, "area": rle_area(rle), "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "predicted_iou": float(data["iou_preds"][i]), "point_coords": [data["points"][i].tolist()],
                        "stability_score": float(data["stability_score"][i]),
                        "crop_box": [cx0, cy0, cx1 - cx0, cy1 - cy0]})
        return out


def _near_crop_edge(boxes: torch.Tensor, crop_box: List[int], orig_box: List[int], atol: float = 20.0) -> torch.Tensor:
    """Boxes within atol of a crop edge that is not also an image edge (those masks are cut by the crop)."""
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    orig = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    b = (boxes + torch.tensor([crop_box[0], crop_box[1]] * 2, device=boxes.device)).float()
    near_crop = torch.isclose(b, crop[None], atol=atol, rtol=0)
    near_image = torch.isclose(b, orig[None], atol=atol, rtol=0)
    return (near_crop & ~near_image).any(1)


class MaskData(dict):
    """Per-mask fields of equal length (tensors, or lists such as RLEs), filtered and concatenated together
    (the official amg.MaskData)."""

    def cat(self, new: Dict[str, Any]) -> None:
        """Append the masks of `new` (same fields) after these."""
        for k, v in new.items():
            if k not in self:
                self[k] = v
            elif isinstance(v, list):
                self[k] = self[k] + v
            else:
                self[k] = torch.cat([self[k], v])

    def filter(self, keep: torch.Tensor) -> None:
        """Keep the masks selected by a bool mask or a tensor of indices, in that order."""
        idx = keep.nonzero()[:, 0] if keep.dtype == torch.bool else keep
        idx_list = idx.tolist()
        for k, v in self.items():
            self[k] = [v[i] for i in idx_list] if isinstance(v, list) else v[idx.to(v.device)]
