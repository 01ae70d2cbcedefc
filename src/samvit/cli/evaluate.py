"""`samvit evaluate`: interactive segmentation mIoU of a SAM checkpoint (1 point, 1 box, k correction clicks) on
masks, per dataset and per object size; JSON and a markdown table, two checkpoints side by side with --compare."""
from __future__ import annotations

import argparse
import os

from .options import SAM_FILE, add_checkpoint, add_device, add_model, add_quiet, encoder_spec

HELP = "mIoU of a SAM checkpoint on masks: 1 point, 1 box, k correction clicks (JSON, markdown)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, action="append", metavar="DIR|ANN.json|synthetic",
                   help="a mask folder (images/ + masks/), a COCO annotations .json (with --images), or 'synthetic'; "
                   "repeat for several datasets (reported one by one)")
    p.add_argument("--images", action="append", default=None, metavar="DIR",
                   help="the image folder of each COCO --data .json, in the same order")
    add_checkpoint(p, SAM_FILE, required=True, note="; a `samvit train sam` run's is RUN_DIR/final.safetensors")
    p.add_argument("--compare", default=None, metavar="CK2", help="a second checkpoint, evaluated on the same "
                   "prompts; the markdown table puts both side by side (e.g. before / after fine-tuning)")
    add_model(p, presets=None)
    p.add_argument("--json", required=True, metavar="OUT.json", help="where to write the results")
    p.add_argument("--markdown", default=None, metavar="OUT.md", help="also write a markdown table")
    p.add_argument("--clicks", default="1,3,5", metavar="K,K,...", help="report mIoU after these numbers of "
                   "correction clicks (default 1,3,5)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N images of each dataset")
    p.add_argument("--synthetic-size", type=int, default=64, metavar="N", help="images in --data synthetic "
                   "(default 64)")
    p.add_argument("--synthetic-seed", type=int, default=1, metavar="S", help="seed of --data synthetic (default "
                   "1: not the default training set, seed 0)")
    add_device(p)
    add_quiet(p)


def run(args: argparse.Namespace) -> int:
    import json

    from ..checkpoints.files import atomic_write
    from ..masks.predictor import Predictor
    from ..runtime import TqdmProgress, resolve_device
    from ..train.evaluate import evaluate, markdown_table
    from ..train.masks_data import open_masks
    from . import UserError

    try:
        clicks = sorted({int(c) for c in args.clicks.split(",") if c.strip()})
    except ValueError:
        raise UserError(f"--clicks {args.clicks!r}: expected comma-separated whole numbers, e.g. 1,3,5") from None
    if any(c < 1 for c in clicks):
        raise UserError(f"--clicks {args.clicks!r}: click counts start at 1")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    outputs = [p for p in (args.json, args.markdown) if p]
    inputs = [d for d in args.data if d != "synthetic"] + (args.images or []) + [args.checkpoint] + \
        ([args.compare] if args.compare else [])
    for out in outputs:
        if any(os.path.exists(i) and os.path.abspath(out) == os.path.abspath(i) for i in inputs):
            raise UserError(f"{out}: would overwrite an input")
    coco = [d for d in args.data if d.lower().endswith(".json")]
    images = list(args.images or [])
    if len(images) != len(coco):
        raise UserError(f"{len(coco)} COCO .json --data given with {len(images)} --images: give one --images DIR per "
                        "COCO file, in the same order")
    device = resolve_device(args.device)
    model = encoder_spec(args.model)
    predictors = [("checkpoint", args.checkpoint, Predictor.from_checkpoint(args.checkpoint, model=model,
                                                                            device=device))]
    datasets = {}
    for d in args.data:  # synthetic shapes are drawn at the model's input size (as `samvit train sam` draws them)
        name = d if d == "synthetic" else os.path.basename(os.path.normpath(d))
        datasets[name if name not in datasets else d] = open_masks(
            d, images.pop(0) if d in coco else None, args.synthetic_size, synthetic_px=predictors[0][2].img_size,
            seed=args.synthetic_seed)
    if args.compare:
        predictors.append(("compare", args.compare, Predictor.from_checkpoint(args.compare, model=model,
                                                                              device=device)))
    results = {}
    for label, ck, predictor in predictors:
        with TqdmProgress(f"evaluate {os.path.basename(str(ck))}", "img",
                          enabled=False if args.quiet else None) as bar:
            results[str(ck) if str(ck) not in results else f"{label}: {ck}"] = evaluate(
                predictor, datasets, clicks, args.limit, progress=bar)
    first = next(iter(results.values()))
    record = dict(first, checkpoint=str(args.checkpoint))
    if args.compare:
        record["compare"] = dict(results[list(results)[1]], checkpoint=str(args.compare))
    with atomic_write(args.json) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=2)
    table = markdown_table(results)
    if args.markdown:
        with atomic_write(args.markdown) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.write(table)
    if not args.quiet:
        print(table, end="")
    return 0

