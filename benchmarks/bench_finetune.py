"""Fine-tuning SAM: memory and time of a training step, and the decoder-only-from-a-store speed-up.

1. `memory`: ViT-B SAM at 1024, batch 1 (one image, one mask, one point prompt), forward + backward of the whole
   model (encoder, prompt encoder, mask decoder) with SAM's loss, each configuration in a fresh subprocess: peak
   RSS (ru_maxrss), RSS after building the model, and the time of the second step (the first warms up).
2. `store`: decoder-only training (prompt encoder + mask decoder; frozen ViT-B encoder) on a mask folder of
   synthetic shapes at 1024: steps per second reading the embeddings from an EmbeddingStore (filled once by the
   embed pipeline, timed too) against re-running the encoder every step; the two are interleaved step by step in
   one process (the machine is shared: a ratio measured side by side is the robust figure).

    PYTHONPATH=src python benchmarks/bench_finetune.py memory --configs fp32,bf16+ckpt
    PYTHONPATH=src python benchmarks/bench_finetune.py store --steps 4 --images 4
    PYTHONPATH=src python benchmarks/bench_finetune.py all --out benchmarks/results/finetune.md

Writes a markdown report (with the command, machine, date) to --out, or prints it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

CONFIGS = {  # name -> (precision, activation checkpointing)
    "fp32": ("fp32", False),
    "fp32+ckpt": ("fp32", True),
    "bf16": ("bf16", False),
    "bf16+ckpt": ("bf16", True),
}


def rss_mib() -> float:
    """The current resident set size (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def one_batch(img_size: int = 1024, low_res: int = 256):
    """A batch of one synthetic 1024 picture with one of its masks and a point prompt (MaskSamples)."""
    from samvit.train.masks_data import MaskSamples, ShapeMasks
    from torch.utils.data import default_collate

    ds = MaskSamples(ShapeMasks(1, size=img_size, seed=0), img_size, low_res, masks_per_image=1, seed=0)
    batch = default_collate([ds[(0, 0)]])
    batch["use_box"][:] = False
    return batch


def memory_worker(config: str, steps: int) -> dict:
    """One configuration, in this (fresh) process: build ViT-B SAM, run `steps` training steps (forward + backward,
    no optimizer), report RSS and the last step's time."""
    import torch

    from samvit.config import DecoderConfig, preset
    from samvit.modeling.encoder import ImageEncoder
    from samvit.modeling.sam import Sam, SamDecoder
    from samvit.train.finetune import sam_loss
    from samvit.train.launch import autocast

    precision, ckpt = CONFIGS[config]
    torch.manual_seed(0)
    model = Sam(ImageEncoder(preset("vit_b")), SamDecoder(DecoderConfig())).train()
    model.set_grad_checkpointing(ckpt)
    batch = one_batch()
    loss_fn = sam_loss(0, 1024)
    base = rss_mib()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with autocast(torch.device("cpu"), precision):
            loss = loss_fn(model, batch)["loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return {"config": config, "precision": precision, "checkpointing": ckpt, "threads": torch.get_num_threads(),
            "rss_after_build_mib": base, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "step_s": times, "loss": float(loss)}


def run_memory(configs, steps: int) -> list:
    out = []
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"unknown config {c!r}; expected some of {', '.join(CONFIGS)}")
        proc = subprocess.run([sys.executable, __file__, "_memory_worker", c, str(steps)], capture_output=True,
                              text=True)
        if proc.returncode:
            raise SystemExit(f"{c}: worker failed\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{c}: peak RSS {r['peak_rss_mib']:.0f} MiB (model built: {r['rss_after_build_mib']:.0f}), "
              f"steps {', '.join(f'{t:.1f}' for t in r['step_s'])} s", file=sys.stderr)
        out.append(r)
    return out


