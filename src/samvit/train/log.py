"""Training logs: RUN_DIR/log.jsonl (one JSON object per logged step), a progress bar with ETA on a terminal,
and TensorBoard scalars when tensorboard is installed (train/<name>; val/<metric> for the val_<metric> values of
a validation). Only the main process writes."""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Callable, Dict, Optional

import torch

from ..checkpoints.files import atomic_write

LOG_FILE = "log.jsonl"


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocated bytes on a GPU, else peak resident set size (RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def truncate_log(run_dir: str, step: int) -> None:
    """Drop the entries after `step` (logged by a run killed after its last checkpoint), atomically."""
    path = os.path.join(run_dir, LOG_FILE)
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as fh:
        lines = [ln for ln in fh if ln.strip()]
    kept = []
    for ln in lines:
        try:
            if json.loads(ln).get("step", 0) <= step:
                kept.append(ln)
        except json.JSONDecodeError:  # a line cut by a kill
            pass
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(kept)


def _tensorboard(run_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is not installed: no event files, nothing else changes
        return None
    return SummaryWriter(os.path.join(run_dir, "tensorboard"))


class Logger:
    """Writes logged steps to log.jsonl, TensorBoard and a tqdm bar (shown on a terminal unless quiet)."""

    def __init__(self, run_dir: str, total_steps: int, start_step: int, enabled: bool = True, quiet: bool = False,
                 tensorboard: Optional[Callable[[str], object]] = _tensorboard) -> None:
        self.enabled = enabled
        self.bar = self.tb = self.file = None
        self.last_time, self.last_step = time.perf_counter(), start_step
        if not enabled:
            return
        self.file = open(os.path.join(run_dir, LOG_FILE), "a", encoding="utf-8")
        self.tb = tensorboard(run_dir) if tensorboard else None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def step(self, step: int) -> None:
        """Move the bar to `step` (called after every optimizer step)."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, step: int, values: Dict[str, float]) -> None:
        """Record one logged step: {'step': step, **values} as a line of log.jsonl, TensorBoard scalars, bar text."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: v if isinstance(v, int) else float(v) for k, v in values.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}", float(v), step)
        if self.bar is not None:
            shown = {k: values[k] for k in ("loss", "lr", "grad_norm", "images_per_s") if k in values}
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)

    def throughput(self, step: int, images_per_step: int) -> float:
        """Images per second since the previous call."""
        now = time.perf_counter()
        rate = (step - self.last_step) * images_per_step / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        return rate

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (spent on something else: a validation) out of the next throughput."""
        self.last_time += seconds

    def close(self) -> None:
        for h in (self.bar, self.tb, self.file):
            if h is not None:
                h.close()
