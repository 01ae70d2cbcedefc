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
                   "OUT: a third of the size, a little faster than float32 on CPU, cosine ~0.9999 to float32 on random "
                   "weights; check yours with --verify (see docs/export.md)")
    p.add_argument("--verify", action="store_true",
                   help="run the file in onnxruntime on a random input and print the difference to PyTorch")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")


def run(args: argparse.Namespace) -> int:
    import sys
    import tempfile

    import torch
    from tqdm import tqdm

    from ..export import DEFAULT_OPSET, export_onnx, quantize_onnx_int8, verify_onnx
    from ..checkpoints.load import load_encoder
    from ..checkpoints.registry import resolve_checkpoint
    from . import UserError

    if not args.checkpoint:
        raise UserError("no checkpoint: pass --checkpoint PATH or set SAMVIT_CHECKPOINT")
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a directory; expected a file name such as encoder.onnx")
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    if args.int8 and args.external_data:
        raise UserError("--int8 files are written whole (vit_h in int8 is about 0.65 GB): drop --external-data")
    quiet = args.quiet or not sys.stderr.isatty()
    steps = (["load checkpoint", "export (minutes for the large models)"] + (["quantize to int8"] if args.int8 else [])
             + (["verify in onnxruntime"] if args.verify else []))
    bar = tqdm(total=len(steps), disable=quiet, unit="step", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}]")
    with bar:
        bar.set_description(steps[0])
        checkpoint = resolve_checkpoint(args.checkpoint, progress=False if quiet else None)
        encoder = load_encoder(args.model, checkpoint, device="cpu", dtype=torch.float32)
        bar.update()
        bar.set_description(steps[1])
        if args.int8:  # the float32 file goes to a temporary folder beside OUT, then is quantised into OUT
            out_dir = os.path.dirname(os.path.abspath(args.out))
            os.makedirs(out_dir, exist_ok=True)
            if os.path.exists(args.out + ".data"):
                os.remove(args.out + ".data")  # the side file of an earlier float32 export to the same name
            with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
                fp32 = export_onnx(encoder, os.path.join(tmp, "fp32.onnx"), opset=opset,
                                   dynamic_batch=args.dynamic_batch, external_data=args.external_data)
                bar.update()
                bar.set_description(steps[2])
                path = quantize_onnx_int8(fp32, args.out)
        else:
            path = export_onnx(encoder, args.out, opset=opset, dynamic_batch=args.dynamic_batch,
                               external_data=args.external_data)
        bar.update()
        if args.verify:
            bar.set_description(steps[-1])
            diff = verify_onnx(encoder, path)
            bar.update()
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