def run_store(steps: int, images: int) -> dict:
    """Interleaved decoder-only steps: embeddings from the store vs the frozen encoder re-run."""
    import torch
    from torch.utils.data import default_collate

    from samvit.checkpoints.files import CONFIG_METADATA_KEY, write_tensors
    from samvit.config import DecoderConfig, preset
    from samvit.modeling.encoder import ImageEncoder
    from samvit.modeling.sam import Sam, SamDecoder
    from samvit.train.finetune import build_sam, ensure_store, sam_loss
    from samvit.train.masks_data import MaskSamples, ShapeMasks, open_masks, save_mask_folder
    from samvit.train.optim import build_optimizer

    tmp = tempfile.mkdtemp(prefix="bench_finetune_")
    torch.manual_seed(0)
    ck = os.path.join(tmp, "vit_b_random.safetensors")
    write_tensors(ck, Sam(ImageEncoder(preset("vit_b")), SamDecoder(DecoderConfig())).state_dict(),
                  {CONFIG_METADATA_KEY: preset("vit_b").to_json()})
    folder = save_mask_folder(ShapeMasks(images, size=1024, seed=0), os.path.join(tmp, "shapes"))
    source = open_masks(folder)
    t = time.perf_counter()
    store = ensure_store(os.path.join(tmp, "store"), source, ck, quiet=True)
    embed_s = time.perf_counter() - t
    model = build_sam(ck, train_parts=("prompt", "decoder"))
    optimizer = build_optimizer(model, 1e-4)
    loss_fn = sam_loss(0, 1024)
    with_store = MaskSamples(source, 1024, 256, 4, seed=0, store=store)
    with_encoder = MaskSamples(source, 1024, 256, 4, seed=0)
    times = {"store": [], "encoder": []}
    for step in range(steps + 1):  # step 0 warms up both
        for name, ds in (("store", with_store), ("encoder", with_encoder)):
            t = time.perf_counter()
            batch = default_collate([ds[(0, step % len(ds))]])
            loss = loss_fn(model, batch)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step:
                times[name].append(time.perf_counter() - t)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    sps = {k: len(v) / sum(v) for k, v in times.items()}
    return {"images": images, "steps": steps, "masks_per_image": 4, "embed_store_s": embed_s,
            "store_steps_per_s": sps["store"], "encoder_steps_per_s": sps["encoder"],
            "speedup": sps["store"] / sps["encoder"], "step_s": times, "threads": torch.get_num_threads()}


def machine() -> str:
    from samvit.bench.runner import machine_info

    m = machine_info()
    return f"{m['cpu']}, {m['cores']} CPUs, flags: {m['isa_flags']}"


def report(command: str, mem: list, store: dict) -> str:
    lines = ["# Fine-tuning SAM: memory, step time, decoder-only from a store", "",
             f"Command: `{command}`  ", f"Machine: {machine()}  ",
             f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  ",
             "Note: a shared 2-core machine (other engineers' jobs ran at the same time): absolute times are "
             "disturbed; the ratios measured side by side are the robust figures.", ""]
    if mem:
        lines += ["## ViT-B at 1024, batch 1: forward + backward of the whole model", "",
                  "One image, one mask, one point prompt, SAM's loss; each configuration in a fresh process; "
                  f"{mem[0]['threads']} threads.", "",
                  "| configuration | peak RSS MiB | RSS with the model built MiB | peak - built MiB | step s |",
                  "|---|---:|---:|---:|---:|"]
        for r in mem:
            lines.append(f"| {r['config']} | {r['peak_rss_mib']:.0f} | {r['rss_after_build_mib']:.0f} | "
                         f"{r['peak_rss_mib'] - r['rss_after_build_mib']:.0f} | {r['step_s'][-1]:.1f} |")
        lines.append("")
    if store:
        lines += ["## Decoder-only: embeddings from a store vs re-running the frozen encoder", "",
                  f"ViT-B, {store['images']} synthetic 1024 images, {store['masks_per_image']} masks per step, "
                  f"{store['steps']} timed steps each, interleaved; {store['threads']} threads.", "",
                  "| embeddings | steps/s | s/step |", "|---|---:|---:|",
                  f"| from the store | {store['store_steps_per_s']:.3f} | {1 / store['store_steps_per_s']:.2f} |",
                  f"| encoder re-run | {store['encoder_steps_per_s']:.3f} | {1 / store['encoder_steps_per_s']:.2f} |",
                  "", f"Speed-up: **{store['speedup']:.1f}x**. Filling the store once (embed pipeline, "
                  f"{store['images']} images): {store['embed_store_s']:.1f} s.", ""]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_memory_worker":
        print(json.dumps(memory_worker(sys.argv[2], int(sys.argv[3]))))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("memory", "store", "all"))
    p.add_argument("--configs", default="fp32,bf16+ckpt", help=f"memory configurations ({', '.join(CONFIGS)})")
    p.add_argument("--mem-steps", type=int, default=2, help="steps per memory configuration (default 2)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per store variant (default 4)")
    p.add_argument("--images", type=int, default=4, help="images in the store benchmark (default 4)")
    p.add_argument("--out", default=None, help="write the markdown report here")
    p.add_argument("--json", default=None, help="write the raw results here")
    args = p.parse_args()
    mem = run_memory(args.configs.split(","), args.mem_steps) if args.what in ("memory", "all") else []
    store = run_store(args.steps, args.images) if args.what in ("store", "all") else {}
    text = report("PYTHONPATH=src python " + " ".join(["benchmarks/bench_finetune.py"] + sys.argv[1:]), mem, store)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"memory": mem, "store": store}, fh, indent=2)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
