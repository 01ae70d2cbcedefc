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
import warnings
from typing import TYPE_CHECKING, Callable, Dict, Iterator, Optional, Tuple, Union

from .errors import ParameterError

if TYPE_CHECKING:
    import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}
_tuned = False
DtypeArg = Union[str, "torch.dtype", None]  # "auto", a dtype name (float32, bf16, ...), a torch.dtype; None: default
# The one default compute dtype of every entry point (embed, segment, serve, inspect, evaluate, Predictor,
# load_encoder): float32, as the official package computes, and the same numbers on every CPU, so that embeddings
# made on different machines agree. dtype="auto" (bfloat16 where the device computes it natively) is opt-in.
DEFAULT_DTYPE = "float32"

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
        raise ParameterError(f"device {device!r} is unknown; expected cpu, cuda, cuda:N or auto", "device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"device {device!r} asked for, but no CUDA device is available here", "device")
    return dev


def as_device(device: Union[str, "torch.device", None]) -> Optional["torch.device"]:
    """A device argument as a torch.device (None stays None); ParameterError for a name torch does not know."""
    import torch

    if device is None or isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ParameterError(f"device {device!r} is unknown; expected cpu, cuda, cuda:N", "device") from None


def cpu_features() -> Dict[str, bool]:
    """The CPU's instruction-set features that decide the encoder's speed (avx2, avx512f, avx512_vnni,
    avx512_bf16, amx), as PyTorch detects them."""
    import torch

    def check(name: str) -> bool:
        fn = getattr(torch.cpu, name, None)
        return bool(fn()) if fn is not None else False

    return {"avx2": check("_is_avx2_supported"), "avx512f": check("_is_avx512_supported"),
            "avx512_vnni": check("_is_vnni_supported"), "avx512_bf16": check("_is_avx512_bf16_supported"),
            "amx": check("_is_amx_tile_supported")}


def native_bfloat16(device: Union[str, "torch.device", None] = None) -> bool:
    """Whether `device` computes bfloat16 matmuls natively: CUDA with bf16 support; a CPU with AVX512-BF16 or AMX
    (without them every bfloat16 matmul is emulated, several times slower than float32)."""
    import torch

    dev = torch.device(device or "cpu")
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if dev.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def auto_dtype(device: Union[str, "torch.device", None] = None) -> "torch.dtype":
    """bfloat16 where `device` computes it natively (native_bfloat16), else float32; $SAMVIT_DTYPE, when set to
    a dtype name, replaces the choice."""
    import torch

    forced = os.environ.get("SAMVIT_DTYPE", "auto")
    if forced not in ("", "auto"):
        return resolve_dtype(forced, device)
    return torch.bfloat16 if native_bfloat16(device) else torch.float32


def resolve_dtype(dtype: DtypeArg = None, device: Union[str, "torch.device", None] = None) -> "torch.dtype":
    """'auto' (see auto_dtype), 'float32', 'bfloat16', 'float16' (or fp32/bf16/fp16), a torch dtype, or None
    (DEFAULT_DTYPE, float32) -> torch dtype. bfloat16 asked for on a CPU that emulates it runs, with a warning."""
    import torch

    if dtype is None:
        dtype = DEFAULT_DTYPE
    if isinstance(dtype, str):
        if dtype == "auto":
            return auto_dtype(device)
        if dtype not in DTYPE_NAMES:
            raise ParameterError(f"unknown dtype {dtype!r}; expected auto, float32, bfloat16 or float16", "dtype")
        dtype = getattr(torch, DTYPE_NAMES[dtype])
    if not isinstance(dtype, torch.dtype) or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ParameterError(f"dtype {dtype!r} is not supported; expected auto, float32, bfloat16 or float16", "dtype")
    if dtype == torch.bfloat16 and torch.device(device or "cpu").type == "cpu" and not native_bfloat16("cpu"):
        warnings.warn("bfloat16 on a CPU without AVX512-BF16 or AMX instructions is emulated and several times "
                      "slower than float32 here; dtype='auto' picks float32 on this CPU", stacklevel=3)
    return dtype


def describe_dtype(dtype: "torch.dtype", asked: DtypeArg, device: Union[str, "torch.device", None] = None) -> str:
    """One line for the CLI: the compute dtype and why it was chosen."""
    name = str(dtype).replace("torch.", "")
    if asked is None:
        return f"dtype {name} (the default; --dtype auto computes bfloat16 where the device has it natively)"
    if asked != "auto":
        return f"dtype {name} (asked for)"
    dev = torch_device_type(device)
    if os.environ.get("SAMVIT_DTYPE", "auto") not in ("", "auto"):
        return f"dtype {name} (auto: from SAMVIT_DTYPE)"
    why = "native bfloat16 on this " if name == "bfloat16" else "no native bfloat16 on this "
    return f"dtype {name} (auto: {why}{dev})"


def torch_device_type(device: Union[str, "torch.device", None]) -> str:
    import torch

    dev = torch.device(device or "cpu")
    if dev.type != "cpu":
        return dev.type
    feats = cpu_features()
    have = [k for k in ("avx512_bf16", "amx") if feats[k]]
    return "CPU" + (f", {' and '.join(have)}" if have else ": no avx512_bf16 / amx")


# ---- torch.distributed (torchrun) ----

def distributed_env() -> Optional[Tuple[int, int, int]]:
    """(rank, world_size, local_rank) from torchrun's environment, or None outside torchrun / with one process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    except (KeyError, ValueError) as e:
        raise ParameterError(f"incomplete torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK): {e}") from None


def is_main_process() -> bool:
    """Rank 0 of torch.distributed while its process group is up, else RANK 0 in torchrun's environment (a plain
    process included): the one process that writes shared outputs and prints."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


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
