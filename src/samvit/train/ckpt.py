"""Training checkpoints: one file per save, written atomically, the last N kept, loadable with weights_only=True.

A checkpoint holds the full (unsharded) model and optimizer state, the lr schedule, the grad scaler, the step,
the data position (epoch, batches taken in it) and every process's RNG states, so that a resumed run continues
bit for bit; the full state also loads in a single process whatever the run's DDP/FSDP layout was.
"""
from __future__ import annotations

import glob
import logging
import os
import random
import re
from typing import Dict, List, Optional

import numpy as np
import torch

from ..checkpoints.files import atomic_write

FORMAT = "samvit-train-checkpoint"
_NAME = re.compile(r"^ckpt_(\d{8,})\.pt$")


def rng_state() -> Dict:
    """This process's RNG states (torch CPU and CUDA, numpy, python) as tensors, lists and numbers."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }


def set_rng_state(state: Dict) -> None:
    """Restore what rng_state() returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"ckpt_{step:08d}.pt")


def list_checkpoints(run_dir: str) -> List[str]:
    """The run's checkpoint files, oldest step first (temporary files of an interrupted save are not listed)."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(run_dir), "ckpt_*.pt")):
        m = _NAME.match(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


class _Writes:
    """A file for torch.save that keeps the OSError of a failed write (torch reports a full disk as a RuntimeError
    'unexpected pos' that does not say why)."""

    def __init__(self, fh) -> None:
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.fh.flush()


def save_checkpoint(state: Dict, run_dir: str, step: int, keep_last: int = 3) -> str:
    """Write state to RUN_DIR/ckpt_<step>.pt atomically (temporary file, fsync, rename), then delete all but the
    newest keep_last checkpoints and any temporary file a killed save left behind. A failed write (a full disk)
    removes the temporary file and raises OSError naming the checkpoint; the older checkpoints stay."""
    path = checkpoint_path(run_dir, step)
    sink = None
    try:
        with atomic_write(path) as tmp, open(tmp, "wb") as fh:  # the temporary file is removed on any failure
            sink = _Writes(fh)
            torch.save(dict(state, format=FORMAT, step=step), sink)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException as e:
        err = e if isinstance(e, OSError) else getattr(sink, "error", None)
        if err is not None:
            raise OSError(err.errno, f"cannot write the checkpoint ({err.strerror or err}); the temporary file was "
                          "removed, the older checkpoints are kept", path) from None
        raise
    dir_fd = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        os.remove(old)
    for stray in glob.glob(os.path.join(glob.escape(run_dir), "ckpt_*.pt.tmp-*")):
        if stray != tmp:
            try:
                os.remove(stray)
            except FileNotFoundError:
                pass
    return path


LOCK_FILE = "train.lock"


def lock_run_dir(run_dir: str) -> int:
    """Take RUN_DIR/train.lock (an exclusive fcntl lock held until unlock_run_dir or the process ends) and write
    who holds it; RunLockedError naming the holder when another process trains in the folder. Returns the fd."""
    import fcntl
    import json
    import socket
    import time

    from ..errors import RunLockedError

    path = os.path.join(run_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
        except ValueError:
            holder = {}
        os.close(fd)
        who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('started', '?')}"
               if isinstance(holder, dict) else "unknown")
        raise RunLockedError(f"--out {run_dir}: another process is training in this run folder ({who}; lock "
                             f"{path}); wait for it to end, or stop it, before --resume") from None
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    return fd


def unlock_run_dir(fd: Optional[int]) -> None:
    """Release what lock_run_dir took (the file stays; an unlocked one holds no run)."""
    if fd is not None:
        os.close(fd)  # closing the only descriptor releases the flock


def load_checkpoint(path: str) -> Dict:
    """Read a checkpoint written by save_checkpoint (weights_only=True, on the CPU)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        from ..errors import InputError

        raise InputError(f"{path}: not a samvit training checkpoint")
    return state


def latest_checkpoint(run_dir: str) -> Optional[Dict]:
    """The newest readable checkpoint of the run (an unreadable newest one is reported and passed over), or None."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            state = load_checkpoint(path)
        except Exception as e:  # a damaged file (disk full, copied half-way): fall back to the one before
            logging.getLogger("samvit.train").warning("cannot read checkpoint %s (%s); trying an older one",
                                                      path, e)
            continue
        state["path"] = path
        return state
    return None
