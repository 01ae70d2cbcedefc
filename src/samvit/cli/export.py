"""`samvit export onnx`: the image encoder (or, with --decoder, the prompt decoder) as an ONNX file, optionally
checked in onnxruntime against PyTorch."""
from __future__ import annotations

import argparse
import os

from .options import VIT_PRESETS, add_checkpoint, add_model, add_quiet

HELP = "export the image encoder (or --decoder the prompt decoder) to ONNX, --verify in onnxruntime"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("format", choices=["onnx"], help="output format (onnx)")
    add_model(p, VIT_PRESETS)
    add_checkpoint(p)
    p.add_argument("--out", default=None, help="output file (default: ./encoder.onnx, with --decoder ./decoder.onnx)")
    p.add_argument("--decoder", action="store_true",
                   help="export the prompt encoder + mask decoder of a full SAM checkpoint instead, with the official "
                   "SAM ONNX decoder's interface (image_embeddings, point_coords, point_labels, mask_input, "
                   "has_mask_input, orig_im_size -> masks, iou_predictions, low_res_masks)")
    p.add_argument("--return-single-mask", action="store_true",
                   help="with --decoder: one mask out, chosen as the official export does (default: all four)")
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
    p.add_argument("--force", action="store_true", help="replace OUT (and OUT.data) if they exist (refused otherwise)")
    add_quiet(p)


def run(args: argparse.Namespace) -> int:
    import sys

    import torch

    from ..checkpoints.load import load_encoder
    from ..export import DEFAULT_OPSET, export_onnx, export_onnx_int8, verify_onnx
    from ..runtime import TqdmProgress, progress_enabled
    from . import UserError

    if not args.checkpoint:
        raise UserError("no checkpoint: pass --checkpoint PATH or set SAMVIT_CHECKPOINT")
    if args.decoder:
        return _run_decoder(args)
    if args.return_single_mask:
        raise UserError("--return-single-mask only applies with --decoder")
    args.out = args.out or "encoder.onnx"
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a directory; expected a file name such as encoder.onnx")
    for path in (args.out, args.out + ".data"):
        if os.path.lexists(path) and os.path.lexists(args.checkpoint) and os.path.realpath(path) == \
                os.path.realpath(args.checkpoint):
            raise UserError(f"--out {path} is the checkpoint; choose another output file")
        if os.path.lexists(path) and not args.force:
            raise UserError(f"--out {path}: exists; pass --force to replace it")
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


def _run_decoder(args: argparse.Namespace) -> int:
    import sys

    from ..checkpoints.load import load_decoder
    from ..export import DEFAULT_OPSET, export_decoder_onnx, verify_decoder_onnx
    from ..checkpoints.registry import resolve_checkpoint
    from . import UserError

    if args.int8 or args.external_data:
        raise UserError("--int8 and --external-data apply to the encoder only; the decoder file (16 MB for the "
                        "released models) is written whole in float32")
    if args.model is not None:
        raise UserError("--model applies to the encoder only; the decoder's shapes are read from the checkpoint")
    if args.verify and args.return_single_mask:
        raise UserError("--verify compares all four masks: export without --return-single-mask to verify")
    args.out = args.out or "decoder.onnx"
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a directory; expected a file name such as decoder.onnx")
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    checkpoint = resolve_checkpoint(args.checkpoint, progress=False if args.quiet or not sys.stderr.isatty() else None)
    decoder = load_decoder(checkpoint, device="cpu")
    path = export_decoder_onnx(decoder, args.out, opset=opset, return_single_mask=args.return_single_mask)
    if not args.quiet:
        print(f"exported the prompt decoder ({'one mask' if args.return_single_mask else 'four masks'}, opset "
              f"{opset}) to {path}, {os.path.getsize(path) / 1e6:.1f} MB", file=sys.stderr)
    if args.verify:
        diff = verify_decoder_onnx(decoder, path)
        print(f"onnxruntime vs samvit Predictor float32: max abs {diff['max_abs']:.3g}, mean abs "
              f"{diff['mean_abs']:.3g}, cosine {diff['cosine']:.9f}")
    return 0
