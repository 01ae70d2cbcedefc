"""The copies that feed a windowed ViT-B attention block (64x64 tokens, 14x14 windows, 12 heads): the former two
(to_windows into a (B, nWh, nWw, ws, ws, 3C) buffer, then attention_inputs' head-major copy) against the one copy of
to_window_heads, float32 and bfloat16, interleaved; the median of --rounds. Also the inference workspace of a ViT-B
forward (the windows buffer is gone).

    python benchmarks/bench_window_copies.py --threads 2 --rounds 15 --out benchmarks/results/window_copies.md
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import samvit
from samvit.bench.runner import machine_info
from samvit.modeling.attention import attention_inputs, to_window_heads, to_windows

B, H, W, C, NH, WS = 1, 64, 64, 768, 12, 14


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default=None, help="write the markdown here too")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    info = machine_info()
    lines = [f"# Copies feeding a windowed ViT-B block ({H}x{W} tokens, {WS}x{WS} windows, {NH} heads)", "",
             f"- machine: {info['cpu']}, {info['cores']} cores, instruction sets: {info['isa_flags']}; torch "
             f"{info['torch']}; {info['date']}; load average {info['load_average']}",
             f"- command: `python benchmarks/bench_window_copies.py --threads {a.threads} --rounds {a.rounds}`", "",
             "| dtype | two copies (ms) | one copy (ms) | one / two | equal |", "|---|---:|---:|---:|---|"]
    nw = -(-H // WS) * -(-W // WS)
    with torch.inference_mode():
        for dt in (torch.float32, torch.bfloat16):
            qkv = torch.randn(B, H, W, 3 * C).to(dt)
            fill = torch.randn(3 * C).to(dt)
            win = torch.empty(B, nw, WS, WS, 3 * C, dtype=dt)
            heads2 = torch.empty(3, B * nw, NH, WS * WS, C // NH, dtype=dt)
            heads1 = torch.empty_like(heads2)

            def two():
                windows = to_windows(qkv, WS, fill, win.view(B, -(-H // WS), -(-W // WS), WS, WS, 3 * C))
                attention_inputs(windows.view(-1, WS * WS, 3 * C), (WS, WS), NH, 1.0, buffer=heads2)

            def one():
                to_window_heads(qkv, WS, NH, fill, heads1)

            times = {"two": [], "one": []}
            two(), one()
            for _ in range(a.rounds):
                for name, fn in (("two", two), ("one", one)):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            t2, t1 = (statistics.median(times[k]) * 1e3 for k in ("two", "one"))
            lines.append(f"| {str(dt).replace('torch.', '')} | {t2:.2f} | {t1:.2f} | {t1 / t2:.2f} | "
                         f"{torch.equal(heads1, heads2)} |")
        enc = samvit.ImageEncoder(samvit.preset("vit_b")).eval()
        enc(torch.randn(1, 3, 1024, 1024))
        lines += ["", f"Inference workspace after a ViT-B float32 forward at 1024: "
                      f"{enc.release_workspace() / 2 ** 20:.1f} MiB."]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
