"""The benchmark record as markdown and JSON files."""
from __future__ import annotations

import datetime
import json
import os
from typing import Any, Dict, Tuple

from .peers import IMPLS


def one_line(row: Dict[str, Any]) -> str:
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
    isa = m.get("isa_flags") or (f"avx512f {'yes' if m['avx512'] else 'no'}, avx512_bf16 "
                                 f"{'yes' if m['avx512_bf16'] else 'no'}")
    load = m.get("load_average")
    lines += [f"- machine: {m['cpu']}, {m['cores']} cores, instruction sets: {isa}; torch {m['torch']} "
              f"({m['torch_cpu_capability']}), {m['date']}",
              f"- load average (1, 5, 15 min) at the start: {', '.join(f'{v:.2f}' for v in load) if load else '?'}"
              + (f"; at the end: {', '.join(f'{v:.2f}' for v in m['load_average_end'])}"
                 if m.get("load_average_end") else ""),
              f"- {s['threads']} threads; median of {s['repeats']} after {s['warmup']} warm-up"
              f"{(', ' + str(s['rounds']) + ' interleaved rounds (median over all)') if s.get('rounds', 1) > 1 else ''}"
              f"; each run in a fresh "
              f"process; peak = whole-process VmHWM; CPU s/img = process CPU time (the best allocator setting), "
              f"which with 1 thread does not depend on other load on the machine",
              f"- matmul peak: {pk or 'not measured'}",
              f"- FLOPs per image: {record['flops_per_image'] / 1e9:.4g} G ({record['flops_source']}, "
              f"FlopCounterMode on meta, window padding included)",
              f"- error: against {record.get('reference_impl', '?')} float32 on the same random weights and input",
              f"- allocator: default = glibc as is; tuned = {s['tuned_env']}. Nothing else tunes it: samvit "
              f"runs as a library user gets it (load_encoder, no tune_allocator)",
              f"- peers' bf16 is autocast over float32 weights; samvit's is bfloat16 weights (LayerNorm, softmax "
              f"and the residual stream in float32)",
              f"- command: `{record['command']}`", ""]
    allocs = s["allocators"]
    lines += [f"ISA flags beside every row: {isa}", ""]
    head = "| implementation | precision | batch |"
    sep = "|---|---|---|"
    for a in allocs:
        head += f" {a}: s/img | img/s | peak MiB | GFLOP/s | % peak | x official |"
        sep += "---|---|---|---|---|---|"
    head += " CPU s/img | max abs | mean abs | cosine |"
    sep += "---|---|---|---|"
    if len(allocs) == 2:
        head += f" {allocs[0]} / {allocs[1]} |"
        sep += "---|"
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
            r = by_alloc.get(a)
            star = ""
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
        if len(allocs) == 2:
            t = [by_alloc.get(a, {}).get("s_per_image") for a in allocs]
            cells += f" {t[0] / t[1]:.3f} |" if all(t) else " |"
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


