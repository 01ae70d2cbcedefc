"""The vocabulary every checkpoint module shares: errors, state-dict types, the safe read, the atomic write,
file sha256 and the strict key check. A leaf: it imports nothing else of samvit."""
from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import zipfile
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

import torch

StateDict = Dict[str, torch.Tensor]
PathLike = Union[str, os.PathLike]
CONFIG_METADATA_KEY = "samvit_config"  # the EncoderConfig as JSON in samvit's own safetensors files
CHUNK = 1 << 22


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose tensors do not fit the model."""


def sha256_file(path: PathLike, progress: Optional[Callable[[int, int], None]] = None) -> str:
    """Hex sha256 of a file's bytes; progress(bytes done, total) after each block when given."""
    h = hashlib.sha256()
    total, done = os.path.getsize(path), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
            done += len(block)
            if progress is not None:
                progress(done, total)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_write(path: PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    Readers see the old file or the whole new one, never a partial write.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_tensors(path: PathLike, tensors: StateDict, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write tensors atomically: safetensors (with metadata) when the name ends in .safetensors, else a plain
    torch.save dict (metadata dropped)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_write(path) as tmp:
        if os.fspath(path).endswith(".safetensors"):
            save_file(tensors, tmp, metadata=metadata)
        else:
            torch.save(tensors, tmp)


def _is_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n < os.path.getsize(path)


def read_checkpoint(path: PathLike) -> Tuple[StateDict, Dict[str, str]]:
    """Read a .pth/.pt/.bin (torch.load with weights_only=True) or .safetensors file into (state dict, metadata)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    if _is_safetensors(path):
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
            return load_file(path), metadata
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: safetensors file is truncated or corrupt ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = str(e).splitlines()  # torch's own message: keep the line that names what the pickle asks for
        why = next((ln.split("error:", 1)[1].split(". Please")[0].strip() for ln in lines if "Unpickler error:" in ln),
                   lines[0] if lines else "")
        raise CheckpointError(
            f"{path}: refused to load: the file is not a plain tensor checkpoint "
            f"(it needs code to unpickle, which is not allowed; weights_only=True): {why}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: truncated or not a PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    return _unwrap_state_dict(obj, path), {}


def _unwrap_state_dict(obj, path: str) -> StateDict:
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a checkpoint: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def check_keys(sd: StateDict, expected: Dict[str, tuple], header: str) -> None:
    """Raise CheckpointError(header + details) naming every missing, unexpected and wrongly shaped key."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {expected[k]}"
                   for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k])
    if missing or unexpected or wrong:
        parts = [header]
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointError("\n  ".join(parts))
