"""int8 encoders against float32: embedding cosine and mask agreement (IoU of the decoder's masks from int8 vs float32
embeddings, same decoder, same prompts) on scikit-image's photos; bfloat16 beside them as the yardstick.

    python benchmarks/int8_accuracy.py --model vit_b --threads 2 --out benchmarks/results/int8_accuracy_vit_b.md
    python benchmarks/int8_accuracy.py --checkpoint sam_vit_b_01ec64.pth ...   # real weights: the meaningful run

Variants: bf16 (samvit bfloat16 weights, what dtype="auto" picks on AMX), ort_int8 / ort_uint8 (onnxruntime dynamic
int8 of the linear layers, int8 or uint8 weights: samvit.export.Int8Encoder), ov_int8 (OpenVINO running the
same int8 file), torch_int8 (torch.ao quantize_dynamic of nn.Linear). Prompts: a 4x4 grid of single foreground
points per image, the 3 multimask outputs per prompt, low-resolution masks (logits > 0).

WITHOUT --checkpoint the weights are random (no SAM weights can be downloaded here): the cosine is meaningful as
a measure of the numeric perturbation, the mask IoU is NOT a measure of segmentation quality (a random decoder's
masks follow no object). It is reported relative to bfloat16's IoU under the same random decoder: int8 is "no
worse than bf16" when its IoUs are as high. The verdict for offering int8 needs the run with --checkpoint.
Timing is not measured here (bench_int8.py does that on a quiet machine).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import resource
import shlex
import sys
import time
from typing import Dict, List

import torch

import samvit
from samvit.bench.runner import machine_info
from samvit.export import Int8Encoder, cosine, grid_prompts, mask_agreement, summarise, torch_dynamic_int8

IMAGES = ("astronaut", "coffee", "chelsea")
VARIANTS = ("bf16", "ort_int8", "ort_uint8", "ov_int8", "torch_int8")


def photos() -> Dict[str, object]:
    from skimage import data

    return {name: getattr(data, name)() for name in IMAGES}


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--checkpoint", default=None, help="a full SAM checkpoint (encoder + decoder); default random")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--grid", type=int, default=4, help="n x n point prompts per image (default 4)")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        print(f"int8_accuracy.py: unknown variants {bad}; expected some of {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if args.checkpoint:
        enc, dec = samvit.load_sam(args.checkpoint, dtype=torch.float32)
        weights = f"checkpoint {args.checkpoint}"
    else:
        from samvit.bench.weights import random_weights

        cfg = samvit.preset(args.model)
        enc = samvit.load_encoder(cfg, checkpoint=random_weights(cfg), dtype=torch.float32)
        dec = samvit.SamDecoder(samvit.DecoderConfig()).eval()
        weights = "RANDOM weights (samvit.bench.weights.random_weights, seed 0; decoder: default init, seed 0)"
    enc.eval()
    imgs = {k: samvit.preprocess(v).tensor[None] for k, v in photos().items()}
    points = grid_prompts(enc.config.img_size, args.grid)
    with torch.inference_mode():
        ref = {k: enc(x).float() for k, x in imgs.items()}
    fg = {k: float((dec(e, (points, torch.ones(points.shape[:2], dtype=torch.int64)))[0] > 0).float().mean())
          for k, e in ref.items()}
    rows = []
    for v in variants:
        t0 = time.perf_counter()
        if v == "bf16":
            model = samvit.load_encoder(enc.config, checkpoint=enc.state_dict(), dtype=torch.bfloat16)
        elif v == "torch_int8":
            model = torch_dynamic_int8(enc)
        else:
            model = Int8Encoder(enc, "openvino" if v.startswith("ov_") else "onnxruntime",
                                "uint8" if v.endswith("uint8") else "int8", threads=args.threads)
        per_image = {}
        with torch.inference_mode():
            for k, x in imgs.items():
                out = model(x.to(model.dtype) if v == "bf16" else x).float()
                per_image[k] = {"cosine": cosine(out, ref[k]), "max_abs": float((out - ref[k]).abs().max()),
                                **mask_agreement(dec, out, ref[k], points)}
        pooled = summarise(list(per_image.values()))
        rows.append({"variant": v, "per_image": per_image, **pooled, "seconds": time.perf_counter() - t0})
        print(f"{v}: cosine " + " ".join(f"{r['cosine']:.6f}" for r in per_image.values())
              + f"; mask IoU mean {pooled['mean_iou']:.4f} min {pooled['min_iou']:.4f}, "
              f">= 0.98: {100 * pooled['fraction_ge_0.98']:.0f}% of {pooled['masks']}", flush=True)
        del model
        gc.collect()

    m = machine_info()
    lines = [f"# int8 accuracy: {enc.config.name}, {weights}", "",
             f"Command: `python benchmarks/int8_accuracy.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
             f"Machine: {m['cpu']}, {m['cores']} CPUs, {m['isa_flags']}; torch {m['torch']}; {m['date']}. "
             f"Peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB.",
             f"Images: scikit-image {', '.join(IMAGES)}; prompts: {args.grid}x{args.grid} single points, 3 mask "
             f"outputs each, low-res masks (logits > 0); float32 masks' foreground share: "
             + ", ".join(f"{k} {100 * f:.0f}%" for k, f in fg.items()) + ".", "",
             "| variant | cosine to fp32 (" + ", ".join(IMAGES) + ") | max abs | mask IoU mean | min | "
             "masks with IoU >= 0.98 |", "|---|---|---|---|---|---|"]
    for r in rows:
        pi = r["per_image"].values()
        cosines = " / ".join(f"{p['cosine']:.6f}" for p in pi)
        lines.append(f"| {r['variant']} | {cosines} | "
                     f"{max(p['max_abs'] for p in pi):.3g} | {r['mean_iou']:.4f} | {r['min_iou']:.4f} | "
                     f"{100 * r['fraction_ge_0.98']:.0f}% of {r['masks']} |")
    if not args.checkpoint:
        lines += ["", "Random weights: the IoU columns compare each variant with bfloat16 under the same random "
                  "decoder; they do not measure segmentation quality. Rerun with --checkpoint for the verdict."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
