"""`samvit segment`: masks from point / box prompts (or automatic masks for the whole image)."""
from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING, List, Tuple

from .options import (SAM_FILE, SAM_PRESETS, add_checkpoint, add_device, add_dtype, add_img_size, add_model,
                      add_quiet, check_img_size)

HELP = "masks from point / box prompts, or automatic masks for the whole image"

if TYPE_CHECKING:
    import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE", help="image file")
    p.add_argument("--point", action="append", default=[], metavar="X,Y[,LABEL]",
                   help="point prompt in image pixels; LABEL 1 = foreground (default), 0 = background; repeatable")
    p.add_argument("--box", default=None, metavar="X0,Y0,X1,Y1", help="box prompt in image pixels")
    p.add_argument("--multimask", action="store_true",
                   help="predict 3 candidate masks and keep the one with the highest predicted IoU "
                   "(better for a single ambiguous click)")
    p.add_argument("--hq-token-only", action="store_true",
                   help="HQ-SAM checkpoints: the HQ output token's mask alone (default: SAM's mask plus the HQ mask, "
                   "as the official predictor)")
    p.add_argument("--auto", action="store_true", help="automatic masks for the whole image (grid of points)")
    p.add_argument("--out", required=True, help="output: mask PNG (prompts) or JSON (--auto)")
    p.add_argument("--overlay", default=None, metavar="PNG", help="also write the image with the mask(s) drawn over it")
    p.add_argument("--embedding", default=None, metavar="FILE",
                   help="precomputed embedding of IMAGE (from `samvit embed`): the image encoder is not run")
    p.add_argument("--store", default=None, metavar="PATH",
                   help="embedding store (from `samvit embed --store`) that holds IMAGE's embedding: the image "
                   "encoder is not run")
    p.add_argument("--key", default=None, help="IMAGE's key in --store (default: its file name, the key `samvit "
                   "embed` gives a single file; files found in a directory are keyed by their relative path)")
    add_checkpoint(p, SAM_FILE)
    add_model(p, SAM_PRESETS)
    add_device(p)
    add_dtype(p, decoder=True)
    add_img_size(p, "the checkpoint's, or the one the --embedding / --store was made with; another is refused")
    g = p.add_argument_group("automatic masks (--auto)")
    g.add_argument("--points-per-side", type=int, default=32)
    g.add_argument("--points-per-batch", type=int, default=64)
    g.add_argument("--pred-iou-thresh", type=float, default=0.88)
    g.add_argument("--stability-score-thresh", type=float, default=0.95)
    g.add_argument("--box-nms-thresh", type=float, default=0.7)
    g.add_argument("--crop-n-layers", type=int, default=0)
    g.add_argument("--min-mask-region-area", type=int, default=0, help="fill holes / drop islands smaller than "
                   "this many pixels (needs scipy)")
    g.add_argument("--rle", choices=["coco", "uncompressed"], default="coco",
                   help="segmentation encoding in the JSON: compressed COCO RLE strings (default) or count lists")
    p.add_argument("--force", action="store_true", help="replace --out / --overlay if they exist (refused otherwise)")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="use an --embedding / --store embedding whose metadata names another model or checkpoint "
                   "than --checkpoint (refused otherwise: only if the weights are known to be the same)")
    add_quiet(p)


def _numbers(text: str, n: Tuple[int, ...], what: str) -> List[float]:
    from . import UserError

    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"{what} {text!r}: expected comma-separated numbers") from None
    if len(vals) not in n:
        raise UserError(f"{what} {text!r}: expected {' or '.join(map(str, n))} comma-separated numbers")
    return vals


