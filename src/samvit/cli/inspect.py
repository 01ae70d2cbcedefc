"""`samvit inspect`: attention maps per head, mean attention distance per head and block, feature PCA, as PNGs."""
from __future__ import annotations

import argparse
import os
import sys

from .options import VIT_PRESETS, add_checkpoint, add_device, add_dtype, add_model, add_quiet

HELP = "attention maps per head, mean attention distance per head and block, feature PCA (PNG)"


def _model_options(p: argparse.ArgumentParser) -> None:
    add_checkpoint(p)
    add_model(p, VIT_PRESETS)
    p.add_argument("--random-weights", action="store_true",
                   help="no checkpoint: the --model preset with random weights (a demo of structure only; the "
                   "picture says so)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-weights (default 0)")
    add_device(p, default="cpu")
    add_dtype(p)
    add_quiet(p)
    p.add_argument("--force", action="store_true", help="replace the output files if they exist (refused "
                   "otherwise)")
    p.add_argument("--dpi", type=int, default=100, help="pixels per inch of the PNG (default 100; 3 inches per panel)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", metavar="WHAT")
    a = sub.add_parser("attention", help="the attention of one query token per head, drawn over the image",
                       description="The attention of one query token in one block, one panel per head, drawn over "
                       "the image; a windowed block's window is outlined.")
    a.add_argument("image", metavar="IMAGE")
    _model_options(a)
    a.add_argument("--block", type=int, required=True, help="block index (0-based)")
    a.add_argument("--head", default=None, metavar="H[,H...]", help="draw only this head, or these heads "
                   "(default: every head)")
    a.add_argument("--query", default=None, metavar="X,Y",
                   help="query pixel in the original image, x to the right, y down (default: the image centre)")
    a.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write")
    d = sub.add_parser("distance", help="mean attention distance and entropy per head and block: CSV + PNG",
                       description="Mean attention distance (pixels) and entropy (nats) per block and head, "
                       "averaged over the images: OUT/distance.csv and OUT/distance.png.")
    d.add_argument("images", nargs="+", metavar="IMAGE")
    _model_options(d)
    d.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    d.add_argument("--blocks", default=None, metavar="N,N,...", help="only these blocks (default: all)")
    d.add_argument("--include-canvas-padding", action="store_true",
                   help="count the query tokens of the zero canvas padding of a non-square image too")
    c = sub.add_parser("pca", help="the first 3 principal components of the features (pre/post neck) as RGB",
                       description="The first three principal components of the 64x64 token features, before and "
                       "after the neck, as RGB beside the image.")
    c.add_argument("image", metavar="IMAGE")
    _model_options(c)
    c.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write")


def _encoder(args: argparse.Namespace):
    import torch

    from .. import load_encoder, preset
    from ..runtime import describe_dtype, resolve_device, resolve_dtype
    from . import UserError

    device = resolve_device(args.device)
    asked = getattr(args, "dtype", None)
    dtype = resolve_dtype(asked, device)
    if not getattr(args, "quiet", False):
        print(f"samvit inspect: {describe_dtype(dtype, asked, device)}", file=sys.stderr)
    if args.random_weights:
        if args.checkpoint:
            raise UserError("--random-weights and --checkpoint exclude each other")
        if not args.model:
            raise UserError(f"--random-weights needs --model PRESET ({VIT_PRESETS})")
        torch.manual_seed(args.seed)
        cfg = preset(args.model)
        return load_encoder(cfg, device=device, dtype=dtype), f"{cfg.name}, RANDOM WEIGHTS (seed {args.seed}): structure only"
    if not args.checkpoint:
        raise UserError("no weights: pass --checkpoint PATH (or set SAMVIT_CHECKPOINT); for a demo of structure "
                        "only, --model PRESET --random-weights")
    enc = load_encoder(args.model, args.checkpoint, device=device, dtype=dtype)
    from ..inspect.capture import require_vit

    require_vit(enc)  # a TinyViT checkpoint: a usage error before any image is read
    return enc, f"{enc.config.name}, {os.path.basename(os.fspath(args.checkpoint))}"


def _check_png(out: str, inputs, force: bool = False) -> None:
    from . import UserError

    if not out.lower().endswith(".png"):
        raise UserError(f"--out {out}: expected a .png file name")
    if os.path.isdir(out):
        raise UserError(f"--out {out}: is a directory, expected a .png file name")
    real = os.path.realpath(out)
    if any(os.path.exists(i) and os.path.realpath(i) == real for i in inputs):
        raise UserError(f"--out {out}: is one of the inputs; refusing to overwrite it")
    if os.path.lexists(out) and not force:
        raise UserError(f"--out {out}: exists; pass --force to replace it")
    parent = os.path.dirname(out)
    if parent:
        os.makedirs(parent, exist_ok=True)


def _plots():
    from . import UserError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("the pictures need matplotlib: pip install 'samvit[inspect]'") from None
    from .. import inspect as ins

    return ins


def _parse_query(text: str):
    from . import UserError

    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--query {text!r}: expected X,Y pixel coordinates, e.g. 512,300") from None
    return x, y


