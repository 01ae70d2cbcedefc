"""Side-by-side encoder benchmark: samvit's paths against segment-anything, timm and transformers.

Every implementation gets the same random weights (official layout, mapped by samvit.convert) and the same
input, and runs in a fresh subprocess with the same thread count, so that time, peak memory (VmHWM) and the
allocator setting are its own. Reported per implementation, precision and batch size: s/image, images/s,
peak RSS, achieved GFLOP/s and its share of this machine's matmul peak (measured in the same run), and the
error against the official float32 output. `samvit bench` and benchmarks/bench_encoder.py both run `main`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .config import PRESETS, EncoderConfig, preset

# name -> (what it is, precisions it runs). Peers run bfloat16 the way their users do: autocast over fp32 weights.
IMPLS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "samvit": ("samvit fast path (SDPA)", ("float32", "bfloat16")),
    "samvit-compiled": ("samvit fast path + torch.compile", ("float32", "bfloat16")),
    "samvit-reference": ("samvit reference path (official arithmetic)", ("float32",)),
    "official": ("official segment-anything", ("float32", "bfloat16")),
    "official-compiled": ("official + torch.compile", ("float32", "bfloat16")),
    "timm": ("timm samvit (VisionTransformerSAM)", ("float32", "bfloat16")),
    "transformers": ("transformers SamVisionModel, sdpa", ("float32", "bfloat16")),
    "transformers-eager": ("transformers SamVisionModel, eager", ("float32", "bfloat16")),
}
DEFAULT_IMPLS = ("samvit", "samvit-reference", "official", "timm", "transformers")
TUNED_ENV = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
ALLOCATORS = ("default", "tuned")
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


# ----------------------------------------------------------------------------------------------- the worker

def _status_kib(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    if field == "VmHWM":  # no /proc: ru_maxrss is the same peak, in KiB on Linux
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return -1


def _official_encoder(cfg: EncoderConfig) -> torch.nn.Module:
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT

    if cfg.out_chans is None:
        raise ValueError("the official encoder always has a neck; this config has none (out_chans=None)")
    return ImageEncoderViT(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                           embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                           out_chans=cfg.out_chans, qkv_bias=cfg.qkv_bias,
                           norm_layer=partial(torch.nn.LayerNorm, eps=cfg.norm_eps), use_abs_pos=cfg.use_abs_pos,
                           use_rel_pos=cfg.use_rel_pos, window_size=cfg.window_size,
                           global_attn_indexes=cfg.global_attn_indexes)


def build(impl: str, cfg: EncoderConfig, sd: Dict[str, torch.Tensor], dtype: torch.dtype
          ) -> Tuple[Callable[[torch.Tensor], torch.Tensor], torch.dtype, bool]:
    """(forward, input dtype, autocast?) for one implementation holding the official-layout weights `sd`."""
    from .checkpoints.keymaps import from_official

    if impl.startswith("samvit"):
        from .modeling.encoder import ImageEncoder

        attn = "reference" if impl == "samvit-reference" else "fast"
        enc = ImageEncoder(cfg, attn_impl=attn, compile=impl == "samvit-compiled")
        enc.load_state_dict(sd)
        enc = enc.eval().to(dtype)
        return enc, dtype, False
    autocast = dtype != torch.float32
    if impl.startswith("official"):
        model = _official_encoder(cfg)
        model.load_state_dict(sd)
        model.eval()
        fwd = torch.compile(model) if impl == "official-compiled" else model
        return fwd, torch.float32, autocast
    if impl == "timm":
        from functools import partial

        from timm.models.vision_transformer_sam import VisionTransformerSAM

        model = VisionTransformerSAM(
            img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
            depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
            norm_layer=partial(torch.nn.LayerNorm, eps=cfg.norm_eps), use_abs_pos=cfg.use_abs_pos,
            use_rel_pos=cfg.use_rel_pos, window_size=cfg.window_size, global_attn_indexes=cfg.global_attn_indexes,
            neck_chans=cfg.out_chans, num_classes=0, global_pool="")
        model.load_state_dict(from_official(sd, "timm"))
        return model.eval().forward_features, torch.float32, autocast
    if impl.startswith("transformers"):
        from transformers import SamVisionConfig, SamVisionModel

        hc = SamVisionConfig(hidden_size=cfg.embed_dim, output_channels=cfg.out_chans, num_hidden_layers=cfg.depth,
                             num_attention_heads=cfg.num_heads, num_channels=cfg.in_chans, image_size=cfg.img_size,
                             patch_size=cfg.patch_size, layer_norm_eps=cfg.norm_eps, qkv_bias=cfg.qkv_bias,
                             mlp_ratio=cfg.mlp_ratio, use_abs_pos=cfg.use_abs_pos, use_rel_pos=cfg.use_rel_pos,
                             window_size=cfg.window_size, global_attn_indexes=list(cfg.global_attn_indexes))
        hc._attn_implementation = "eager" if impl == "transformers-eager" else "sdpa"
        model = SamVisionModel(hc)
        model.load_state_dict(from_official(sd, "transformers"))
        model.eval()
        return (lambda x: model(pixel_values=x).last_hidden_state), torch.float32, autocast
    raise ValueError(f"unknown implementation {impl!r}; expected one of {', '.join(IMPLS)}")


def _emit(kind: str, payload: Dict[str, Any]) -> None:
    print(f"BENCH_{kind} " + json.dumps(payload), flush=True)


def run_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Time one (implementation, precision, batch) in this process; prints progress lines and the result."""
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(spec["threads"])
    if spec["impl"].startswith("samvit"):
        from .runtime import tune_allocator

        tune_allocator()  # samvit's default behaviour
    cfg = EncoderConfig.from_dict(spec["config"])
    dtype = getattr(torch, spec["dtype"])
    sd = load_file(spec["weights"])
    x1 = load_file(spec["input"])["x"]
    res: Dict[str, Any] = {k: spec[k] for k in ("impl", "dtype", "batch", "allocator")}
    fwd, in_dtype, autocast = build(spec["impl"], cfg, sd, dtype)
    del sd
    x = x1.expand(spec["batch"], -1, -1, -1).contiguous().to(in_dtype)
    res["rss_loaded_mib"] = _status_kib("VmRSS") / 1024

    def once() -> Tuple[float, float, torch.Tensor]:
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=autocast):
            t0, c0 = time.perf_counter(), time.process_time()
            out = fwd(x)
            return time.perf_counter() - t0, time.process_time() - c0, out

    times, cpu_times, out = [], [], None
    for i in range(spec["warmup"] + spec["repeats"]):
        dt, cpu, out = once()
        if i < spec["warmup"]:
            res.setdefault("warmup_s", []).append(dt)
        else:
            times.append(dt)
            cpu_times.append(cpu)
        _emit("PROGRESS", {"run": i, "warmup": i < spec["warmup"], "seconds": dt, "cpu_seconds": cpu})
    res["times_s"], res["cpu_times_s"] = times, cpu_times
    out = out.float()
    if spec.get("save_output"):
        save_file({"out": out[:1].contiguous()}, spec["save_output"])
    if spec.get("reference") and os.path.exists(spec["reference"]):
        ref = load_file(spec["reference"])["out"].expand_as(out)
        diff = (out - ref).abs()
        res["max_abs"] = diff.max().item()
        res["mean_abs"] = diff.mean().item()
        res["cosine"] = torch.nn.functional.cosine_similarity(out.double().flatten(), ref.double().flatten(),
                                                              dim=0).item()
    res["peak_rss_mib"] = _status_kib("VmHWM") / 1024
    res["out_shape"] = list(out.shape)
    _emit("RESULT", res)
    return res