def run(args: argparse.Namespace) -> int:
    import sys

    import numpy as np

    from ..data.images import load_image
    from ..masks.predictor import Predictor
    from ..embeddings.files import embedding_img_size, parse_img_size
    from ..embeddings.store import EmbeddingStore
    from ..runtime import describe_dtype, resolve_device, resolve_dtype
    from . import UserError

    if not args.checkpoint:
        raise UserError("no checkpoint: pass --checkpoint PATH (a full SAM checkpoint) or set SAMVIT_CHECKPOINT")
    prompted = bool(args.point or args.box)
    if args.auto == prompted:
        raise UserError("give prompts (--point / --box) or --auto, not both and not neither")
    points = [_numbers(t, (2, 3), "--point") for t in args.point]
    for pt in points:
        if len(pt) == 3 and pt[2] not in (0, 1):
            raise UserError(f"--point {pt}: LABEL must be 1 (foreground) or 0 (background)")
    box = _numbers(args.box, (4,), "--box") if args.box else None
    if args.embedding and args.store:
        raise UserError("give --embedding FILE or --store PATH, not both")
    precomputed = args.embedding or args.store
    if args.key and not args.store:
        raise UserError("--key only applies with --store PATH")
    if args.auto and precomputed and args.crop_n_layers > 0:
        raise UserError("--crop-n-layers re-encodes image crops, which needs the image encoder: drop "
                        f"{'--embedding' if args.embedding else '--store'}")
    check_img_size(args.img_size)
    _check_outputs(args)
    rgb = load_image(args.image)
    store = EmbeddingStore.open(args.store) if args.store else None
    img_size = args.img_size
    if precomputed:  # the input size the embedding was made with
        made = embedding_img_size(args.embedding) if args.embedding else \
            parse_img_size(store.identity["config"].get("img_size"), args.store)
        if img_size is not None and made is not None and made != img_size:
            raise UserError(f"{precomputed} was made at --img-size {made}, not {img_size}")
        img_size = img_size or made
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if not precomputed and not args.quiet:
        print(f"samvit segment: {describe_dtype(dtype, args.dtype, device)}", file=sys.stderr)
    predictor = Predictor.from_checkpoint(args.checkpoint, args.model, device=device, dtype=dtype,
                                          with_encoder=not precomputed, progress=False if args.quiet else None,
                                          img_size=img_size)
    if args.hq_token_only and not predictor.is_hq:
        raise UserError(f"--hq-token-only applies to HQ-SAM checkpoints; {args.checkpoint} is plain SAM")
    if args.hq_token_only and args.auto:
        raise UserError("--hq-token-only applies to prompts (--point / --box), not to --auto")
    if precomputed:
        if args.embedding:
            predictor.set_embedding(args.embedding, allow_mismatch=args.allow_mismatch)
        else:
            key = args.key or os.path.basename(args.image)
            emb, original_size, input_size = store.image_embedding(key)
            early = store.early_features(key) if store.early_shape is not None else None  # HQ-SAM
            predictor.set_embedding(emb, original_size, input_size, metadata=store.metadata(key),
                                    allow_mismatch=args.allow_mismatch, source=f"{args.store} (key {key!r})",
                                    early_features=early)
        if predictor.original_size != rgb.shape[:2]:
            raise UserError(f"{precomputed} holds the embedding of an image of size {predictor.original_size} "
                            f"(H, W), but {args.image} is {rgb.shape[:2]}")
    elif not args.auto:  # --auto encodes the image (and its crops) itself
        predictor.set_image(rgb)
    if args.auto:
        return _auto(args, predictor, rgb)
    coords = np.array([pt[:2] for pt in points]) if points else None
    labels = np.array([int(pt[2]) if len(pt) == 3 else 1 for pt in points]) if points else None
    masks, scores, _ = predictor.predict(coords, labels, np.array(box) if box else None,
                                         multimask_output=args.multimask, hq_token_only=args.hq_token_only)
    best = int(np.argmax(scores))
    mask = masks[best]
    _save_png(args.out, mask.astype(np.uint8) * 255)
    if args.overlay:
        from ..masks.draw import draw_overlay

        _save_png(args.overlay, draw_overlay(rgb, [mask], points, box))
    if not args.quiet:
        print(json.dumps({"out": args.out, "area": int(mask.sum()), "predicted_iou": float(scores[best]),
                          "candidates": [float(s) for s in scores]}, allow_nan=False))
    return 0


def _check_outputs(args: argparse.Namespace) -> None:
    """Before any work: --out and --overlay are two files, neither replaces an input, neither exists unless
    --force."""
    from ..embeddings.files import check_not_an_input
    from ..errors import OutputError

    inputs = [args.image, args.checkpoint, args.embedding] + ([os.path.join(args.store, "zarr.json")]
                                                               if args.store else [])
    protected = {os.path.realpath(p) for p in inputs if p and os.path.lexists(p)}
    outputs = [("--out", args.out)] + ([("--overlay", args.overlay)] if args.overlay else [])
    if args.overlay and os.path.realpath(args.overlay) == os.path.realpath(args.out):
        raise OutputError(f"--overlay {args.overlay} is --out: give them different files")
    for flag, path in outputs:
        check_not_an_input(path, protected, flag)
        if args.store and os.path.commonpath([os.path.realpath(args.store), os.path.realpath(path)]) == \
                os.path.realpath(args.store):
            raise OutputError(f"{flag} {path}: is inside the store {args.store}; choose another path")
        if os.path.isdir(path):
            raise OutputError(f"{flag} {path}: is a folder; expected a file name")
        if os.path.lexists(path) and not args.force:
            raise OutputError(f"{flag} {path}: exists; pass --force to replace it")


def _auto(args: argparse.Namespace, predictor, rgb: "np.ndarray") -> int:
    from ..masks.automatic import AutomaticMaskGenerator, rle_to_mask
    from ..masks.draw import draw_overlay

    gen = AutomaticMaskGenerator(
        predictor, points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh,
        box_nms_thresh=args.box_nms_thresh, crop_n_layers=args.crop_n_layers,
        min_mask_region_area=args.min_mask_region_area, output_mode="uncompressed_rle",
        progress=False if args.quiet else None)
    records = gen.generate(None if args.embedding or args.store else rgb)
    if args.overlay:
        by_area = sorted(records, key=lambda r: -r["area"])
        _save_png(args.overlay, draw_overlay(rgb, [rle_to_mask(r["segmentation"]) for r in by_area], [], None))
    if args.rle == "coco":
        from ..masks.automatic import rle_to_coco_string

        for r in records:
            r["segmentation"] = rle_to_coco_string(r["segmentation"])
    h, w = rgb.shape[:2]
    doc = {"image": {"file_name": os.path.basename(args.image), "height": h, "width": w},
           "annotations": [dict(id=i, **r) for i, r in enumerate(records)]}
    from ..checkpoints.files import atomic_write

    text = json.dumps(doc, allow_nan=False)  # NaN is not JSON: the decoder's outputs are checked finite before
    with atomic_write(args.out) as tmp, open(tmp, "w") as f:
        f.write(text)
    if not args.quiet:
        print(json.dumps({"out": args.out, "masks": len(records)}))
    return 0


def _save_png(path: str, array: "np.ndarray") -> None:
    from PIL import Image

    from ..checkpoints.files import atomic_write

    with atomic_write(path) as tmp:  # a full disk leaves the old file (or none), never half a PNG
        Image.fromarray(array).save(tmp, format="PNG")
