"""`samvit evaluate`: interactive segmentation mIoU of a SAM checkpoint (1 point, 1 box, k correction clicks) on
masks, per dataset and per object size; JSON and a markdown table, two checkpoints side by side with --compare."""
from __future__ import annotations

import argparse
import os

from .options import SAM_FILE, add_checkpoint, add_device, add_dtype, add_model, add_quiet, encoder_spec

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
    p.add_argument("--force", action="store_true", help="replace --json / --markdown if they exist (refused "
                   "otherwise)")
    p.add_argument("--clicks", default="1,3,5", metavar="K,K,...", help="report mIoU after these numbers of "
                   "correction clicks (default 1,3,5)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N images of each dataset")
    p.add_argument("--synthetic-size", type=int, default=64, metavar="N", help="images in --data synthetic "
                   "(default 64)")
    p.add_argument("--synthetic-seed", type=int, default=1, metavar="S", help="seed of --data synthetic (default "
                   "1: not the default training set, seed 0)")
    add_device(p)
    add_dtype(p, decoder=True)
    add_quiet(p)


def check_outputs(args: argparse.Namespace) -> None:
    """Before any work: --json and --markdown are two files, neither replaces an input nor (without --force) an
    existing file, neither is a folder."""
    from ..embeddings.files import check_not_an_input
    from ..errors import OutputError

    inputs = [d for d in args.data if d != "synthetic"] + (args.images or []) + [args.checkpoint] + \
        ([args.compare] if args.compare else [])
    protected = {os.path.realpath(p) for p in inputs if p and os.path.lexists(p)}
    outputs = [("--json", args.json)] + ([("--markdown", args.markdown)] if args.markdown else [])
    if args.markdown and os.path.realpath(args.markdown) == os.path.realpath(args.json):
        raise OutputError(f"--markdown {args.markdown} is --json: give them different files")
    for flag, path in outputs:
        check_not_an_input(path, protected, flag)
        for folder in (os.path.realpath(p) for p in inputs if os.path.isdir(p)):
            if os.path.commonpath([folder, os.path.realpath(path)]) == folder:
                raise OutputError(f"{flag} {path}: is inside the input folder {folder}; choose another path")
        if os.path.isdir(path):
            raise OutputError(f"{flag} {path}: is a folder; expected a file name")
        if os.path.lexists(path) and not args.force:
            raise OutputError(f"{flag} {path}: exists; pass --force to replace it")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from ..checkpoints.files import atomic_write
    from ..masks.predictor import Predictor
    from ..runtime import TqdmProgress, describe_dtype, resolve_device, resolve_dtype
    from ..train.evaluate import evaluate, markdown_table, summarise
    from ..train.masks_data import MaskError, open_masks
    from . import EXIT_ITEMS_FAILED, UserError

    try:
        clicks = sorted({int(c) for c in args.clicks.split(",") if c.strip()})
    except ValueError:
        raise UserError(f"--clicks {args.clicks!r}: expected comma-separated whole numbers, e.g. 1,3,5") from None
    if any(c < 1 for c in clicks):
        raise UserError(f"--clicks {args.clicks!r}: click counts start at 1")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    check_outputs(args)
    coco = [d for d in args.data if d.lower().endswith(".json")]
    images = list(args.images or [])
    if len(images) != len(coco):
        raise UserError(f"{len(coco)} COCO .json --data given with {len(images)} --images: give one --images DIR per "
                        "COCO file, in the same order")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if not args.quiet:
        print(f"samvit evaluate: {describe_dtype(dtype, args.dtype, device)}", file=sys.stderr)
    model = encoder_spec(args.model)
    predictors = [("checkpoint", args.checkpoint, Predictor.from_checkpoint(args.checkpoint, model=model,
                                                                            device=device, dtype=dtype))]
    datasets, unusable = {}, {}
    for d in args.data:  # synthetic shapes are drawn at the model's input size (as `samvit train sam` draws them)
        name = d if d == "synthetic" else os.path.basename(os.path.normpath(d))
        name = name if name not in datasets and name not in unusable else d
        try:
            datasets[name] = open_masks(d, images.pop(0) if d in coco else None, args.synthetic_size,
                                        synthetic_px=predictors[0][2].img_size, seed=args.synthetic_seed)
        except MaskError as e:  # a COCO file that cannot be read or holds nothing usable: reported, the rest goes on
            unusable[name] = str(e)
    if args.compare:
        predictors.append(("compare", args.compare, Predictor.from_checkpoint(args.compare, model=model,
                                                                              device=device, dtype=dtype)))
    results = {}
    for label, ck, predictor in predictors:
        with TqdmProgress(f"evaluate {os.path.basename(str(ck))}", "img",
                          enabled=False if args.quiet else None) as bar:
            result = evaluate(predictor, datasets, clicks, args.limit, progress=bar)
        for name, reason in unusable.items():
            result["per_dataset"][name] = dict(summarise([], clicks), n_images=0, error=reason)
            result["skipped_items"].append({"dataset": name, "item": name, "reason": reason})
        result["dtype"] = str(dtype).replace("torch.", "")
        results[str(ck) if str(ck) not in results else f"{label}: {ck}"] = result
    first = next(iter(results.values()))
    record = dict(first, checkpoint=str(args.checkpoint))
    if args.compare:
        record["compare"] = dict(results[list(results)[1]], checkpoint=str(args.compare))
    text = json.dumps(record, indent=2, allow_nan=False)  # strict JSON: a mean over no object is null
    with atomic_write(args.json) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    table = markdown_table(results)
    if args.markdown:
        with atomic_write(args.markdown) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.write(table)
    if not args.quiet:
        print(table, end="")
    skipped = first["skipped_items"]
    for item in skipped[:20]:
        print(f"skipped: {item['dataset']}: {item['item']}: {item['reason']}", file=sys.stderr)
    if len(skipped) > 20:
        print(f"skipped: ... and {len(skipped) - 20} more, all listed in {args.json} (skipped_items)", file=sys.stderr)
    empty = [name for name, d in first["per_dataset"].items() if not d["n_objects"]]
    if empty:
        why = "; ".join(f"{name}: {unusable.get(name) or _why_nothing(name, skipped)}" for name in empty)
        print(f"samvit evaluate: error: measured nothing in {len(empty)} of {len(first['per_dataset'])} "
              f"dataset(s): no usable object ({why}); results in {args.json}", file=sys.stderr)
        return EXIT_ITEMS_FAILED
    return 0


def _why_nothing(dataset: str, skipped) -> str:
    """The reasons of a dataset's skipped items, counted ('3 x mask is 10x10, its image 20x20', ...)."""
    from collections import Counter

    reasons = Counter(i["reason"].split(": ", 1)[-1] for i in skipped if i["dataset"] == dataset)
    if not reasons:
        return "no image in it"
    return ", ".join(f"{n} x {r}" for r, n in reasons.most_common(3)) + (", ..." if len(reasons) > 3 else "")
