"""README's speed table from two `samvit bench` records (float32 and bfloat16 runs of ViT-B), with the machine, its
instruction sets, the in-run matmul peaks, the date and the files it came from.

    python benchmarks/speed_table.py benchmarks/results/encoder_vit_b_A.json benchmarks/results/encoder_vit_b_B.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any, Dict, List, Optional

NAMES = {"samvit": "**samvit**", "samvit-sdpa": "samvit, sdpa_chunked kernel", "official": "official segment-anything",
         "timm": "timm VisionTransformerSAM", "transformers": "transformers SamVisionModel, sdpa",
         "onnxruntime": "ONNX Runtime on samvit's ONNX export",
         "openvino": "OpenVINO on samvit's ONNX export (`samvit embed --backend openvino`)"}


def rows_of(rec: Dict[str, Any], dtype: str, allocator: str = "default") -> Dict[str, Dict[str, Any]]:
    """impl -> its batch-1 row of `dtype` under `allocator` with a time (failed runs left out)."""
    return {r["impl"]: r for r in rec["runs"] if r["dtype"] == dtype and r["batch"] == 1
            and r["allocator"] == allocator and "s_per_image" in r}


def table(fp32: Dict[str, Any], bf16: Optional[Dict[str, Any]], fp32_path: str, bf16_path: Optional[str]) -> str:
    """The markdown paragraph and table."""
    m = fp32["machine"]
    r32 = rows_of(fp32, "float32")
    r16 = rows_of(bf16, "bfloat16") if bf16 else {}
    pk = fp32["matmul_peak"]
    pk16 = (bf16 or fp32)["matmul_peak"].get("bfloat16", {})
    lines = [f"ViT-B at 1024, batch 1, {fp32['settings']['threads']} threads, same random weights and input, each "
             f"implementation in a fresh process under glibc's default allocator (samvit through `load_encoder`); "
             f"recorded on {m['date']} on {m['cpu']} ({m['isa_flags']}; torch {m['torch']}, "
             f"{m['torch_cpu_capability']}), matmul peak measured in the same runs: float32 "
             f"{pk['float32']['gflops']:.0f} GFLOP/s, bfloat16 {pk16.get('gflops', float('nan')):.0f}; with `bash "
             f"benchmarks/speed_round3.sh` (`{os.path.basename(fp32_path)}`"
             + (f", `{os.path.basename(bf16_path)}`" if bf16_path else "") + "):", "",
             "| implementation | fp32 s/image | share of fp32 matmul peak | peak RSS MiB | max abs vs official | "
             "bf16 s/image | share of bf16 peak | cosine to official fp32 |", "|---|---|---|---|---|---|---|---|"]
    for impl in [i for i in NAMES if i in r32 or i in r16]:
        a, b = r32.get(impl), r16.get(impl)
        fp = (f"{a['s_per_image']:.2f} | {100 * a['peak_share']:.0f}% | {a['peak_rss_mib']:.0f} | "
              f"{a.get('max_abs', float('nan')):.1e}") if a else "- | - | - | -"
        auto = " (autocast)" if impl in ("official", "timm", "transformers") else ""
        bf = (f"{b['s_per_image']:.2f}{auto} | {100 * b['peak_share']:.0f}% | {b.get('cosine', float('nan')):.6f}"
              if b else "- | - | -")
        lines.append(f"| {NAMES[impl]} | {fp} | {bf} |")
    if "samvit" in r32 and "official" in r32:
        lines += ["", f"samvit / official: {r32['official']['s_per_image'] / r32['samvit']['s_per_image']:.2f}x in "
                  "float32" + (f", {r16['official']['s_per_image'] / r16['samvit']['s_per_image']:.2f}x in bfloat16"
                               if "samvit" in r16 and "official" in r16 else "") + "."]
    tuned = rows_of(fp32, "float32", "tuned")
    if "samvit" in tuned and "samvit" in r32:
        ratio = tuned["samvit"]["s_per_image"] / r32["samvit"]["s_per_image"]
        lines.append(f"samvit tuned / default allocator time: {ratio:.3f} (1 = no allocator tuning needed).")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fp32", help="the float32 record (.json)")
    p.add_argument("bf16", nargs="?", help="the bfloat16 record (.json)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    fp32 = json.load(open(a.fp32))
    bf16 = json.load(open(a.bf16)) if a.bf16 else None
    text = table(fp32, bf16, a.fp32, a.bf16)
    print(text)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
