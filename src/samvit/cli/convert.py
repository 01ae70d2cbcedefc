"""`samvit convert`: rewrite a checkpoint between the official, transformers, timm and samvit layouts."""
from __future__ import annotations

import argparse

from .options import RELEASED, add_cache, add_quiet

HELP = "convert a checkpoint between the official, transformers, timm and samvit layouts"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN", help="checkpoint file (.pth/.bin/.safetensors; official, transformers or "
                   f"timm layout, detected from the keys) or a registry name ({', '.join(RELEASED)})")
    p.add_argument("output", metavar="OUT", help="file to write: safetensors if it ends in .safetensors, "
                   "else a torch.save dict of tensors")
    p.add_argument("--to", default="safetensors", choices=["safetensors", "official", "transformers", "timm"],
                   help="layout to write (default safetensors: samvit's own file, encoder weights + config)")
    p.add_argument("--model", default=None, help="preset, needed only if no preset fits and IN has no config")
    add_cache(p)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (refused otherwise)")
    add_quiet(p, "print nothing on success")


def run(args: argparse.Namespace) -> int:
    import sys

    from ..checkpoints.convert import convert_checkpoint
    from ..checkpoints.registry import resolve_checkpoint

    src = resolve_checkpoint(args.input, cache=args.cache_dir, base_url=args.base_url,
                             progress=False if args.quiet else None)
    fmt = convert_checkpoint(src, args.output, to=args.to, model=args.model, force=args.force)
    if not args.quiet:
        print(f"{args.input} ({fmt} layout) -> {args.output} ({args.to})", file=sys.stderr)
    return 0
