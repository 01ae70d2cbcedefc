"""One benchmark run in this (fresh) process: `python -m samvit.bench.worker --run SPEC` times one implementation,
precision and batch; `--peak SPEC` measures the matmul peak. Results go to stdout as BENCH_* lines."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..config import encoder_config_from_dict
from .peak import matmul_peak
from .peers import build


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


def _emit(kind: str, payload: Dict[str, Any]) -> None:
    print(f"BENCH_{kind} " + json.dumps(payload), flush=True)


def run_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Time one (implementation, precision, batch) in this process; prints progress lines and the result."""
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(spec["threads"])  # nothing tunes the allocator here: GLIBC_TUNABLES alone decides
    cfg = encoder_config_from_dict(spec["config"])  # an EncoderConfig or a TinyViTConfig
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


def main(argv: Optional[List[str]] = None) -> int:
    """The worker subprocess's entry: --run SPEC_JSON or --peak SPEC_JSON."""
    kind, spec = (sys.argv[1:] if argv is None else argv)[:2]
    spec = json.loads(spec)
    if kind == "--run":
        run_worker(spec)
    elif kind == "--peak":
        _emit("RESULT", matmul_peak(spec["threads"], spec["n"]))
    else:
        raise SystemExit(f"unknown worker mode {kind!r}; expected --run or --peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
