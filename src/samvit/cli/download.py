"""`samvit download`: fetch official SAM checkpoints into the verified cache (resumable, sha256-checked)."""
from __future__ import annotations

import argparse

from .options import RELEASED, add_cache, add_quiet

HELP = "fetch the official SAM checkpoints into the verified cache (resumable)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"checkpoints to fetch: {', '.join(RELEASED)} or all; none: list them and their cache state")
    add_cache(p)
    p.add_argument("--force", action="store_true", help="delete the cached file and fetch it again")
    add_quiet(p, "no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..checkpoints.registry import REGISTRY, UNVERIFIED, is_verified, cache_dir, download_checkpoint, \
        resolve_unverified
    from . import UserError

    folder = cache_dir(args.cache_dir)
    if not args.names:
        for e in REGISTRY.values():
            path = folder / e.filename
            state = ("verified" if is_verified(path, e) else "present, not yet verified") if path.exists() \
                else "not downloaded"
            print(f"{e.name:6s} {e.size / 2**20:8.1f} MiB  {state:25s} {path}")
        return 0
    names = list(REGISTRY) if "all" in args.names else args.names
    unknown = [n for n in names if n not in REGISTRY and n not in UNVERIFIED]
    if unknown:
        raise UserError(f"unknown checkpoint {', '.join(unknown)}; known: {', '.join(REGISTRY)}, all")
    for name in names:
        if name in UNVERIFIED:  # no published sha256: never fetched; a copy placed in the cache by hand is shown
            print(resolve_unverified(name, folder))
            continue
        path = download_checkpoint(name, cache=folder, base_url=args.base_url, force=args.force,
                                   progress=False if args.quiet else None)
        print(path)
    return 0
