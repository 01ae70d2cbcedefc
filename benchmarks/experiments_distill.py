"""The distillation ablations of docs/experiments.md in miniature, on synthetic shapes, on CPU.

A random-weight teacher (width 128, depth 6, 256 px, 32-channel embedding, decoder rescaled so that its masks
depend on the prompt) is distilled with `samvit train distill` into students of other width and depth at one fixed
budget (same steps, batch, lr, images). Each student is scored on held-out pictures (another seed): embedding cosine
to the teacher (raw, and centred per channel), mask IoU against the teacher's masks for the same point prompts
(via samvit.Predictor with the teacher's decoder), and encoder seconds per image, all measured in this one process.

    python benchmarks/experiments_distill.py --out /tmp/exp_distill --steps 100 --batch-size 4 --images 32 --held-out 8
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samvit import EncoderConfig, ImageEncoder, Predictor, load_decoder, load_encoder, preprocess
from samvit.bench.weights import randomize_
from samvit.checkpoints.files import CONFIG_METADATA_KEY, write_tensors
from samvit.cli import main
from samvit.config import DecoderConfig
from samvit.modeling.sam import SamDecoder
from samvit.train.shapes import render_shapes

TEACHER = EncoderConfig(img_size=256, embed_dim=128, depth=6, num_heads=4, window_size=4, global_attn_indexes=(2, 5),
                        out_chans=32, name="teacher_mini")
STUDENTS = {  # vit_t / vit_s in miniature: the same heads per width (64 per head), windows and global blocks
    "tiny (48 wide, 6 deep)": EncoderConfig(img_size=256, embed_dim=48, depth=6, num_heads=3, window_size=4,
                                            global_attn_indexes=(2, 5), out_chans=32, name="tiny_mini"),
    "small (96 wide, 6 deep)": EncoderConfig(img_size=256, embed_dim=96, depth=6, num_heads=6, window_size=4,
                                             global_attn_indexes=(2, 5), out_chans=32, name="small_mini"),
    "tiny deep (48 wide, 12 deep)": EncoderConfig(img_size=256, embed_dim=48, depth=12, num_heads=3, window_size=4,
                                                  global_attn_indexes=(2, 5, 8, 11), out_chans=32,
                                                  name="tiny_deep_mini"),
}
DECODER = DecoderConfig(embed_dim=32, image_embedding_size=16, input_image_size=256, mlp_dim=64, num_heads=2,
                        iou_head_hidden_dim=64)


@torch.no_grad()
def make_teacher(path: str, seed: int = 0) -> None:
    """A full SAM checkpoint (official names, config in the metadata) of random weights; the decoder's weights
    rescaled to std 2/sqrt(fan_in) so that its masks depend on the prompt (as tests/_masks_utils.liven_decoder_)."""
    enc = randomize_(ImageEncoder(TEACHER), seed)
    dec = randomize_(SamDecoder(DECODER), seed + 1)
    for mod in dec.modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            fan_in = mod.weight.shape[0] if isinstance(mod, nn.ConvTranspose2d) else mod.weight[0].numel()
            mod.weight.mul_(2.0 / (mod.weight.std().item() * math.sqrt(fan_in)))
    sd = {"image_encoder." + k: v for k, v in enc.state_dict().items()}
    sd.update(dec.state_dict())
    write_tensors(path, sd, {CONFIG_METADATA_KEY: TEACHER.to_json()})


def scores(teacher: ImageEncoder, student: ImageEncoder, decoder, images) -> dict:
    cos, cen, ious = [], [], []
    ref, pred = Predictor(teacher, decoder), Predictor(student, decoder)
    for s in images:
        x = preprocess(s.image, 256).tensor[None]
        with torch.inference_mode():
            t, e = teacher(x), student(x)
        cos.append(F.cosine_similarity(t, e, dim=1).mean().item())
        cen.append(F.cosine_similarity(t - t.mean((2, 3), keepdim=True), e - e.mean((2, 3), keepdim=True),
                                       dim=1).mean().item())
        ref.set_image(s.image), pred.set_image(s.image)
        for m in s.masks:
            ys, xs = np.nonzero(m)
            point = np.array([[xs.mean(), ys.mean()]])
            a = ref.predict(point, np.array([1]), multimask_output=False)[0][0]
            b = pred.predict(point, np.array([1]), multimask_output=False)[0][0]
            union = (a | b).sum()
            ious.append((a & b).sum() / union if union else 1.0)
    return {"cosine": float(np.mean(cos)), "centred_cosine": float(np.mean(cen)), "mask_iou": float(np.mean(ious))}


def seconds_per_image(encoders: dict, repeats: int = 5) -> dict:
    """Median forward seconds of each encoder on one 256 px image, the encoders interleaved round by round."""
    x = torch.randn(1, 3, 256, 256)
    times = {k: [] for k in encoders}
    with torch.inference_mode():
        for enc in encoders.values():
            enc(x)
        for _ in range(repeats):
            for k, enc in encoders.items():
                t0 = time.perf_counter()
                enc(x)
                times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def main_(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="work folder (new)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--images", type=int, default=64, help="synthetic training pictures")
    ap.add_argument("--held-out", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=False)
    teacher_path = os.path.join(args.out, "teacher.safetensors")
    make_teacher(teacher_path)
    teacher = load_encoder(checkpoint=teacher_path)
    decoder = load_decoder(teacher_path, DECODER)
    held_out = [render_shapes(i, seed=1234, size=256) for i in range(args.held_out)]
    rows, encoders = {}, {"teacher (128 wide, 6 deep)": teacher}
    store = None
    for name, cfg in STUDENTS.items():
        js = os.path.join(args.out, cfg.name + ".json")
        with open(js, "w") as fh:
            json.dump(cfg.to_dict(), fh)
        run = os.path.join(args.out, cfg.name)
        cmd = ["train", "distill", "--teacher", teacher_path, "--student", js, "--data", "synthetic",
               "--synthetic-size", str(args.images), "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--lr", "2e-3",
               "--warmup-steps", str(args.steps // 10), "--decay-steps", str(args.steps), "--weight-decay", "0",
               "--cosine-weight", "1", "--log-every", "10", "--quiet", "--out", run]
        if store:
            cmd += ["--teacher-store", store]  # the teacher's embeddings computed once, by the first run
        t0 = time.perf_counter()
        assert main(cmd) == 0, cmd
        train_s = time.perf_counter() - t0
        store = store or os.path.join(run, "teacher_store")
        student = load_encoder(checkpoint=os.path.join(run, "student.safetensors"))
        torch.manual_seed(0)
        untrained = ImageEncoder(cfg).eval()
        rows[name] = {"params_M": sum(p.numel() for p in student.parameters()) / 1e6, "train_s": train_s,
                      **scores(teacher, student, decoder, held_out),
                      "untrained": scores(teacher, untrained, decoder, held_out)}
        encoders[name] = student
        print(name, json.dumps(rows[name]), flush=True)
    speed = seconds_per_image(encoders)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), "?")
    flags = next((l.split(":", 1)[1].split() for l in lscpu.splitlines() if l.startswith("Flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    record = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "date": time.strftime(
        "%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": model, "isa": isa, "cores": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "steps": args.steps, "batch_size": args.batch_size, "images": args.images, "held_out": args.held_out, "rows": rows, "speed_s": speed}
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(record, fh, indent=2)
    t_speed = speed["teacher (128 wide, 6 deep)"]
    print(f"\n{record['date']}; {model}; {', '.join(isa)}; {os.cpu_count()} cores; torch {torch.__version__}; "
          f"{torch.get_num_threads()} threads\n")
    print("| student | params | train s | cosine (untrained) | centred cosine (untrained) | mask IoU vs teacher "
          "(untrained) | s/img at 256 px | speed-up vs teacher |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| teacher (128 wide, 6 deep) | {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M | - | 1 | 1 | 1 "
          f"| {t_speed * 1e3:.1f} ms | 1.00x |")
    for name, r in rows.items():
        u = r["untrained"]
        print(f"| {name} | {r['params_M']:.2f}M | {r['train_s']:.0f} | {r['cosine']:.3f} ({u['cosine']:.3f}) | "
              f"{r['centred_cosine']:.3f} ({u['centred_cosine']:.3f}) | {r['mask_iou']:.3f} ({u['mask_iou']:.3f}) | "
              f"{speed[name] * 1e3:.1f} ms | {t_speed / speed[name]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main_())
