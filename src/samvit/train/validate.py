"""Validation during training: the task's held-out metrics every --val-every steps and at the end, and the best
model so far kept as RUN_DIR/best.* (the task's export) with RUN_DIR/best.json.

The loop calls validate() on every process; the main one measures (the model in eval mode, under no_grad, then
back as it was) while the others wait. With FSDP2 the full weights are gathered first and a copy is measured.
The RNG states are restored afterwards, so a run with validation trains exactly as one without.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import Dataset

from ..checkpoints.files import atomic_write
from ..errors import InputError
from .ckpt import rng_state, set_rng_state
from .data import to_device
from .launch import Processes, autocast, barrier, unwrap

BEST_FILE = "best.json"
log = logging.getLogger("samvit.train")


@dataclass
class Validation:
    """A task's validation. run(model) -> {metric: value} (main process; eval mode, no_grad); `best`: the metric
    that picks the best model, `higher_is_better`; save_best(model) writes RUN_DIR/best.* and returns the paths;
    `data`: what is measured (e.g. the folder and the limit): a resumed run keeps its best only on the same."""

    run: Callable[[nn.Module], Dict[str, float]]
    best: str
    higher_is_better: bool
    save_best: Callable[[nn.Module], List[str]]
    data: Dict = field(default_factory=dict)


def check_val_data(val_data: str, data: Tuple[Optional[str], ...], out: str) -> str:
    """--val-data: an existing folder, neither one of the training inputs `data` (nor inside one, nor holding one)
    nor inside --out. Returns its absolute path."""
    if not os.path.isdir(val_data):
        raise InputError(f"--val-data {val_data}: no such directory (expected a folder of held-out data)")
    real = os.path.realpath(val_data)
    for d in data:
        if not d or d == "synthetic" or not os.path.exists(d):
            continue
        other = os.path.realpath(d)
        if real == other or os.path.commonpath([real, other]) in (real, other):
            how = "is" if real == other else "overlaps"
            raise InputError(f"--val-data {val_data}: {how} the training data {d}; validate on held-out images in "
                             "a folder of their own")
    out_real = os.path.realpath(out)
    if os.path.commonpath([real, out_real]) == out_real:
        raise InputError(f"--val-data {val_data}: is inside the run folder --out {out}")
    return os.path.abspath(val_data)


def held_out_means(model: nn.Module, dataset: Dataset, batch_size: int, limit: Optional[int], precision: str,
                   metrics: Callable[[nn.Module, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]
                   ) -> Dict[str, float]:
    """The mean over the first `limit` items of dataset (keys (0, i)) of metrics(model, batch) -> {name: batch
    mean}, batches of batch_size weighted by their size (the per-item mean when each batch value is one)."""
    device = next(model.parameters()).device
    n = min(len(dataset), limit) if limit else len(dataset)
    if n == 0:
        raise InputError("--val-data: no held-out item to validate on")
    sums: Dict[str, float] = {}
    for start in range(0, n, batch_size):
        items = [dataset[(0, i)] for i in range(start, min(n, start + batch_size))]
        batch = to_device({k: torch.stack([s[k] for s in items]) for k in items[0]}, device)
        with autocast(device, precision):
            out = metrics(model, batch)
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(items)
    return {k: v / n for k, v in sums.items()}


def load_best(run_dir: str, validation: Validation) -> Optional[Dict]:
    """The best so far of a resumed run (RUN_DIR/best.json), if it was measured the same way and its files are
    there; else None (with a warning when there was one)."""
    path = os.path.join(run_dir, BEST_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        best = json.load(fh)
    same = best.get("metric") == f"val_{validation.best}" and best.get("data") == validation.data
    if not same or not all(os.path.exists(os.path.join(run_dir, f)) for f in best.get("files", [])):
        why = "measured on other validation data or by another metric" if not same else "its files are missing"
        log.warning("%s: %s; the next validation replaces it", path, why)
        return None
    return best


def validate(validation: Validation, model: nn.Module, procs: Processes, step: int, best: Optional[Dict],
             run_dir: str, rebuild: Optional[Callable[[], nn.Module]] = None) -> Tuple[Dict[str, float],
                                                                                     Optional[Dict]]:
    """Measure the model (every process calls it; rebuild: FSDP2's model factory, for a full copy); on the main
    process write best.* and best.json when the best metric improves. Returns ({'val_<metric>': value, ...} on the
    main process, {} elsewhere; the best so far)."""
    rng = rng_state()
    full = None
    if rebuild is not None:  # FSDP2: every process takes part in gathering the full weights
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    values: Dict[str, float] = {}
    try:
        if procs.main:
            start = time.perf_counter()
            net = unwrap(model)
            if full is not None:
                net = rebuild()
                net.load_state_dict(full)
                net.to(procs.device)
            modes = {m: m.training for m in net.modules()}
            net.eval()
            try:
                with torch.no_grad():
                    measured = validation.run(net)
            finally:
                for m, mode in modes.items():
                    m.training = mode
            values = {f"val_{k}": v for k, v in measured.items() if v is not None}
            key = f"val_{validation.best}"
            value = values.get(key)
            if value is None:
                raise InputError(f"--val-data: step {step}: the validation measured no {key} (nothing to measure?)")
            better = math.isfinite(value) and (best is None or (value > best["value"] if validation.higher_is_better
                                                                else value < best["value"]))
            if better:  # a NaN is never the best (diverged weights: the run stops at its next check)
                files = validation.save_best(net)
                best = {"step": step, "metric": key, "value": value, "higher_is_better": validation.higher_is_better,
                        "metrics": values, "files": [os.path.basename(f) for f in files], "data": validation.data}
                with atomic_write(os.path.join(run_dir, BEST_FILE)) as tmp, open(tmp, "w", encoding="utf-8") as fh:
                    json.dump(best, fh, indent=2)
            values["val_seconds"] = time.perf_counter() - start
    finally:
        set_rng_state(rng)  # the run trains as one without validation (building a copy draws, so may the task)
    barrier(procs)
    return values, best