def run(args: argparse.Namespace) -> int:
    from . import UserError

    if not getattr(args, "what", None):
        raise UserError("expected one of: attention, distance, pca (see samvit inspect --help)")
    if not 30 <= args.dpi <= 600:
        raise UserError(f"--dpi {args.dpi}: expected 30..600")
    if args.what == "distance":
        return _distance(args)
    ins = _plots()
    _check_png(args.out, [i for i in (args.image, args.checkpoint) if i], args.force)
    from ..inspect.capture import prepare

    if not os.path.exists(args.image):  # before loading a model: a typo should fail fast
        raise UserError(f"{args.image}: no such file")
    encoder, label = _encoder(args)
    cfg = encoder.config
    prepared = prepare(args.image, cfg.img_size)
    if args.what == "attention":
        if not 0 <= args.block < cfg.depth:
            raise UserError(f"--block {args.block}: model {cfg.name!r} has blocks 0..{cfg.depth - 1}")
        heads = None
        if args.head is not None:
            try:
                heads = [int(h) for h in args.head.split(",")]
            except ValueError:
                raise UserError(f"--head {args.head!r}: expected a head number or numbers separated by commas") from None
            bad = [h for h in heads if not 0 <= h < cfg.num_heads]
            if bad:
                raise UserError(f"--head {bad[0]}: model {cfg.name!r} has heads 0..{cfg.num_heads - 1}")
        if args.query is None:
            x, y = prepared.original_size[1] / 2, prepared.original_size[0] / 2
        else:
            x, y = _parse_query(args.query)
        token = ins.pixel_to_token(x, y, prepared, cfg.patch_size)
        result = ins.attention(encoder, prepared, blocks=[args.block], queries=[token])
        size = ins.plot_attention(result, args.block, args.out, cfg.patch_size, heads=heads,
                                  title=f"{label} - query pixel ({x:g}, {y:g})", dpi=args.dpi)
    else:
        result = ins.feature_pca(encoder, prepared)
        size = ins.plot_pca(result, args.out, cfg.patch_size, title=label, dpi=args.dpi)
    if not args.quiet:
        print(f"wrote {args.out} ({size[0]}x{size[1]})")
    return 0


def _distance(args: argparse.Namespace) -> int:
    from . import UserError

    ins = _plots()
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out}: exists and is not a directory")
    real_out = {os.path.realpath(os.path.join(out, n)) for n in ("distance.csv", "distance.png")}
    clash = [i for i in args.images if os.path.realpath(i) in real_out]
    if clash:
        raise UserError(f"--out {out}: would overwrite the input {clash[0]}")
    there = [p for p in sorted(real_out) if os.path.lexists(p)]
    if there and not args.force:
        raise UserError(f"--out {out}: {there[0]} exists; pass --force to replace it")
    blocks = None
    if args.blocks:
        try:
            blocks = [int(b) for b in args.blocks.split(",")]
        except ValueError:
            raise UserError(f"--blocks {args.blocks!r}: expected block numbers separated by commas") from None
    from .. import ImageError
    from ..inspect.capture import prepare

    encoder, label = _encoder(args)
    cfg = encoder.config
    if blocks is not None:
        bad = [b for b in blocks if not 0 <= b < cfg.depth]
        if bad:
            raise UserError(f"--blocks: block {bad[0]} does not exist; model {cfg.name!r} has blocks "
                            f"0..{cfg.depth - 1}")
    failed = []
    done = []

    def images():
        for path in args.images:
            try:
                prepared = prepare(path, cfg.img_size)
            except ImageError as e:
                print(f"samvit inspect distance: skipped: {e}", file=sys.stderr)  # the message names the file
                failed.append(path)
                continue
            done.append(path)
            yield prepared

    bar = None
    if not args.quiet and sys.stderr.isatty():
        from tqdm import tqdm

        last = cfg.depth if blocks is None else max(blocks) + 1  # blocks after the last chosen one are not run
        bar = tqdm(total=len(args.images) * last, desc="blocks", unit="block", file=sys.stderr)
    try:
        result = ins.attention_distance(encoder, images(), blocks=blocks,
                                        image_only=not args.include_canvas_padding,
                                        progress=(lambda n, b: bar.update(1)) if bar else None)
    except ValueError as e:
        if not done:
            raise UserError(f"no image could be read ({len(failed)} skipped)") from None
        raise
    finally:
        if bar is not None:
            bar.close()
    result.images = list(done)
    os.makedirs(out, exist_ok=True)
    result.write_csv(os.path.join(out, "distance.csv"))
    grid = (cfg.img_size // cfg.patch_size,) * 2
    ins.plot_distance(result, os.path.join(out, "distance.png"), title=label, grid=grid, dpi=args.dpi)
    if not args.quiet:
        print(f"wrote {os.path.join(out, 'distance.csv')} and distance.png: {len(done)} image(s), "
              f"{len(result.blocks)} blocks x {result.mean_distance.shape[1]} heads"
              + (f"; {len(failed)} skipped" if failed else ""))
    return 1 if failed else 0
