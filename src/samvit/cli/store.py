"""`samvit store info|ls|verify PATH`: look into an embedding store written by `samvit embed --store`."""
from __future__ import annotations

import argparse
import json

from .options import add_quiet

HELP = "info, ls or verify an embedding store written by `samvit embed --store`"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["info", "ls", "verify"],
                   help="info: identity, counts, size; ls: one line per item; verify: check every item's data")
    p.add_argument("path", metavar="PATH", help="the store directory, or its URL (s3://bucket/store.zarr)")
    p.add_argument("--json", action="store_true", help="machine-readable output (info: one object; ls: one a line)")
    add_quiet(p, "verify: print errors only")


def run(args: argparse.Namespace) -> int:
    from ..embeddings.store import EmbeddingStore

    store = EmbeddingStore.open(args.path)
    if args.action == "info":
        info = store.info()
        if args.json:
            print(json.dumps(info, indent=2, sort_keys=True))
            return 0
        tile = info.get("tile")
        per_item = info["bytes_on_disk"] / max(1, info["rows"])
        print(f"store        {info['path']}\n"
              f"model        {info['model']} (checkpoint sha256 {info['checkpoint_sha256']})\n"
              f"embedding    {tuple(info['embedding_shape'])} {info['dtype']}\n"
              f"tiling       {_tile_text(tile)}\n"
              f"items        {info['items']} ({info['rows']} embeddings, from {info['writers']} writer sessions)\n"
              f"on disk      {info['bytes_on_disk'] / 2**20:.1f} MiB ({per_item / 2**20:.3f} MiB per embedding)\n"
              f"created      {info['created']} by samvit {info['samvit_version']}")
        return 0
    if args.action == "ls":
        for key in store.keys():
            meta = store.metadata(key)
            if args.json:
                print(json.dumps(meta, sort_keys=True))
                continue
            h, w = meta["original_size"]
            tiles = f"  {len(meta['tiles'])} tiles" if meta.get("tiles") else ""
            print(f"{key}\t{w}x{h}{tiles}\t{meta['sha256'][:12]}\t{meta['time']}")
        return 0
    rep = store.verify()
    for e in rep.errors:
        print(f"error: {e}")
    if not args.quiet:
        for n in rep.notes:
            print(f"note: {n}")
        print(f"{rep.checked} items checked: {'OK' if rep.ok else f'{len(rep.errors)} errors'}")
    return 0 if rep.ok else 1


def _tile_text(tile) -> str:
    return "none" if not tile else f"tile {tile['size']} px, halo {tile['halo']} px"
