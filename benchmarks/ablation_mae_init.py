"""Ablation (a) of docs/experiments.md in miniature: MAE pre-training vs random initialisation before the same
fine-tuning budget (the direction of the SAM paper's Table 6), on synthetic shapes, on CPU.

1. `samvit train mae` pre-trains mae_tiny (width 64, 3 blocks, 224 px) on synthetic shapes (seed 0), and
   `samvit train export-encoder` turns it into a 256 px SAM encoder (ENCODER below: 4x4 windows, block 2 global,
   a 64-channel neck).
2. Per fine-tuning seed s, two full SAM start checkpoints that differ only in the encoder's transferred weights
   (patch embedding, blocks, position embedding): the MAE encoder, and the same transfer from an MAE model at its
   initialisation (MAE's init: xavier linears, sine-cosine positions; no pre-training). The neck and the prompt
   encoder + mask decoder (DECODER, width 64) are the same fresh weights in both (drawn with seed s).
3. `samvit train sam` fine-tunes both (encoder, prompt encoder, mask decoder) with the same steps, batch, lr and
   seed on a written mask folder of shapes (seed 100), and `samvit evaluate` scores both (one call, --compare) on
   a held-out folder (seed 200), and on the shifted sets when asked: 1 point, 1 box, 1/3/5 correction clicks.

Prints markdown tables and writes OUT/results.json.

    python benchmarks/ablation_mae_init.py --out /tmp/abl --seeds 0,1

The low-label regime (docs/experiments.md, "(a) again"): few labelled pictures, two fine-tuning budgets, and
evaluation also on distributions neither the pre-training nor the fine-tuning saw. Several budgets (--ft-steps
400,1000) are one run per start with a constant lr after the warmup, evaluated at each budget and continued with
`--resume`. `--shifted-images N` (the
shifted synthetic style of samvit.train.shapes: stars, rings, blobs over stripes or checks, seed 300) and
`--coins` (scikit-image's coins photograph, 24 coins, masks from a watershed; see write_coins):

    python benchmarks/ablation_mae_init.py --out /tmp/abl-low --seeds 0,1,2,3,4 --mae-images 4096 \
        --train-images 16 --ft-steps 400,1000 --shifted-images 64 --coins --clicks 1
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import torch

from samvit import EncoderConfig, load_encoder
from samvit.checkpoints.files import CONFIG_METADATA_KEY, DECODER_CONFIG_METADATA_KEY, write_tensors
from samvit.config import DecoderConfig, mae_preset
from samvit.modeling.mae import MaskedAutoencoder
from samvit.modeling.sam import SamDecoder
from samvit.train.masks_data import ShapeMasks, save_mask_folder
from samvit.train.transfer import mae_to_sam_encoder

ENCODER = EncoderConfig(img_size=256, embed_dim=64, depth=3, num_heads=2, window_size=4, global_attn_indexes=(2,),
                        out_chans=64, name="enc_tiny")  # mae_tiny's width, depth and heads
DECODER = DecoderConfig(embed_dim=64, image_embedding_size=16, input_image_size=256, mlp_dim=256,
                        iou_head_hidden_dim=64)  # 8 heads, as every released SAM


def metrics_of(clicks: str) -> tuple:
    """The mIoU keys `samvit evaluate --clicks CLICKS` reports: point1, box, clicks<k>."""
    return ("point1_miou", "box_miou", *(f"clicks{int(k)}_miou" for k in clicks.split(",")))


def samvit(*args: str) -> float:
    """Run `python -m samvit ARGS` (this interpreter, this environment); returns its wall time in seconds."""
    t0 = time.perf_counter()
    print("+ samvit " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "samvit", *args], check=True)
    return time.perf_counter() - t0


def write_start(path: str, encoder_sd: dict, decoder: SamDecoder) -> None:
    """A full SAM checkpoint (official names) with both configs in its metadata, as `train sam` writes them."""
    sd = {"image_encoder." + k: v.contiguous() for k, v in encoder_sd.items()}
    sd.update({k: v.contiguous() for k, v in decoder.state_dict().items()})
    meta = {CONFIG_METADATA_KEY: ENCODER.to_json(), "format": "samvit",
            DECODER_CONFIG_METADATA_KEY: json.dumps(dataclasses.asdict(DECODER), sort_keys=True)}
    write_tensors(path, sd, meta)


@torch.no_grad()
def make_starts(out: str, mae_encoder_path: str, seed: int) -> dict:
    """The two start checkpoints of one seed: {'mae': path, 'random': path}."""
    torch.manual_seed(seed)
    random_enc = mae_to_sam_encoder(MaskedAutoencoder(mae_preset("mae_tiny")), ENCODER)  # MAE's init, not trained
    decoder = SamDecoder(DECODER)
    mae_enc = load_encoder(ENCODER, mae_encoder_path, dtype=torch.float32)
    mae_enc.neck.load_state_dict(random_enc.neck.state_dict())  # the same fresh neck in both
    paths = {}
    for name, enc in (("mae", mae_enc), ("random", random_enc)):
        paths[name] = os.path.join(out, f"start_{name}_s{seed}.safetensors")
        write_start(paths[name], enc.state_dict(), decoder)
    return paths


def mae_losses(run: str) -> tuple:
    """(first logged loss, last logged loss, last step) of an MAE run."""
    with open(os.path.join(run, "log.jsonl"), encoding="utf-8") as fh:
        logged = [r for r in map(json.loads, fh) if "loss" in r]
    return logged[0]["loss"], logged[-1]["loss"], logged[-1]["step"]


def cpu_line() -> str:
    from samvit.bench.runner import machine_info

    m = machine_info()
    return f"{m['cpu']}, {m['cores']} CPUs, flags: {m['isa_flags']}"


def write_coins(out: str, min_area: int = 50) -> str:
    """scikit-image's coins photograph (303x384 greyscale, as RGB) as a mask folder, one picture: the coins segmented
    by scikit-image's own recipe (a watershed of the Sobel edges from markers below 30 and above 150, holes filled,
    connected parts of at least min_area pixels: 24 coins). Machine-made masks, not a human's; returns out."""
    import numpy as np
    from PIL import Image
    from scipy import ndimage
    from skimage import data, filters, segmentation

    grey = data.coins()
    markers = np.zeros_like(grey)
    markers[grey < 30], markers[grey > 150] = 1, 2
    coins = ndimage.binary_fill_holes(segmentation.watershed(filters.sobel(grey), markers) == 2)
    labels, n = ndimage.label(coins)
    areas = ndimage.sum(coins, labels, range(1, n + 1))
    keep = [k + 1 for k in range(n) if areas[k] >= min_area]
    out_labels = np.zeros(grey.shape, dtype=np.uint8)
    for new, k in enumerate(keep, 1):
        out_labels[labels == k] = new
    for sub in ("images", "masks"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    Image.fromarray(np.stack([grey] * 3, -1)).save(os.path.join(out, "images", "coins.png"))
    Image.fromarray(out_labels).save(os.path.join(out, "masks", "coins.png"))
    return out


def warmup_for(steps: int, warmup: int) -> int:
    """The warmup of a fine-tuning run: --ft-warmup, at most a tenth of the (first) budget (50 of 1500 stays 50)."""
    return min(warmup, steps // 10)


def mean_sd(xs: list) -> tuple:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def summary(rows: list, metrics: tuple) -> list:
    """Per (dataset, ft steps, metric): both starts' mean ± sd over seeds, the per-seed MAE - random difference's
    mean ± sd, and how many seeds MAE wins."""
    out = []
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        for steps in dict.fromkeys(r["ft_steps"] for r in rows):
            sel = {init: {r["seed"]: r for r in rows if (r["dataset"], r["ft_steps"], r["init"]) == (ds, steps, init)}
                   for init in ("mae", "random")}
            seeds = sorted(sel["mae"])
            for m in metrics:
                mae, rnd = [sel["mae"][s][m] for s in seeds], [sel["random"][s][m] for s in seeds]
                diff = [a - b for a, b in zip(mae, rnd)]
                out.append({"dataset": ds, "ft_steps": steps, "metric": m, "seeds": seeds,
                            "mae_mean_sd": mean_sd(mae), "random_mean_sd": mean_sd(rnd), "diff_mean_sd": mean_sd(diff),
                            "mae_wins": sum(d > 0 for d in diff), "n_objects": sel["mae"][seeds[0]]["n_objects"]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (created; must be new)")
    p.add_argument("--seeds", default="0,1", help="fine-tuning seeds (comma-separated)")
    p.add_argument("--mae-steps", type=int, default=1500)
    p.add_argument("--mae-batch", type=int, default=32)
    p.add_argument("--mae-images", type=int, default=2048, help="synthetic pictures for MAE pre-training")
    p.add_argument("--mae-lr", type=float, default=1.5e-3)
    p.add_argument("--mae-run", help="reuse this finished `samvit train mae` run (e.g. OUT/mae of an earlier call, "
                   "for more fine-tuning seeds) instead of pre-training again")
    p.add_argument("--ft-steps", default="1500", help="fine-tuning steps (warmup, cosine to 0); several, ascending "
                   "(comma-separated): warmup and a constant lr, one run evaluated at each budget (resumed in between)")
    p.add_argument("--ft-batch", type=int, default=4)
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--ft-warmup", type=int, default=50, help="warmup steps (at most a tenth of the run)")
    p.add_argument("--masks-per-image", type=int, default=2)
    p.add_argument("--iterations", type=int, default=0, help="correction clicks per training sample (0: the first "
                   "prompt only, as tests/test_finetune_learns.py: a fresh decoder learns to localise sooner)")
    p.add_argument("--train-images", type=int, default=256, help="labelled pictures for fine-tuning (seed 100)")
    p.add_argument("--val-images", type=int, default=64, help="held-out pictures of the same generator (seed 200)")
    p.add_argument("--shifted-images", type=int, default=0, help="also evaluate on N pictures of the shifted "
                   "synthetic style (seed 300; 0: not)")
    p.add_argument("--coins", action="store_true", help="also evaluate on scikit-image's coins photograph")
    p.add_argument("--clicks", default="1,3,5", help="correction clicks evaluated (`samvit evaluate --clicks`)")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    budgets = [int(s) for s in a.ft_steps.split(",")]
    if budgets != sorted(set(budgets)):
        p.error(f"--ft-steps {a.ft_steps}: expected ascending budgets, e.g. 400,1000")
    metrics = metrics_of(a.clicks)
    os.makedirs(a.out, exist_ok=False)
    out = os.path.abspath(a.out)
    t_start = time.perf_counter()

    train_dir = save_mask_folder(ShapeMasks(a.train_images, ENCODER.img_size, seed=100), os.path.join(out, "train"))
    eval_dirs = [save_mask_folder(ShapeMasks(a.val_images, ENCODER.img_size, seed=200), os.path.join(out, "val"))]
    if a.shifted_images:
        eval_dirs.append(save_mask_folder(ShapeMasks(a.shifted_images, ENCODER.img_size, seed=300, style="shifted"),
                                          os.path.join(out, "shifted")))
    if a.coins:
        eval_dirs.append(write_coins(os.path.join(out, "coins")))
    preset = os.path.join(out, "enc_tiny.json")
    with open(preset, "w", encoding="utf-8") as fh:
        json.dump(ENCODER.to_dict(), fh)

    if a.mae_run:
        mae_run, mae_s = os.path.abspath(a.mae_run), None  # its time is in the earlier call's results
    else:
        mae_run = os.path.join(out, "mae")
        mae_s = samvit("train", "mae", "--data", "synthetic", "--model", "mae_tiny", "--synthetic-size",
                       str(a.mae_images), "--batch-size", str(a.mae_batch), "--steps", str(a.mae_steps),
                       "--decay-steps", str(a.mae_steps), "--lr", str(a.mae_lr), "--seed", "0", "--log-every", "25",
                       "--ckpt-every", str(a.mae_steps), "--out", mae_run, "--quiet")
    mae_first, mae_last, mae_steps = mae_losses(mae_run)
    print(f"MAE: loss {mae_first:.4f} -> {mae_last:.4f} in {mae_steps} steps, "
          f"{'reused' if mae_s is None else f'{mae_s:.0f} s'}", flush=True)
    enc_mae = os.path.join(out, "enc_mae.safetensors")
    samvit("train", "export-encoder", mae_run, "--preset", preset, "--out", enc_mae)

    rows = []
    for seed in seeds:
        starts = make_starts(out, enc_mae, seed)
        runs = {init: os.path.join(out, f"ft_{init}_s{seed}") for init in ("mae", "random")}
        ft_s = {"mae": 0.0, "random": 0.0}
        for k, steps in enumerate(budgets):
            # one budget: warmup + cosine to 0 at its end; several: warmup + constant lr, each budget the same run
            # continued (--resume, bit for bit), so the shorter budgets are the longer run's first steps
            schedule = ["--decay-steps", str(steps)] if len(budgets) == 1 else (["--resume"] if k else [])
            for init in ("mae", "random"):
                ft_s[init] += samvit("train", "sam", "--data", train_dir, "--checkpoint", starts[init], "--out",
                                     runs[init], "--train", "encoder,prompt,decoder", "--batch-size",
                                     str(a.ft_batch), "--steps", str(steps), "--lr", str(a.ft_lr), *schedule,
                                     "--warmup-steps", str(warmup_for(budgets[0], a.ft_warmup)), "--seed", str(seed),
                                     "--masks-per-image", str(a.masks_per_image), "--iterations", str(a.iterations),
                                     "--log-every", "20", "--ckpt-every", str(steps), "--quiet")
            ev_json = os.path.join(out, f"eval_s{seed}_n{steps}.json")  # both starts, the same prompts
            data_args = [x for d in eval_dirs for x in ("--data", d)]
            ev_s = samvit("evaluate", *data_args, "--checkpoint", os.path.join(runs["mae"], "final.safetensors"),
                          "--compare", os.path.join(runs["random"], "final.safetensors"), "--clicks", a.clicks,
                          "--json", ev_json, "--quiet")
            with open(ev_json, encoding="utf-8") as fh:
                ev = json.load(fh)
            for init, res in (("mae", ev), ("random", ev["compare"])):
                for ds, d in res["per_dataset"].items():
                    rows.append({"init": init, "seed": seed, "dataset": ds, **{m: d[m] for m in metrics},
                                 "n_objects": d["n_objects"], "ft_steps": steps, "ft_s": ft_s[init],
                                 "schedule": "cosine" if len(budgets) == 1 else "constant",
                                 "eval_s_both": ev_s})
                    print(json.dumps(rows[-1]), flush=True)

    result = {"args": vars(a), "machine": cpu_line(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "mae": {"run": mae_run, "steps": mae_steps, "loss_first": mae_first, "loss_last": mae_last,
                      "wall_s": mae_s},
              "rows": rows, "summary": summary(rows, metrics), "total_s": time.perf_counter() - t_start}
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)

    print(f"\n{result['date_utc']}; {result['machine']}; torch {torch.__version__}, {result['threads']} thread(s)")
    print(f"MAE pre-training ({mae_run}): {mae_steps} steps, loss {mae_first:.4f} -> {mae_last:.4f}, "
          f"{'reused' if mae_s is None else f'{mae_s:.0f} s'}\n")
    print("| dataset | ft steps | start | seed | " + " | ".join(metrics) + " | ft wall s |")
    print("|---" * (5 + len(metrics)) + "|")
    for r in sorted(rows, key=lambda r: (r["dataset"], -r["ft_steps"], r["seed"], r["init"])):
        print(f"| {r['dataset']} | {r['ft_steps']} | {r['init']} | {r['seed']} | "
              + " | ".join(f"{r[m]:.3f}" for m in metrics) + f" | {r['ft_s']:.0f} |")
    print("\n| dataset (objects) | ft steps | metric | MAE mean ± sd | random mean ± sd | MAE - random ± sd | "
          "MAE wins |\n|---|---|---|---|---|---|---|")
    for x in result["summary"]:
        print(f"| {x['dataset']} ({x['n_objects']}) | {x['ft_steps']} | {x['metric']} | "
              + " | ".join("{:.3f} ± {:.3f}".format(*x[k]) for k in ("mae_mean_sd", "random_mean_sd", "diff_mean_sd"))
              + f" | {x['mae_wins']} of {len(x['seeds'])} |")
    print(f"\ntotal {result['total_s']:.0f} s")


if __name__ == "__main__":
    main()