def matmul_peak(threads: int, n: int = 4096, max_seconds: float = 5.0) -> Dict[str, Any]:
    """Best-of-3 n^3 matmul GFLOP/s in float32 and bfloat16 with `threads` threads (a smaller n where one call
    would take longer than max_seconds, as bfloat16 does on CPUs without native bfloat16 support)."""
    torch.set_num_threads(threads)
    out: Dict[str, Any] = {}
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        size = 256
        while True:  # grow n while a call stays short enough, up to the asked n
            a, b = torch.randn(size, size, dtype=dt), torch.randn(size, size, dtype=dt)
            a @ b
            first = _timed(lambda: a @ b)
            if size >= n or first * 8 > max_seconds:
                break
            size *= 2
        best = min([first] + [_timed(lambda: a @ b) for _ in range(2)])
        out[name] = {"gflops": 2 * size ** 3 / best / 1e9, "n": size}
    return out


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------- the parent

def count_flops(cfg: EncoderConfig) -> Tuple[float, str]:
    """FLOPs of one image through the official encoder (FlopCounterMode on the meta device, window padding
    included); the samvit reference path (the same arithmetic) where segment-anything is not installed."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            model, source = _official_encoder(cfg), "official segment-anything"
    except (ImportError, ValueError):
        from .modeling.encoder import ImageEncoder

        with torch.device("meta"):
            model, source = ImageEncoder(cfg, attn_impl="reference"), "samvit reference path"
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, cfg.in_chans, cfg.img_size, cfg.img_size, device="meta"))
    return float(counter.get_total_flops()), source


def random_weights(cfg: EncoderConfig, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random encoder weights in the official layout: every parameter random (norm scales near 1)."""
    from .modeling.encoder import ImageEncoder

    g = torch.Generator().manual_seed(seed)
    enc = ImageEncoder(cfg, attn_impl="reference")
    sd = {}
    for name, p in enc.state_dict().items():
        r = torch.randn(p.shape, generator=g)
        is_norm = name.endswith(".weight") and p.ndim == 1 and ("norm" in name or name.startswith("neck."))
        sd[name] = 1.0 + 0.1 * r if is_norm else 0.1 * r if "pos" in name else 0.02 * r if p.ndim > 1 else 0.05 * r
    return sd


