"""`samvit embed`: images -> SAM image embeddings, one .safetensors file per image."""
from __future__ import annotations

import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, directories (searched recursively), globs, or .txt files listing paths")
    p.add_argument("--model", default=None, help="preset (vit_b, vit_l, vit_h, vit_h_spec); inferred from the "
                   "checkpoint when omitted")
    p.add_argument("--checkpoint", default=os.environ.get("SAMVIT_CHECKPOINT"),
                   help="checkpoint file (official, transformers or timm layout; .pth/.bin/.safetensors) or a "
                   "registry name (vit_b, vit_l, vit_h: fetched into the verified cache); default: $SAMVIT_CHECKPOINT")
    p.add_argument("--out", default="embeddings", help="output directory (default: ./embeddings)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default float32)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")


def run(args: argparse.Namespace) -> int:
    import sys

    from .. import __version__
    from ..embed import embed_files
    from ..inputs import collect_inputs
    from ..runtime import resolve_device, resolve_dtype
    from ..hub import resolve_checkpoint
    from ..weights import file_sha256, load_encoder
    from . import UserError

    if not args.checkpoint:
        raise UserError("no checkpoint: pass --checkpoint PATH or set SAMVIT_CHECKPOINT")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    items = collect_inputs(args.inputs)
    if not items:
        raise UserError(f"no images found in {args.inputs}")
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    args.checkpoint = resolve_checkpoint(args.checkpoint, progress=False if args.quiet else None)  # a name: fetch
    encoder = load_encoder(args.model, args.checkpoint, device=device, dtype=dtype)
    meta = {"model": encoder.config.name, "checkpoint_sha256": file_sha256(args.checkpoint),
            "samvit_version": __version__, "dtype": str(dtype).replace("torch.", "")}
    report = embed_files(encoder, items, args.out, args.batch_size, meta, progress=False if args.quiet else None)
    for path, reason in report.failed:
        print(f"failed: {reason}", file=sys.stderr)
    if not args.quiet:
        print(f"{len(report.written)} embedded into {args.out}, {len(report.failed)} failed", file=sys.stderr)
    return 1 if report.failed else 0
