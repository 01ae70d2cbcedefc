"""`samvit info`: a preset's or a checkpoint's architecture and parameter count."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="preset name (vit_b, vit_l, vit_h, vit_h_spec, vit_t, vit_s)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file to describe instead of a preset")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def describe(config, num_params: int, num_params_no_pos: int) -> dict:
    cfg = config.to_dict()
    grid = config.grid_size
    return dict(cfg, parameters=num_params, parameters_without_pos_embed=num_params_no_pos,
                feature_map=[grid, grid, config.embed_dim],
                embedding=[config.out_chans, grid, grid] if config.out_chans else None)


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from ..config import NO_RELEASED_WEIGHTS, PRESETS, preset
    from ..modeling.encoder import ImageEncoder
    from ..checkpoints.load import checkpoint_info

    if args.checkpoint:
        info = checkpoint_info(args.checkpoint)
        cfg = info["config"]
    else:
        cfg = preset(args.model or "vit_h")
    with torch.device("meta"):
        enc = ImageEncoder(cfg)
    d = describe(cfg, enc.num_parameters(), enc.num_parameters(include_pos_embed=False))
    if not args.checkpoint:
        d["released_weights"] = cfg.name not in NO_RELEASED_WEIGHTS
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    if not args.checkpoint and not args.model:
        for name in PRESETS:
            with torch.device("meta"):
                e = ImageEncoder(PRESETS[name])
            note = "  (no released weights: for training)" if name in NO_RELEASED_WEIGHTS else ""
            print(f"{name:11s} {e.num_parameters() / 1e6:7.1f}M parameters{note}")
        print()
    print(f"model: {cfg.name}" + (f"  (checkpoint {args.checkpoint})" if args.checkpoint else "")
          + ("  (no released weights: for training)" if not args.checkpoint and cfg.name in NO_RELEASED_WEIGHTS else ""))
    print(f"  width {cfg.embed_dim}, depth {cfg.depth}, heads {cfg.num_heads} ({cfg.head_dim} per head), "
          f"patch {cfg.patch_size}, MLP {cfg.mlp_ratio:g}x, image {cfg.img_size}")
    glob_blocks = list(cfg.global_attn_indexes)
    print(f"  attention: window {cfg.window_size}x{cfg.window_size}, global at blocks {glob_blocks} (0-based)")
    print(f"  position: absolute {'on' if cfg.use_abs_pos else 'off'}, relative {'on' if cfg.use_rel_pos else 'off'}")
    out = f"{cfg.out_chans}x{cfg.grid_size}x{cfg.grid_size} embedding (neck)" if cfg.out_chans else "no neck"
    print(f"  output: {cfg.grid_size}x{cfg.grid_size}x{cfg.embed_dim} features, {out}")
    print(f"  parameters: {d['parameters']:,} ({d['parameters'] / 1e6:.1f}M; "
          f"{d['parameters_without_pos_embed'] / 1e6:.1f}M without the position embedding)")
    return 0
