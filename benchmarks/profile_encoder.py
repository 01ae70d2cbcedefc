"""Where the fast path's time goes: torch.profiler over one forward pass, grouped by operator kind.

    python benchmarks/profile_encoder.py --threads 2 --out benchmarks/results/profile_vit_b.md
"""
from __future__ import annotations

import argparse
import datetime
import platform
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import samvit

GROUPS = {  # profiler op name -> what it is
    "aten::addmm": "Linear (qkv, proj, MLP)", "aten::mm": "Linear (qkv, proj, MLP)",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "SDPA", "aten::_scaled_dot_product_attention_math": "SDPA",
    "aten::einsum": "relative-position terms", "aten::bmm": "relative-position terms",
    "aten::gelu": "GELU", "aten::native_layer_norm": "LayerNorm",
    "aten::convolution": "convolutions (patch embed, neck)", "aten::mkldnn_convolution": "convolutions (patch embed, neck)",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_b")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the markdown here")
    args = p.parse_args()
    samvit.tune_allocator()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    enc = samvit.ImageEncoder(samvit.preset(args.model)).eval()
    x = torch.randn(1, 3, enc.config.img_size, enc.config.img_size)
    with torch.inference_mode():
        enc(x)  # warm-up
        t0 = time.perf_counter()
        enc(x)
        wall = time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            enc(x)
    by_group: dict = defaultdict(float)
    total = 0.0
    for ev in prof.key_averages():
        total += ev.self_cpu_time_total
        by_group[GROUPS.get(ev.key, "everything else (copies, adds, bias chunks, ...)")] += ev.self_cpu_time_total
    lines = [f"# Profile: {args.model}, fast path, float32, batch 1, {args.threads} threads",
             "", f"Command: `python benchmarks/profile_encoder.py --model {args.model} --threads {args.threads}"
             "`", f"Machine: {platform.processor() or platform.machine()}, torch "
             f"{torch.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. "
             f"Forward pass without the profiler: {wall:.2f} s.", "",
             "| operator kind | share of self CPU time |", "|---|---|"]
    for name, us in sorted(by_group.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {100 * us / total:.1f}% |")
    lines += ["", "Top operators:", "", "```",
              prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), "```"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
