"""`samvit export onnx`: the image encoder as an ONNX file, optionally checked in onnxruntime against PyTorch."""
from __future__ import annotations

import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("format", choices=["onnx"], help="output format (onnx)")
    p.add_argument("--model", default=None, help="preset (vit_b, vit_l, vit_h, vit_h_spec); inferred from the "
                   "checkpoint when omitted")
    p.add_argument("--checkpoint", default=os.environ.get("SAMVIT_CHECKPOINT"),
                   help="checkpoint file (official, transformers or timm layout; .pth/.bin/.safetensors) or a "
                   "registry name (vit_b, vit_l, vit_h: fetched into the verified cache); default: $SAMVIT_CHECKPOINT")
    p.add_argument("--out", default="encoder.onnx", help="output file (default: ./encoder.onnx)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset version, 18 or later (default 18)")
    p.add_argument("--dynamic-batch", action=argparse.BooleanOptionalAction, default=True,
                   help="batch size as a dynamic axis (default: on; --no-dynamic-batch fixes it to 1)")
    p.add_argument("--external-data", action=argparse.BooleanOptionalAction, default=None,
                   help="weights in one side file OUT.data (default: only when they exceed ~1.8 GB, e.g. vit_h)")
    p.add_argument("--int8", action="store_true",
                   help="dynamic int8 quantisation of the linear layers (onnxruntime; uint8 weights), written whole to "
                   "OUT (size, speed and accuracy measured in docs/export.md); check yours with --verify")
    p.add_argument("--int8-weights", choices=["uint8", "int8"], default="uint8",
                   help="with --int8: weight type (default uint8; int8 is onnxruntime's fast U8S8 kernel on CPUs with "
                   "VNNI, see `samvit info --device`, and saturates on CPUs without it)")
    p.add_argument("--verify", action="store_true",
                   help="run the file in onnxruntime on a random input and print the difference to PyTorch")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")


def run(args: argparse.Namespace) -> int:
    import sys

    import torch

    from ..checkpoints.load import load_encoder
    from ..export import DEFAULT_OPSET, export_onnx, export_onnx_int8, verify_onnx
    from ..runtime import TqdmProgress, progress_enabled
    from . import UserError

    if not args.checkpoint:
        raise UserError("no checkpoint: pass --checkpoint PATH or set SAMVIT_CHECKPOINT")
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a directory; expected a file name such as encoder.onnx")
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    if args.int8 and args.external_data:
        raise UserError("--int8 files are written whole (vit_h in int8 is about 0.65 GB): drop --external-data")
    show = progress_enabled(False if args.quiet else None)
    steps = (["load checkpoint", "export (minutes for the large models)" + (" and quantize to int8" if args.int8
                                                                            else "")]
             + (["verify in onnxruntime"] if args.verify else []))
    with TqdmProgress(steps[0], "step", show, total=len(steps)) as bar:
        encoder = load_encoder(args.model, args.checkpoint, device="cpu", dtype=torch.float32, progress=show)
        bar(1)
        bar.bar.set_description(steps[1])
        if args.int8:
            path = export_onnx_int8(encoder, args.out, opset=opset, dynamic_batch=args.dynamic_batch,
                                    weights=args.int8_weights)
        else:
            path = export_onnx(encoder, args.out, opset=opset, dynamic_batch=args.dynamic_batch,
                               external_data=args.external_data)
        bar(2)
        if args.verify:
            bar.bar.set_description(steps[-1])
            diff = verify_onnx(encoder, path)
            bar(3)
    data = path + ".data"
    if not args.quiet:
        size = os.path.getsize(path) + (os.path.getsize(data) if os.path.exists(data) else 0)
        where = f"{path} + {data}" if os.path.exists(data) else path
        print(f"exported {encoder.config.name} ({'int8' if args.int8 else 'float32'}, opset {opset}, "
              f"{'dynamic' if args.dynamic_batch else 'fixed'} batch) to {where}, {size / 1e6:.1f} MB", file=sys.stderr)
    if args.verify:
        print(f"onnxruntime vs PyTorch float32: max abs {diff['max_abs']:.3g}, mean abs {diff['mean_abs']:.3g}, "
              f"cosine {diff['cosine']:.9f}")
    return 0
