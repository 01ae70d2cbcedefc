"""Interactive segmentation quality: mIoU with 1 point, 1 box, and after k correction clicks, per dataset and per
object size (COCO's small / medium / large area thresholds), for one model or several side by side.

The protocol (deterministic, as in SAM's and RITM's evaluations):
- 1 point: the centre-most pixel of the mask (the maximum of its distance transform, the image border counting
  as boundary); of the 3 multimask outputs the one with the highest predicted IoU is taken;
- 1 box: the mask's tight box (x1, y1 the last pixels, as SAM's mask-to-box), single-mask output;
- clicks: from the 1-point prediction, each click goes to the centre-most pixel of the larger error region
  (missed foreground: a positive click, spilled background: a negative one; the larger by distance to its
  border), all clicks so far plus the previous low-res logits as the prompt, single-mask output.
IoU is computed at the image's own resolution (the predictor's masks after postprocessing) and averaged over
objects.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..masks.automatic import mask_iou, masks_to_boxes

SIZE_BINS = (("small", 0, 32 ** 2), ("medium", 32 ** 2, 96 ** 2), ("large", 96 ** 2, float("inf")))  # COCO
DEFAULT_CLICKS = (1, 3, 5)


def _edt(mask: np.ndarray) -> np.ndarray:
    try:
        from scipy import ndimage
    except ImportError:
        raise ImportError("samvit evaluate needs scipy (pip install 'samvit[finetune]')") from None
    return ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]


def centre_point(mask: np.ndarray) -> Tuple[int, int, float]:
    """(x, y, distance) of the mask's pixel farthest from its boundary (the image border counts as boundary);
    the first in raster order on ties."""
    d = _edt(mask)
    j = int(np.argmax(d))
    y, x = divmod(j, mask.shape[1])
    return x, y, float(d[y, x])


def next_click(pred: np.ndarray, gt: np.ndarray) -> Tuple[int, int, int]:
    """(x, y, label) of the next correction click (label -1: no error left, a padding point)."""
    fn, fp = gt & ~pred, pred & ~gt
    if not fn.any() and not fp.any():
        return 0, 0, -1
    xn, yn, dn = centre_point(fn) if fn.any() else (0, 0, -1.0)
    xp, yp, dp = centre_point(fp) if fp.any() else (0, 0, -1.0)
    return (xn, yn, 1) if dn >= dp else (xp, yp, 0)


def size_bin(area: int) -> str:
    return next(name for name, lo, hi in SIZE_BINS if lo <= area < hi)


def evaluate_image(predictor, rgb: np.ndarray, masks: np.ndarray, clicks: Sequence[int] = DEFAULT_CLICKS,
                   chunk: int = 16) -> List[Dict[str, float]]:
    """Per object of one image: {'area', 'point1', 'box', 'clicks<k>'...} IoUs. `predictor` is a samvit Predictor
    (or anything with set_image(rgb) and predict_torch(...) as it has)."""
    predictor.set_image(rgb)
    n_clicks = max(clicks) if clicks else 0
    rows = []
    for s in range(0, len(masks), chunk):
        gts = masks[s:s + chunk]
        n = len(gts)
        centres = [centre_point(m)[:2] for m in gts]
        coords = torch.tensor([[c] for c in centres], dtype=torch.float32)
        labels = torch.ones(n, 1, dtype=torch.int64)
        full, iou_pred, low = predictor.predict_torch(coords, labels, multimask_output=True)
        best = iou_pred.argmax(1)
        r = torch.arange(n)
        pred = full[r, best].cpu().numpy()
        low = low[r, best][:, None]
        gt = torch.from_numpy(np.asarray(gts)).bool()
        res = [{"area": int(m.sum()), "point1": v} for m, v in zip(gts, mask_iou(torch.from_numpy(pred), gt).tolist())]
        bfull, _, _ = predictor.predict_torch(boxes=masks_to_boxes(gt).float(), multimask_output=False)
        for row, v in zip(res, mask_iou(bfull[:, 0].cpu(), gt).tolist()):
            row["box"] = v
        for c in range(1, n_clicks + 1):
            new = [next_click(p, m) for p, m in zip(pred, gts)]
            coords = torch.cat([coords, torch.tensor([[[x, y]] for x, y, _ in new], dtype=torch.float32)], 1)
            labels = torch.cat([labels, torch.tensor([[lab] for _, _, lab in new], dtype=torch.int64)], 1)
            full, _, low = predictor.predict_torch(coords, labels, mask_input=low, multimask_output=False)
            pred = full[:, 0].cpu().numpy()
            if c in clicks:
                for row, v in zip(res, mask_iou(torch.from_numpy(pred), gt).tolist()):
                    row[f"clicks{c}"] = v
        rows.extend(res)
    return rows


def summarise(rows: List[Dict[str, float]], clicks: Sequence[int] = DEFAULT_CLICKS) -> Dict[str, float]:
    """Mean IoUs of per-object rows: point1_miou, box_miou, clicks<k>_miou, n_objects."""
    keys = ["point1", "box"] + [f"clicks{c}" for c in clicks]
    out: Dict[str, Optional[float]] = {f"{k}_miou": (float(np.mean([r[k] for r in rows])) if rows else None)
                                       for k in keys}  # None (JSON null): no object to measure
    out["n_objects"] = len(rows)
    return out


def evaluate(predictor, datasets: Dict[str, object], clicks: Sequence[int] = DEFAULT_CLICKS,
             limit: Optional[int] = None, progress: Optional[Callable[[int, int], None]] = None) -> Dict:
    """Evaluate a predictor on mask sources (name -> MaskFolder / CocoMasks / ShapeMasks). Returns the summary
    over everything ({'point1_miou', 'box_miou', 'clicks<k>_miou', 'n_objects'}) with 'per_dataset',
    'per_size', 'skipped' (reason -> count: images or annotations that could not be used) and 'skipped_items'
    ([{'dataset', 'item', 'reason'}], each one). A mean over no object is None (JSON null), never NaN."""
    from ..data.images import ImageError
    from .masks_data import MaskError

    clicks = tuple(sorted(set(int(c) for c in clicks)))
    all_rows: List[Dict[str, float]] = []
    per_dataset, skipped = {}, {}
    items: List[Dict[str, str]] = []
    total = sum(min(len(s), limit) if limit else len(s) for s in datasets.values())
    done = 0
    for name, source in datasets.items():
        for reason, count in getattr(source, "problems", {}).items():
            skipped[reason] = skipped.get(reason, 0) + count
        items += [{"dataset": name, "item": str(what), "reason": str(why)} for what, why in getattr(source, "missing", [])]
        rows: List[Dict[str, float]] = []
        n_images = 0
        for i in range(min(len(source), limit) if limit else len(source)):
            try:
                rgb, masks, problems = source.load(i)
            except (ImageError, MaskError) as e:
                skipped[type(e).__name__] = skipped.get(type(e).__name__, 0) + 1
                items.append({"dataset": name, "item": source.name(i), "reason": str(e)})
                problems, masks = [], None
            for what, reason in problems:
                key = reason.split(" (")[0]
                skipped[key] = skipped.get(key, 0) + 1
                items.append({"dataset": name, "item": f"{source.name(i)}: {what}", "reason": reason})
            if masks is not None and len(masks):
                rows.extend(evaluate_image(predictor, rgb, masks, clicks))
                n_images += 1
            elif masks is not None and not problems:
                skipped["no object in the mask"] = skipped.get("no object in the mask", 0) + 1
                items.append({"dataset": name, "item": source.name(i), "reason": "no object in the mask (all "
                              "background)"})
            done += 1
            if progress:
                progress(done, total)
        per_dataset[name] = dict(summarise(rows, clicks), n_images=n_images)
        all_rows.extend(rows)
    out = summarise(all_rows, clicks)
    out["n_images"] = sum(d["n_images"] for d in per_dataset.values())
    out["per_dataset"] = per_dataset
    out["per_size"] = {b: summarise([r for r in all_rows if size_bin(r["area"]) == b], clicks)
                       for b, _, _ in SIZE_BINS}
    out["skipped"] = skipped
    out["skipped_items"] = items
    out["clicks"] = list(clicks)
    return out


def markdown_table(results: Dict[str, Dict]) -> str:
    """A markdown table of one or more evaluate() results (label -> result) side by side: every metric overall,
    per dataset and per object size."""
    labels = list(results)
    first = results[labels[0]]
    metrics = ["point1_miou", "box_miou"] + [f"clicks{c}_miou" for c in first["clicks"]]
    names = {"point1_miou": "1 point", "box_miou": "1 box", **{f"clicks{c}_miou": f"{c} click{'s' * (c > 1)}"
                                                              for c in first["clicks"]}}

    def fmt(v) -> str:
        return "-" if v is None or v != v else f"{v:.4f}"  # None: no object of that kind

    lines = ["| subset | objects | prompt | " + " | ".join(labels) + " |",
             "|---|---:|---|" + "---:|" * len(labels)]
    subsets = [("all", lambda r: r)] + [(f"dataset {d}", lambda r, d=d: r["per_dataset"][d])
                                        for d in first["per_dataset"]] + \
        [(f"size {s}", lambda r, s=s: r["per_size"][s]) for s, _, _ in SIZE_BINS]
    for title, pick in subsets:
        n = pick(first)["n_objects"]
        for m in metrics:
            lines.append(f"| {title} | {n} | {names[m]} | " + " | ".join(fmt(pick(results[lab])[m]) for lab in labels)
                         + " |")
    return "\n".join(lines) + "\n"
