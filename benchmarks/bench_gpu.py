"""GPU benchmark of the encoder: samvit (bfloat16, eager and torch.compile) against the official segment-anything
code (float32 and bfloat16 autocast) and segment-anything-fast's configuration (bfloat16 weights, SDPA with the
relative-position bias as a mask, torch.compile max-autotune), ViT-H at batch 1, 8 and 32, same random weights.

    python benchmarks/bench_gpu.py                      # ViT-H, batches 1,8,32, everything
    python benchmarks/bench_gpu.py --model vit_b --batch-sizes 1,8 --impls samvit,official --no-compile

segment-anything-fast itself is used when it is installed (`segment_anything_fast`); otherwise its configuration is
rebuilt on the official encoder (its attention written with SDPA, as in its non-Triton path) and the results say
"emulated". Per run: s/image, images/s, peak CUDA memory (max_memory_allocated), achieved TFLOP/s and share of the
GPU's bf16 matmul peak (measured here), error against the official float32 output. Writes JSON and markdown to
benchmarks/results/gpu_<model>_<time>.{json,md}. Runs on CUDA only; exits with a clear message without it.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
import types
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from samvit import EncoderConfig, ImageEncoder, preset
from samvit.bench.peak import matmul_peak
from samvit.bench.peers import official_encoder
from samvit.bench.runner import count_flops
from samvit.bench.weights import random_weights

IMPLS = ("samvit", "samvit-compiled", "official", "official-bf16", "sam-fast", "sam-fast-eager")


def _sdpa_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """segment-anything-fast's attention (non-Triton path): the decomposed rel-pos bias summed into one mask."""
    from samvit.modeling.attention import rel_pos_terms

    B, H, W, _ = x.shape
    qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, heads, N, hd)
    mask = None
    if self.use_rel_pos:
        rel_h, rel_w = rel_pos_terms(q, self.rel_pos_h, self.rel_pos_w, (H, W))
        mask = (rel_h[..., None] + rel_w[..., None, :]).reshape(B, self.num_heads, H * W, H * W)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return self.proj(out.transpose(1, 2).reshape(B, H, W, -1))


def _sam_fast_encoder(cfg: EncoderConfig) -> Tuple[torch.nn.Module, bool]:
    """(encoder, emulated?): segment-anything-fast's ImageEncoderViT, or the official one with its attention."""
    try:
        from segment_anything_fast.modeling import ImageEncoderViT  # noqa: F401
        from functools import partial

        enc = ImageEncoderViT(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                              depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                              out_chans=cfg.out_chans, qkv_bias=cfg.qkv_bias,
                              norm_layer=partial(torch.nn.LayerNorm, eps=cfg.norm_eps), use_rel_pos=cfg.use_rel_pos,
                              window_size=cfg.window_size, global_attn_indexes=cfg.global_attn_indexes)
        return enc, False
    except ImportError:
        from segment_anything.modeling.image_encoder import Attention

        enc = official_encoder(cfg)
        for m in enc.modules():
            if isinstance(m, Attention):
                m.forward = types.MethodType(_sdpa_attention_forward, m)
        return enc, True


def build(impl: str, cfg: EncoderConfig, sd: Dict[str, torch.Tensor], compile_mode: str
          ) -> Tuple[Callable[[torch.Tensor], torch.Tensor], torch.dtype, bool, str]:
    """(forward, input dtype, autocast?, note) on the GPU for one implementation."""
    dev = torch.device("cuda")
    if impl.startswith("samvit"):
        enc = ImageEncoder(cfg)
        enc.load_state_dict(sd)
        enc = enc.eval().to(dev, torch.bfloat16)
        if impl == "samvit-compiled":
            return torch.compile(enc, mode=compile_mode), torch.bfloat16, False, f"compile mode={compile_mode}"
        return enc, torch.bfloat16, False, ""
    if impl in ("official", "official-bf16"):
        enc = official_encoder(cfg)
        enc.load_state_dict(sd)
        return enc.eval().to(dev), torch.float32, impl == "official-bf16", ""
    if impl.startswith("sam-fast"):
        enc, emulated = _sam_fast_encoder(cfg)
        enc.load_state_dict(sd)
        enc = enc.eval().to(dev, torch.bfloat16)  # as segment-anything-fast: every tensor in bfloat16
        note = "emulated on the official code" if emulated else "segment_anything_fast"
        if impl == "sam-fast":
            return torch.compile(enc, mode=compile_mode), torch.bfloat16, False, f"{note}, compile mode={compile_mode}"
        return enc, torch.bfloat16, False, note
    raise ValueError(f"unknown implementation {impl!r}; expected some of {', '.join(IMPLS)}")


def matmul_peak_tflops(n: int = 8192) -> Dict[str, float]:
    """Best-of-5 n^3 matmul TFLOP/s in bfloat16 and float32 (TF32 off) on this GPU (samvit.bench.peak)."""
    return {k: v["gflops"] / 1e3 for k, v in matmul_peak(n=n, device="cuda", repeats=5).items()}