def machine_info() -> Dict[str, Any]:
    """CPU model, cores, instruction sets that matter here, library versions, date."""
    model, flags = platform.processor() or "unknown", set()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "Model name":
                model = val.strip()
            elif key.strip() == "Flags":
                flags = set(val.split())
    except (OSError, subprocess.SubprocessError):
        pass
    info = {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "avx512": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    for pkg in ("segment_anything", "timm", "transformers"):
        try:
            mod = __import__(pkg)
            info[pkg] = getattr(mod, "__version__", "installed")
        except ImportError:
            info[pkg] = None
    return info


def _worker_cmd(flag: str, payload: Dict[str, Any]) -> List[str]:
    return [sys.executable, "-m", "samvit.bench", flag, json.dumps(payload)]


def _env(allocator: str, threads: int) -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("GLIBC_TUNABLES", None)
    if allocator == "tuned":
        env["GLIBC_TUNABLES"] = TUNED_ENV
    return env


def _run_sub(cmd: List[str], env: Dict[str, str], timeout: float) -> Tuple[Optional[Dict[str, Any]], List[Dict], str]:
    """Run a worker; (its result or None, its progress lines, an error message or '')."""
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        stdout, err = proc.stdout, "" if proc.returncode == 0 else f"exit code {proc.returncode}"
        stderr = proc.stderr
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        err = f"timed out after {timeout:.0f} s"
    result, progress = None, []
    for line in stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result = json.loads(line[len("BENCH_RESULT "):])
        elif line.startswith("BENCH_PROGRESS "):
            progress.append(json.loads(line[len("BENCH_PROGRESS "):]))
    if err and stderr.strip():
        err += ": " + stderr.strip().splitlines()[-1][-300:]
    return result, progress, err


def plan_runs(impls: Sequence[str], dtypes: Sequence[str], batch_sizes: Sequence[int],
              allocators: Sequence[str]) -> List[Dict[str, Any]]:
    """One entry per (allocator, implementation, precision, batch). samvit tunes its own allocator, so its
    rows run once (under the first setting) and stand for both."""
    runs = []
    for a_i, alloc in enumerate(allocators):
        for impl in impls:
            if impl.startswith("samvit") and a_i > 0:
                continue
            for dt in dtypes:
                if dt not in IMPLS[impl][1]:
                    continue
                for b in batch_sizes:
                    runs.append({"impl": impl, "dtype": dt, "batch": b, "allocator": alloc})
    return runs


def run_benchmark(cfg: EncoderConfig, impls: Sequence[str] = DEFAULT_IMPLS,
                  dtypes: Sequence[str] = ("float32", "bfloat16"), batch_sizes: Sequence[int] = (1,),
                  allocators: Sequence[str] = ALLOCATORS, threads: int = 2, warmup: int = 1, repeats: int = 3,
                  timeout: float = 1800.0, force_bf16: bool = False, peak_size: Optional[int] = 4096,
                  progress: Optional[bool] = None, label: str = "") -> Dict[str, Any]:
    """Run every planned implementation in its own subprocess; returns the full record (see write_results)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    for name in impls:
        if name not in IMPLS:
            raise ValueError(f"unknown implementation {name!r}; expected some of {', '.join(IMPLS)}")
    for a in allocators:
        if a not in ALLOCATORS:
            raise ValueError(f"unknown allocator setting {a!r}; expected some of {', '.join(ALLOCATORS)}")
    record: Dict[str, Any] = {"label": label, "machine": machine_info(), "config": cfg.to_dict(),
                              "settings": {"threads": threads, "warmup": warmup, "repeats": repeats,
                                           "timeout_s": timeout, "allocators": list(allocators),
                                           "tuned_env": f"GLIBC_TUNABLES={TUNED_ENV}"},
                              "command": shlex.join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
                              "runs": [], "skipped": []}
    flops, source = count_flops(cfg)
    record["flops_per_image"], record["flops_source"] = flops, source
    disable = (not sys.stderr.isatty()) if progress is None else not progress
    with tempfile.TemporaryDirectory(prefix="samvit-bench-") as tmp:
        peak, err = None, "not measured (peak_size=None)"
        peak_cmd = _worker_cmd("--worker-peak", {"threads": threads, "n": peak_size})
        if peak_size:
            peak, _, err = _run_sub(peak_cmd, _env("tuned", threads), timeout)
        record["matmul_peak"] = peak or {"error": err}
        weights, inp, ref = (os.path.join(tmp, f) for f in ("w.safetensors", "x.safetensors", "ref.safetensors"))
        save_file(random_weights(cfg), weights)
        x = torch.randn(1, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(1))
        save_file({"x": x}, inp)
        runs = plan_runs(impls, dtypes, batch_sizes, allocators)
        bf16_ok = force_bf16 or not peak or peak["bfloat16"]["gflops"] >= 0.3 * peak["float32"]["gflops"]
        if not bf16_ok:
            why = (f"no fast bfloat16 matmul on this CPU (peak {peak['bfloat16']['gflops']:.1f} vs float32 "
                   f"{peak['float32']['gflops']:.1f} GFLOP/s); --force-bf16 runs them anyway")
            record["skipped"] += [dict(r, reason=why) for r in runs if r["dtype"] == "bfloat16"]
            runs = [r for r in runs if r["dtype"] != "bfloat16"]
        # The official float32 output is the yardstick: its run goes first and keeps its output. Without that
        # run (filtered out, not installed, or a config it cannot build), an untimed run makes the output:
        # official float32 where it can, else the samvit reference path (the same arithmetic, bit for bit).
        first = next((r for r in runs if r["impl"] == "official" and r["dtype"] == "float32"), None)
        if first is not None:
            runs.remove(first)
            runs.insert(0, first)
        fallbacks = ["official", "samvit-reference"] if _importable("segment_anything") else ["samvit-reference"]
        bar = tqdm(total=len(runs), desc="bench", unit="run", disable=disable)
        for r in runs:
            if not os.path.exists(ref) and r is not first:
                for base in fallbacks:
                    spec = dict(impl=base, dtype="float32", batch=1, allocator="tuned", threads=threads,
                                config=cfg.to_dict(), weights=weights, input=inp, warmup=1, repeats=0, save_output=ref)
                    if _run_sub(_worker_cmd("--worker", spec), _env("tuned", threads), timeout)[0] is not None:
                        record["reference_impl"] = base
                        break
            spec = dict(r, threads=threads, config=cfg.to_dict(), weights=weights, input=inp, reference=ref,
                        warmup=warmup, repeats=repeats, save_output=ref if r is first else None)
            bar.set_postfix_str(f"{r['impl']} {r['dtype']} b{r['batch']} {r['allocator']}")
            result, prog, err = _run_sub(_worker_cmd("--worker", spec), _env(r["allocator"], threads), timeout)
            bar.update(1)
            if r is first and result is not None:
                record["reference_impl"] = r["impl"]
            row = _summarise(result, r, prog, err, flops, record["matmul_peak"])
            record["runs"].append(row)
            if progress is not False:
                tqdm.write(_one_line(row), file=sys.stderr)
        if peak:  # measured again at the end; the better of the two is this machine's peak
            again = _run_sub(peak_cmd, _env("tuned", threads), timeout)[0] or {}
            for k, v in again.items():
                if v["gflops"] > peak[k]["gflops"]:
                    peak[k] = v
            for row in record["runs"]:
                if "gflops" in row and row["dtype"] in peak:
                    row["peak_share"] = row["gflops"] / peak[row["dtype"]]["gflops"]
        bar.close()
    return record


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _summarise(result: Optional[Dict], plan: Dict, progress: List[Dict], err: str, flops: float,
               peak: Dict[str, Any]) -> Dict[str, Any]:
    row: Dict[str, Any] = dict(plan)
    if result is None:
        done = [p["seconds"] for p in progress if not p["warmup"]]
        row["error"] = err or "no result"
        if not done:
            return row
        row["partial"] = True
        result = {"times_s": done, "cpu_times_s": [p["cpu_seconds"] for p in progress if not p["warmup"]]}
    row.update({k: v for k, v in result.items() if k not in row})
    times = result["times_s"]
    if not times:
        return row
    s_img = statistics.median(times) / plan["batch"]
    row["s_per_image"], row["images_per_s"] = s_img, 1.0 / s_img
    if result.get("cpu_times_s"):  # process CPU time: with --threads 1, robust to other load on the machine
        row["cpu_s_per_image"] = statistics.median(result["cpu_times_s"]) / plan["batch"]
    row["gflops"] = flops / s_img / 1e9
    pk = peak.get(plan["dtype"], {}).get("gflops") if isinstance(peak, dict) else None
    if pk:
        row["peak_share"] = row["gflops"] / pk
    return row


def _one_line(row: Dict[str, Any]) -> str:
    head = f"{row['impl']:<18} {row['dtype']:<8} b{row['batch']:<3} {row['allocator']:<7}"
    if "s_per_image" not in row:
        return f"{head} FAILED: {row.get('error')}"
    err = f" max abs {row['max_abs']:.2e}" if "max_abs" in row else ""
    return f"{head} {row['s_per_image']:.3f} s/img  peak {row.get('peak_rss_mib', float('nan')):.0f} MiB{err}"


def _precision(impl: str, dtype: str) -> str:
    if dtype == "float32":
        return "fp32"
    return "bf16 weights" if impl.startswith("samvit") else "bf16 autocast"


def markdown(record: Dict[str, Any]) -> str:
    """The results as a markdown table: one row per implementation, precision and batch; both allocators."""
    m, s = record["machine"], record["settings"]
    peak = record.get("matmul_peak", {})
    lines = [f"# Encoder benchmark: {record['config'].get('name', 'custom')} at {record['config']['img_size']}px",
             ""]
    if record.get("label"):
        lines += [f"**{record['label']}**", ""]
    pk = "; ".join(f"{k} {v['gflops']:.1f} GFLOP/s (n={v['n']})" for k, v in peak.items() if isinstance(v, dict))
    lines += [f"- machine: {m['cpu']}, {m['cores']} cores (AVX-512 {'yes' if m['avx512'] else 'no'}, "
              f"AVX-512 BF16 {'yes' if m['avx512_bf16'] else 'no'}), torch {m['torch']} "
              f"({m['torch_cpu_capability']}), {m['date']}",
              f"- {s['threads']} threads; median of {s['repeats']} after {s['warmup']} warm-up; each run in a fresh "
              f"process; peak = whole-process VmHWM; CPU s/img = process CPU time (the best allocator setting), "
              f"which with 1 thread does not depend on other load on the machine",
              f"- matmul peak: {pk or 'not measured'}",
              f"- FLOPs per image: {record['flops_per_image'] / 1e9:.4g} G ({record['flops_source']}, "
              f"FlopCounterMode on meta, window padding included)",
              f"- error: against {record.get('reference_impl', '?')} float32 on the same random weights and input",
              f"- allocator: default = glibc as is; tuned = {s['tuned_env']}. samvit tunes its own process "
              f"(mallopt, samvit.tune_allocator) whatever the setting, so its rows ran once and stand for both (*)",
              f"- peers' bf16 is autocast over float32 weights; samvit's is bfloat16 weights (LayerNorm, softmax "
              f"and the residual stream in float32)",
              f"- command: `{record['command']}`", ""]
    allocs = s["allocators"]
    head = "| implementation | precision | batch |"
    sep = "|---|---|---|"
    for a in allocs:
        head += f" {a}: s/img | img/s | peak MiB | GFLOP/s | % peak | x official |"
        sep += "---|---|---|---|---|---|"
    head += " CPU s/img | max abs | mean abs | cosine |"
    sep += "---|---|---|---|"
    lines += [head, sep]
    rows: Dict[Tuple, Dict[str, Dict]] = {}
    order = list(IMPLS)
    for r in sorted(record["runs"], key=lambda r: (order.index(r["impl"]), r["dtype"] != "float32", r["batch"])):
        rows.setdefault((r["impl"], r["dtype"], r["batch"]), {})[r["allocator"]] = r
    base = {(r["allocator"], r["batch"]): r.get("s_per_image") for r in record["runs"]
            if r["impl"] == "official" and r["dtype"] == "float32"}
    for (impl, dt, b), by_alloc in rows.items():
        cells = f"| {IMPLS[impl][0]} | {_precision(impl, dt)} | {b} |"
        any_row = next(iter(by_alloc.values()))
        for a in allocs:
            r = by_alloc.get(a) or (any_row if impl.startswith("samvit") else None)
            star = "*" if impl.startswith("samvit") else ""
            if r is None or "s_per_image" not in r:
                msg = (r or {}).get("error", "not run")
                cells += f" {msg[:40]} | | | | | |"
                continue
            ref_s = base.get((a, b))
            cells += (f" {r['s_per_image']:.3f}{star}{' (partial)' if r.get('partial') else ''} | "
                      f"{r['images_per_s']:.3f} | {r.get('peak_rss_mib', float('nan')):.0f} | {r['gflops']:.1f} | "
                      f"{100 * r.get('peak_share', float('nan')):.0f}% | "
                      f"{(ref_s / r['s_per_image']) if ref_s else float('nan'):.2f} |")
        cpu = min((r["cpu_s_per_image"] for r in by_alloc.values() if "cpu_s_per_image" in r), default=None)
        cells += f" {cpu:.3f} |" if cpu is not None else " |"
        e = next((r for r in by_alloc.values() if "max_abs" in r), {})
        cells += (f" {e['max_abs']:.2e} | {e['mean_abs']:.2e} | {e['cosine']:.6f} |" if e else " | | |")
        lines.append(cells)
    for sk in record.get("skipped", []):
        lines.append(f"\nskipped {sk['impl']} {sk['dtype']} b{sk['batch']} ({sk['allocator']}): {sk['reason']}")
    return "\n".join(lines) + "\n"


def write_results(record: Dict[str, Any], out_dir: str) -> Tuple[str, str]:
    """Write <out_dir>/encoder_<model>_<time>.json and .md; returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = os.path.join(out_dir, f"encoder_{record['config'].get('name', 'custom')}_{stamp}")
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(record))
    return stem + ".json", stem + ".md"


