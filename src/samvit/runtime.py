"""Process settings: the glibc allocator tuning, device and dtype parsing, torch.distributed (torchrun)
initialisation, and progress callbacks (the one rule for when a progress bar shows).

torch is imported inside the functions that need it, so the command line can start without it.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Tuple, Union

if TYPE_CHECKING:
    import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}
_tuned = False

# A progress callback: progress(done, total) after each finished unit (images, points, bytes), `done` counted
# from the start; keyword arguments carry optional notes (e.g. failed=3) that a bar may show.
Progress = Callable[..., None]
ProgressArg = Union[None, bool, Progress]


def tune_allocator() -> bool:
    """Keep glibc malloc from handing big tensors fresh zeroed pages from the kernel on every allocation.

    Same effect as GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=<large>: freed blocks are
    reused instead of unmapped, which removes millions of page faults per forward pass on CPU (measurements in
    docs/speed.md). Affects only this process; returns False where it does not apply (not glibc, or
    SAMVIT_NO_TUNE=1).
    """
    global _tuned
    if _tuned:
        return True
    if os.environ.get("SAMVIT_NO_TUNE") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        # M_TRIM_THRESHOLD -1: never trim (man mallopt); a positive int caps it below 2 GiB, which a big free passes
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
    except (OSError, AttributeError):
        return False
    _tuned = ok
    return ok


def resolve_device(device: Optional[str] = None) -> "torch.device":
    """'cuda' when available and nothing is asked, else the named device."""
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; expected cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA device is available here")
    return dev


def resolve_dtype(dtype: Optional[str]) -> "torch.dtype":
    """'float32', 'bfloat16' or 'float16' (or fp32/bf16/fp16) -> torch dtype; None -> float32."""
    import torch

    if dtype is None:
        return torch.float32
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of float32, bfloat16, float16")
    return getattr(torch, DTYPE_NAMES[dtype])


# ---- torch.distributed (torchrun) ----

def distributed_env() -> Optional[Tuple[int, int, int]]:
    """(rank, world_size, local_rank) from torchrun's environment, or None outside torchrun / with one process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    except (KeyError, ValueError) as e:
        raise ValueError(f"incomplete torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK): {e}") from None


def init_distributed(device: Optional[str] = None) -> Tuple["torch.device", Optional[Tuple[int, int, int]]]:
    """Initialise torch.distributed when run under torchrun: nccl on cuda:LOCAL_RANK, gloo on CPU.

    Args:
        device: the device asked for (None: cuda if available).
    Returns:
        (the device this process should use, (rank, world, local_rank) or None). Without torchrun it only
        resolves the device.
    """
    import torch

    env = distributed_env()
    dev = resolve_device(device)
    if env is None:
        return dev, None
    rank, world, local_rank = env
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev, env


@contextlib.contextmanager
def local_rank_zero_first(env: Optional[Tuple[int, int, int]]) -> Iterator[None]:
    """Run the body on local rank 0 first, then on the other ranks of the machine (e.g. a download that the
    others then find cached). Without torchrun (env None) it just runs the body."""
    import torch

    if env and env[2] != 0:
        torch.distributed.barrier()
    yield
    if env and env[2] == 0:
        torch.distributed.barrier()


# ---- progress ----

def progress_enabled(progress: Optional[bool] = None) -> bool:
    """The rule for when a progress bar shows: when asked (True/False), else only when stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else bool(progress)


class TqdmProgress:
    """A progress callback drawn as a tqdm bar on stderr; a context manager that closes the bar.

    Args:
        desc: the bar's label. unit: what is counted ("img", "pt", "B" for bytes, shown scaled).
        enabled: True/False, or None for the rule of progress_enabled.
        total, initial: known before the first call (else taken from the calls).
    """

    def __init__(self, desc: str = "", unit: str = "it", enabled: Optional[bool] = None,
                 total: Optional[int] = None, initial: int = 0, leave: bool = True) -> None:
        from tqdm import tqdm

        scaled = dict(unit_scale=True, unit_divisor=1024) if unit == "B" else {}
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not progress_enabled(enabled),
                        dynamic_ncols=True, leave=leave, **scaled)

    def __call__(self, done: int, total: Optional[int] = None, **notes) -> None:
        if total is not None and total != self.bar.total:
            self.bar.total = total
        if notes:
            self.bar.set_postfix(notes, refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "TqdmProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def progress_callback(progress: ProgressArg, desc: str = "", unit: str = "it", total: Optional[int] = None,
                      initial: int = 0, leave: bool = True) -> Iterator[Progress]:
    """A callable for `progress`: a given callable as is; None/True/False as a tqdm bar by progress_enabled's rule."""
    if callable(progress):
        yield progress
        return
    with TqdmProgress(desc, unit, progress, total=total, initial=initial, leave=leave) as bar:
        yield bar
