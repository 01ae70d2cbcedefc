"""`samvit info`: a preset's or a checkpoint's architecture and parameter count."""
from __future__ import annotations

import argparse

from ..config import TINYVIT_PRESETS
from .options import ENCODER_PRESETS

HELP = "print a preset's or a checkpoint's architecture and parameter count"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"preset name ({ENCODER_PRESETS}; {', '.join(TINYVIT_PRESETS)}: "
                   "MobileSAM's TinyViT encoder)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file to describe instead of a preset")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--device", nargs="?", const="auto", default=None, metavar="DEVICE",
                   help="describe the compute device instead (default: cuda if available, else cpu): its CPU "
                   "instruction-set features (avx2, avx512f, avx512_vnni, avx512_bf16, amx), native bfloat16, "
                   "and the dtype that --dtype auto picks there")


def device_info(device: str) -> dict:
    """The device, its CPU features, whether it computes bfloat16 natively, and dtype='auto''s choice there."""
    import platform

    import torch

    from ..runtime import auto_dtype, cpu_features, native_bfloat16, resolve_device

    dev = resolve_device(device)
    info = {"device": str(dev), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_features": cpu_features(),
            "threads": torch.get_num_threads(), "native_bfloat16": native_bfloat16(dev),
            "auto_dtype": str(auto_dtype(dev)).replace("torch.", "")}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), info["cpu"])
    except OSError:
        pass
    if dev.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(dev)
    return info


def describe(config, num_params: int, num_params_no_pos: int) -> dict:
    cfg = config.to_dict()
    grid = config.grid_size
    return dict(cfg, parameters=num_params, parameters_without_pos_embed=num_params_no_pos,
                feature_map=[grid, grid, config.embed_dim],
                embedding=[config.out_chans, grid, grid] if config.out_chans else None)


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from ..config import NO_RELEASED_WEIGHTS, PRESETS, TINYVIT_PRESETS, TinyViTConfig, preset
    from ..checkpoints.load import build_encoder, checkpoint_info
    from . import UserError

    if args.device is not None:
        d = device_info(args.device)
        if args.json:
            print(json.dumps(d, indent=2))
            return 0
        feats = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in d["cpu_features"].items())
        print(f"device: {d['device']}" + (f" ({d['cuda_device']})" if "cuda_device" in d else ""))
        print(f"  cpu: {d['cpu']}; {d['threads']} threads; torch {d['torch']} (CPU kernels {d['cpu_capability']})")
        print(f"  instruction sets: {feats}")
        print(f"  native bfloat16: {'yes' if d['native_bfloat16'] else 'no'}; --dtype auto -> {d['auto_dtype']}")
        return 0
    info = None
    if args.checkpoint:
        info = checkpoint_info(args.checkpoint)
        cfg = info["config"]
    else:
        try:
            cfg = preset(args.model or "vit_h")
        except ValueError as e:
            raise UserError(f"--model: {e}") from None
    with torch.device("meta"):
        enc = build_encoder(cfg)
    d = describe(cfg, enc.num_parameters(), enc.num_parameters(include_pos_embed=False))
    if not args.checkpoint:
        d["released_weights"] = cfg.name not in NO_RELEASED_WEIGHTS
    else:  # HQ-SAM (segment-anything-hq): None for plain SAM / MobileSAM / an encoder-only file
        d["hq_sam"] = info["hq"]
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    if not args.checkpoint and not args.model:
        for name, pcfg in {**PRESETS, **TINYVIT_PRESETS}.items():
            with torch.device("meta"):
                e = build_encoder(pcfg)
            note = "  (no released weights: for training)" if name in NO_RELEASED_WEIGHTS else ""
            note += "  (TinyViT: MobileSAM's encoder; alias vit_tiny)" if name == "tinyvit_5m" else ""
            print(f"{name:11s} {e.num_parameters() / 1e6:7.1f}M parameters{note}")
        print()
    print(f"model: {cfg.name}" + (f"  (checkpoint {args.checkpoint})" if args.checkpoint else "")
          + ("  (no released weights: for training)" if not args.checkpoint and cfg.name in NO_RELEASED_WEIGHTS else ""))
    if info is not None and info["hq"]:
        hq, unit = info["hq"], "stage" if isinstance(cfg, TinyViTConfig) else "block"
        print(f"  HQ-SAM (segment-anything-hq): HQ mask decoder fusing the encoder's {unit} {hq['early_block']} "
              f"output ({'x'.join(str(v) for v in hq['early_features'])} early features); predict(hq_token_only=...)")
    if isinstance(cfg, TinyViTConfig):
        print_tinyvit(cfg, d)
        return 0
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


def print_tinyvit(cfg, d: dict) -> None:
    """The text lines of a TinyViT's architecture (after the `model:` line)."""
    stages = ", ".join(f"{w}x{n}" for w, n in zip(cfg.embed_dims, cfg.depths))
    print(f"  TinyViT stages (width x blocks): {stages}; stem stride 4, output stride {cfg.patch_size}, "
          f"image {cfg.img_size}")
    print(f"  stage 0: MBConv (expand {cfg.mbconv_expand_ratio:g}x); stages 1-{len(cfg.depths) - 1}: windows "
          f"{', '.join(str(w) for w in cfg.window_sizes[1:])}, heads {', '.join(str(h) for h in cfg.num_heads[1:])}, "
          f"MLP {cfg.mlp_ratio:g}x, {cfg.local_conv_size}x{cfg.local_conv_size} local conv")
    print("  position: learned attention bias per window offset (no position embedding)")
    print(f"  output: {cfg.grid_size}x{cfg.grid_size}x{cfg.embed_dim} features, "
          f"{cfg.out_chans}x{cfg.grid_size}x{cfg.grid_size} embedding (neck)")
    print(f"  parameters: {d['parameters']:,} ({d['parameters'] / 1e6:.1f}M)")