# ----------------------------------------------------------------------------------------------- command line

def _csv(kind: Callable[[str], Any]) -> Callable[[str], List[Any]]:
    return lambda s: [kind(v.strip()) for v in s.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vit_b", help=f"preset: {', '.join(PRESETS)} (default vit_b)")
    p.add_argument("--img-size", type=int, default=None, help="input side in pixels (default: the preset's, 1024)")
    p.add_argument("--impls", type=_csv(str), default=list(DEFAULT_IMPLS),
                   help=f"comma-separated, from: {', '.join(IMPLS)} (default: {','.join(DEFAULT_IMPLS)})")
    p.add_argument("--compile", action="store_true", help="add samvit-compiled and official-compiled")
    p.add_argument("--dtypes", type=_csv(str), default=["float32", "bfloat16"], help="float32,bfloat16 (default both)")
    p.add_argument("--batch-sizes", type=_csv(int), default=[1], help="e.g. 1,4 (default 1)")
    p.add_argument("--allocators", type=_csv(str), default=list(ALLOCATORS), help="default,tuned (default both)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every run (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs, the median is reported (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--quick", action="store_true", help="1 timed run after 1 warm-up; matmul peak at n=2048")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run (default 1800)")
    p.add_argument("--force-bf16", action="store_true",
                   help="run bfloat16 even where this CPU has no fast bfloat16 matmul (very slow there)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="folder for the JSON and markdown")
    p.add_argument("--label", default="", help="a note written at the top of the results (e.g. 'preliminary')")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed arguments; prints the markdown table and where the files went."""
    cfg = preset(args.model)
    if args.img_size:
        cfg = preset(args.model, img_size=args.img_size)
    impls = list(args.impls) + (["samvit-compiled", "official-compiled"] if args.compile else [])
    impls = list(dict.fromkeys(impls))
    dtypes = []
    for d in args.dtypes:
        if d not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {d!r} for the benchmark; expected float32 or bfloat16")
        dtypes.append(DTYPE_NAMES[d])
    if args.threads < 1 or args.repeats < 1 or any(b < 1 for b in args.batch_sizes):
        raise ValueError("--threads, --repeats and every batch size must be at least 1")
    repeats, warmup = (1, 1) if args.quick else (args.repeats, args.warmup)
    record = run_benchmark(cfg, impls, dtypes, args.batch_sizes, args.allocators, args.threads, warmup, repeats,
                           args.timeout, args.force_bf16, peak_size=2048 if args.quick else 4096,
                           progress=False if args.quiet else None, label=args.label)
    js, md = write_results(record, args.out)
    print(markdown(record))
    print(f"wrote {js} and {md}")
    failed = [r for r in record["runs"] if "error" in r]
    return 1 if failed and len(failed) == len(record["runs"]) else 0


def main(argv: Optional[List[str]] = None) -> int:
    """benchmarks/bench_encoder.py and `python -m samvit.bench`; also the entry of the worker subprocesses."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        run_worker(json.loads(argv[1]))
        return 0
    if argv[:1] == ["--worker-peak"]:
        spec = json.loads(argv[1])
        _emit("RESULT", matmul_peak(spec["threads"], spec["n"]))
        return 0
    parser = argparse.ArgumentParser(prog="bench_encoder", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