def time_impl(fwd: Callable, x: torch.Tensor, autocast: bool, warmup: int, repeats: int) -> Tuple[List[float], List[float], torch.Tensor]:
    """(warm-up seconds, timed seconds, last output) with CUDA synchronisation around every call."""
    def once() -> Tuple[float, torch.Tensor]:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fwd(x)
            torch.cuda.synchronize()
            return time.perf_counter() - t0, out

    warm = [once()[0] for _ in range(warmup)]
    times, out = [], None
    for _ in range(repeats):
        dt, out = once()
        times.append(dt)
    return warm, times, out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_h", help="preset (default vit_h)")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, from {', '.join(IMPLS)}")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled implementations")
    p.add_argument("--compile-mode", default="max-autotune",
                   help="torch.compile mode (default max-autotune, as segment-anything-fast; minutes per batch "
                        "size for ViT-H: 'default' compiles much faster)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--official-fp32-max-batch", type=int, default=8,
                   help="largest batch for the official float32 run (its 4096x4096 scores per head need "
                        "~1 GiB per image and head group; default 8)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU and a CUDA build of torch; torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}). For the CPU benchmark run benchmarks/bench_encoder.py.", file=sys.stderr)
        return 2
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        print(f"bench_gpu.py: unknown implementations {unknown}; expected some of {', '.join(IMPLS)}", file=sys.stderr)
        return 2
    if args.no_compile:
        impls = [i for i in impls if i not in ("samvit-compiled", "sam-fast")]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    cfg = preset(args.model)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 here
    torch.backends.cudnn.allow_tf32 = False

    record: Dict[str, Any] = {
        "machine": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
        "config": cfg.to_dict(), "command": " ".join(sys.argv), "runs": []}
    record["flops_per_image"], record["flops_source"] = count_flops(cfg)
    record["matmul_peak_tflops"] = peak = matmul_peak_tflops()
    sd = random_weights(cfg)
    x1 = torch.randn(1, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(1))

    # The yardstick: the official float32 output of the one image.
    fwd, _, _, _ = build("official", cfg, sd, args.compile_mode)
    with torch.inference_mode():
        ref = fwd(x1.cuda()).float()
    del fwd
    for impl in impls:
        for b in batches:
            row: Dict[str, Any] = {"impl": impl, "batch": b}
            if impl == "official" and b > args.official_fp32_max_batch:
                row["error"] = f"skipped: batch above --official-fp32-max-batch {args.official_fp32_max_batch}"
                record["runs"].append(row)
                continue
            torch._dynamo.reset()  # drop the previous run's compiled graphs (and their CUDA graph pools)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                fwd, in_dtype, autocast, note = build(impl, cfg, sd, args.compile_mode)
                x = x1.expand(b, -1, -1, -1).contiguous().cuda().to(in_dtype)
                warm, times, out = time_impl(fwd, x, autocast, args.warmup, args.repeats)
            except torch.cuda.OutOfMemoryError as e:
                row["error"] = f"out of memory: {str(e).splitlines()[0][:200]}"
                record["runs"].append(row)
                print(f"{impl:16s} b{b:<3d} OUT OF MEMORY", flush=True)
                continue
            s_img = statistics.median(times) / b
            diff = (out.float() - ref).abs()
            row.update(note=note, warmup_s=warm, times_s=times, s_per_image=s_img, images_per_s=1 / s_img,
                       peak_mem_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
                       tflops=record["flops_per_image"] / s_img / 1e12, max_abs=diff.max().item(),
                       mean_abs=diff.mean().item(),
                       cosine=F.cosine_similarity(out.double().flatten(), ref.expand_as(out).double().flatten(),
                                                  dim=0).item())
            row["peak_share"] = row["tflops"] / peak["float32" if impl == "official" else "bfloat16"]
            record["runs"].append(row)
            print(f"{impl:16s} b{b:<3d} {s_img * 1e3:8.2f} ms/img  {row['images_per_s']:7.1f} img/s  "
                  f"{row['peak_mem_gib']:6.2f} GiB  max abs {row['max_abs']:.3g}  first call {warm[0]:.1f} s",
                  flush=True)
            del fwd, out, x

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"gpu_{cfg.name}_{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    lines = [f"# GPU encoder benchmark: {cfg.name}, {record['machine']['gpu']}", "",
             f"torch {record['machine']['torch']} (CUDA {record['machine']['cuda']}), {record['machine']['date']}; "
             f"bf16 matmul peak {peak['bfloat16']:.0f} TFLOP/s, fp32 {peak['float32']:.0f} (TF32 off); "
             f"{record['flops_per_image'] / 1e12:.2f} TFLOP/image; median of {args.repeats} after {args.warmup} "
             f"warm-up; command `{record['command']}`", "",
             "| implementation | batch | ms/image | images/s | peak GiB | TFLOP/s | % peak | max abs | mean abs | "
             "cosine | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["runs"]:
        if "s_per_image" not in r:
            lines.append(f"| {r['impl']} | {r['batch']} | {r['error']} | | | | | | | | |")
            continue
        lines.append(f"| {r['impl']} | {r['batch']} | {r['s_per_image'] * 1e3:.2f} | {r['images_per_s']:.1f} | "
                     f"{r['peak_mem_gib']:.2f} | {r['tflops']:.0f} | {100 * r['peak_share']:.0f}% | "
                     f"{r['max_abs']:.2e} | {r['mean_abs']:.2e} | {r['cosine']:.6f} | {r['note']} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
