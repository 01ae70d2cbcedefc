"""The side-by-side run: every implementation in its own subprocess (bench.worker) with the same random weights,
input and thread count, so that time, peak memory (VmHWM) and the allocator setting are its own; the record
holds the machine, the matmul peak, FLOPs per image, and one row per run with its error against the official
float32 output."""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..config import EncoderConfig
from ..runtime import TqdmProgress
from .peers import ALLOCATORS, DEFAULT_IMPLS, IMPLS, TUNED_ENV, official_encoder, unsupported
from .report import one_line
from .weights import random_weights
from ..errors import ParameterError



def count_flops(cfg: EncoderConfig) -> Tuple[float, str]:
    """FLOPs of one image through the official encoder (FlopCounterMode on the meta device, window padding
    included); the samvit reference path (the same arithmetic) where segment-anything is not installed."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..config import TinyViTConfig

    if isinstance(cfg, TinyViTConfig):  # the official TinyViT cannot be built on the meta device
        from ..modeling.tinyvit import TinyViT

        with torch.device("meta"):
            model, source = TinyViT(cfg), "samvit TinyViT (the official arithmetic)"
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.empty(1, cfg.in_chans, cfg.img_size, cfg.img_size, device="meta"))
        return float(counter.get_total_flops()), source
    try:
        with torch.device("meta"):
            model, source = official_encoder(cfg), "official segment-anything"
    except (ImportError, ValueError):
        from ..modeling.encoder import ImageEncoder

        with torch.device("meta"):
            model, source = ImageEncoder(cfg, "reference"), "samvit reference path"
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, cfg.in_chans, cfg.img_size, cfg.img_size, device="meta"))
    return float(counter.get_total_flops()), source


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
    isa = {"avx2": "avx2" in flags, "avx512f": "avx512f" in flags, "avx512_vnni": "avx512_vnni" in flags,
           "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags}
    if not flags:  # no lscpu: PyTorch's own detection
        from ..runtime import cpu_features

        isa = cpu_features()
    info = {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "isa": isa,
            "isa_flags": " ".join(k for k, v in isa.items() if v) or "none of avx2/avx512",
            "avx512": isa["avx512f"], "avx512_bf16": isa["avx512_bf16"], "amx_bf16": isa["amx"],
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
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
    return [sys.executable, "-m", "samvit.bench.worker", flag, json.dumps(payload)]


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
    """One entry per (allocator, implementation, precision, batch); samvit runs under each allocator setting
    like every peer (it no longer tunes its own process)."""
    runs = []
    for alloc in allocators:
        for impl in impls:
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
                  progress: Optional[bool] = None, label: str = "", rounds: int = 1) -> Dict[str, Any]:
    """Run every planned implementation in its own subprocess; returns the full record (see write_results).

    rounds > 1 runs the whole plan that many times, interleaved (round 1 of every run, then round 2, ...; the
    matmul peak between rounds), and reports each run's median over all its timed repeats: ratios between
    implementations then hold under load that changes during the benchmark."""
    from safetensors.torch import save_file

    for name in impls:
        if name not in IMPLS:
            raise ParameterError(f"unknown implementation {name!r}; expected some of {', '.join(IMPLS)}")
    for a in allocators:
        if a not in ALLOCATORS:
            raise ParameterError(f"unknown allocator setting {a!r}; expected some of {', '.join(ALLOCATORS)}")
    record: Dict[str, Any] = {"label": label, "machine": machine_info(), "config": cfg.to_dict(),
                              "settings": {"threads": threads, "warmup": warmup, "repeats": repeats,
                                           "timeout_s": timeout, "allocators": list(allocators), "rounds": rounds,
                                           "tuned_env": f"GLIBC_TUNABLES={TUNED_ENV}"},
                              "command": shlex.join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
                              "runs": [], "skipped": []}
    flops, source = count_flops(cfg)
    record["flops_per_image"], record["flops_source"] = flops, source
    with tempfile.TemporaryDirectory(prefix="samvit-bench-") as tmp:
        peak, err = None, "not measured (peak_size=None)"
        peak_cmd = _worker_cmd("--peak", {"threads": threads, "n": peak_size})
        if peak_size:
            peak, _, err = _run_sub(peak_cmd, _env("tuned", threads), timeout)
        record["matmul_peak"] = peak or {"error": err}
        weights, inp, ref = (os.path.join(tmp, f) for f in ("w.safetensors", "x.safetensors", "ref.safetensors"))
        save_file(random_weights(cfg), weights)
        x = torch.randn(1, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(1))
        save_file({"x": x}, inp)
        runs = plan_runs(impls, dtypes, batch_sizes, allocators)
        record["skipped"] += [dict(r, reason=unsupported(r["impl"], cfg)) for r in runs if unsupported(r["impl"], cfg)]
        runs = [r for r in runs if not unsupported(r["impl"], cfg)]
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
        fallbacks = [f for f in fallbacks if not unsupported(f, cfg)]
        bar = TqdmProgress("bench", "run", progress, total=len(runs) * rounds).bar
        merged: Dict[int, Dict[str, Any]] = {}
        peaks = [peak] if peak else []
        for rnd in range(rounds):
            if rnd and peak:
                peaks.append(_run_sub(peak_cmd, _env("tuned", threads), timeout)[0] or {})
            for i, r in enumerate(runs):
                if rnd and (merged[i] is None or "times_s" not in merged[i]):
                    continue  # failed in an earlier round: not retried
                result, prog, err = _one_run(r, first, rnd, ref, inp, weights, cfg, threads, warmup, repeats,
                                             timeout, fallbacks, record)
                bar.update(1)
                if rnd == 0:
                    merged[i] = result if result is not None else {"_prog": prog, "_err": err}
                elif result is not None:
                    for key in ("times_s", "cpu_times_s"):
                        merged[i][key] = merged[i][key] + result[key]
                    merged[i]["peak_rss_mib"] = max(merged[i]["peak_rss_mib"], result["peak_rss_mib"])
                if progress is not False and result is not None:
                    bar.write(one_line(_summarise(result, r, prog, err, flops, {})), file=sys.stderr)
        for i, r in enumerate(runs):
            res = merged.get(i)
            ok = res is not None and "_err" not in res
            row = _summarise(res if ok else None, r, (res or {}).get("_prog", []), (res or {}).get("_err", ""),
                             flops, record["matmul_peak"])
            row["isa"] = record["machine"]["isa_flags"]
            record["runs"].append(row)
        if peak:  # measured again at the end; the best of all is this machine's peak
            peaks.append(_run_sub(peak_cmd, _env("tuned", threads), timeout)[0] or {})
            for again in peaks[1:]:
                for k, v in again.items():
                    if v["gflops"] > peak[k]["gflops"]:
                        peak[k] = v
            record["matmul_peak_all"] = peaks
            for row in record["runs"]:
                if "gflops" in row and row["dtype"] in peak:
                    row["peak_share"] = row["gflops"] / peak[row["dtype"]]["gflops"]
        record["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        bar.close()
    return record


def _one_run(r, first, rnd, ref, inp, weights, cfg, threads, warmup, repeats, timeout, fallbacks, record):
    """One planned run in its subprocess (making the reference output first where needed)."""
    if not os.path.exists(ref) and r is not first:
        for base in fallbacks:
            spec = dict(impl=base, dtype="float32", batch=1, allocator="tuned", threads=threads,
                        config=cfg.to_dict(), weights=weights, input=inp, warmup=1, repeats=0, save_output=ref)
            if _run_sub(_worker_cmd("--run", spec), _env("tuned", threads), timeout)[0] is not None:
                record["reference_impl"] = base
                break
    save = ref if (r is first and rnd == 0) else None
    spec = dict(r, threads=threads, config=cfg.to_dict(), weights=weights, input=inp, reference=ref,
                warmup=warmup, repeats=repeats, save_output=save)
    result, prog, err = _run_sub(_worker_cmd("--run", spec), _env(r["allocator"], threads), timeout)
    if save and result is not None:
        record["reference_impl"] = r["impl"]
    return result, prog, err


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


