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
   seed on a written mask folder of shapes (seed 100), and `samvit evaluate` scores them on a held-out folder
   (seed 200): 1 point, 1 box, 1/3/5 correction clicks.

Prints a markdown table and writes OUT/results.json.

    python benchmarks/ablation_mae_init.py --out /tmp/abl --seeds 0,1
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
METRICS = ("point1_miou", "box_miou", "clicks1_miou", "clicks3_miou", "clicks5_miou")


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
    p.add_argument("--ft-steps", type=int, default=1500)
    p.add_argument("--ft-batch", type=int, default=4)
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--ft-warmup", type=int, default=50)
    p.add_argument("--masks-per-image", type=int, default=2)
    p.add_argument("--iterations", type=int, default=0, help="correction clicks per training sample (0: the first "
                   "prompt only, as tests/test_finetune_learns.py: a fresh decoder learns to localise sooner)")
    p.add_argument("--train-images", type=int, default=256)
    p.add_argument("--val-images", type=int, default=64)
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    os.makedirs(a.out, exist_ok=False)
    out = os.path.abspath(a.out)
    t_start = time.perf_counter()

    train_dir = save_mask_folder(ShapeMasks(a.train_images, ENCODER.img_size, seed=100), os.path.join(out, "train"))
    val_dir = save_mask_folder(ShapeMasks(a.val_images, ENCODER.img_size, seed=200), os.path.join(out, "val"))
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
        for init in ("mae", "random"):
            run = os.path.join(out, f"ft_{init}_s{seed}")
            ft_s = samvit("train", "sam", "--data", train_dir, "--checkpoint", starts[init], "--out", run,
                          "--train", "encoder,prompt,decoder", "--batch-size", str(a.ft_batch), "--steps",
                          str(a.ft_steps), "--lr", str(a.ft_lr), "--decay-steps", str(a.ft_steps),
                          "--warmup-steps", str(a.ft_warmup), "--seed",
                          str(seed), "--masks-per-image", str(a.masks_per_image), "--iterations", str(a.iterations),
                          "--log-every", "20", "--ckpt-every", str(a.ft_steps), "--quiet")
            ev_json = os.path.join(run, "eval.json")
            ev_s = samvit("evaluate", "--data", val_dir, "--checkpoint", os.path.join(run, "final.safetensors"),
                          "--json", ev_json, "--quiet")
            with open(ev_json, encoding="utf-8") as fh:
                ev = json.load(fh)
            rows.append({"init": init, "seed": seed, **{m: ev[m] for m in METRICS}, "n_objects": ev["n_objects"],
                         "ft_steps": a.ft_steps, "ft_s": ft_s, "eval_s": ev_s})
            print(json.dumps(rows[-1]), flush=True)

    result = {"args": vars(a), "machine": cpu_line(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "mae": {"run": mae_run, "steps": mae_steps, "loss_first": mae_first, "loss_last": mae_last,
                      "wall_s": mae_s},
              "rows": rows, "total_s": time.perf_counter() - t_start}
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)

    print(f"\n{result['date_utc']}; {result['machine']}; torch {torch.__version__}, {result['threads']} thread(s)")
    print(f"MAE pre-training ({mae_run}): {mae_steps} steps, loss {mae_first:.4f} -> {mae_last:.4f}, "
          f"{'reused' if mae_s is None else f'{mae_s:.0f} s'}; held-out objects: {rows[0]['n_objects']}\n")
    print("| start | seed | point1_miou | box_miou | clicks1 | clicks3 | clicks5 | ft steps | ft wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['init']} | {r['seed']} | " + " | ".join(f"{r[m]:.3f}" for m in METRICS)
              + f" | {r['ft_steps']} | {r['ft_s']:.0f} |")
    for init in ("mae", "random"):
        sel = [r for r in rows if r["init"] == init]
        print(f"| {init} mean | - | " + " | ".join(f"{sum(r[m] for r in sel) / len(sel):.3f}" for m in METRICS)
              + " | - | - |")
    print(f"\ntotal {result['total_s']:.0f} s")


if __name__ == "__main__":
    main()
