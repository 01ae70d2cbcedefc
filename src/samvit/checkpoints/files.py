"""The vocabulary every checkpoint module shares: errors, state-dict types, the safe read, the atomic write,
file sha256 and the strict key check. It imports nothing else of samvit but the error types."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pickle
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

import torch

from ..errors import InputError, SamvitError, open_regular

StateDict = Dict[str, torch.Tensor]
PathLike = Union[str, os.PathLike]
CONFIG_METADATA_KEY = "samvit_config"  # the EncoderConfig as JSON in samvit's own safetensors files
DECODER_CONFIG_METADATA_KEY = "samvit_decoder_config"  # the DecoderConfig as JSON (its head count is in no tensor)
CHUNK = 1 << 22


class CheckpointError(SamvitError, ValueError):
    """A checkpoint file that cannot be read, or whose tensors do not fit the model."""


def sha256_file(path: PathLike, progress: Optional[Callable[[int, int], None]] = None) -> str:
    """Hex sha256 of a file's bytes; progress(bytes done, total) after each block when given. Only a regular
    file is read (InputError otherwise: a FIFO or a device would never end)."""
    h = hashlib.sha256()
    total, done = os.path.getsize(path), 0
    with open_regular(path, "file to hash", InputError) as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
            done += len(block)
            if progress is not None:
                progress(done, total)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_write(path: PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    Readers see the old file or the whole new one, never a partial write. An OSError that names no file (a
    full disk seen by a write) is raised again naming `path`.
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except FileExistsError as e:  # a file where a folder of the path should be
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory (a file is in the way)", e.filename) from None
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, path) from None
        raise
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
            try:
                save_file(tensors, tmp, metadata=metadata)
            except OSError:
                raise
            except Exception as e:  # safetensors reports a full disk as its own error type: name the file
                raise OSError(f"cannot write {os.fspath(path)} ({e})") from None
        else:
            _torch_save(tensors, tmp, path)


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
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open_regular(path, "checkpoint file", CheckpointError) as f:  # a FIFO or a device is refused, unopened
        head = f.read(9)
    if not head:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    if _is_safetensors(path):
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
            return load_file(path), metadata
        except (SafetensorError, Exception) as e:  # safetensors' own type, OSError, ValueError, MemoryError...
            raise CheckpointError(f"{path}: safetensors file is truncated or corrupt ({e})") from None
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # neither torch.save's zip nor a pickle
        raise CheckpointError(f"{path}: not a checkpoint: neither a safetensors file nor a PyTorch file (a zip "
                              f"archive or a pickle); it starts with {head[:8]!r}")
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
    except Exception as e:  # RuntimeError, EOFError, BadZipFile, ValueError, OSError... from a damaged file
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: truncated or not a PyTorch checkpoint ({first})") from None
    metadata = {}
    if isinstance(obj, dict) and isinstance(obj.get(CONFIG_METADATA_KEY), str):  # written by convert: see below
        metadata[CONFIG_METADATA_KEY] = obj[CONFIG_METADATA_KEY]
    return _unwrap_state_dict(obj, path), metadata


def save_checkpoint(path: PathLike, tensors: StateDict, config_json: Optional[str] = None) -> None:
    """Write tensors atomically as safetensors (config in the metadata) or, for another suffix, with torch.save:
    a plain dict of tensors, or {"state_dict": tensors, "samvit_config": config} when a config must be kept (a
    model that no preset describes); read_checkpoint reads both."""
    if os.fspath(path).endswith(".safetensors"):
        write_tensors(path, tensors, {CONFIG_METADATA_KEY: config_json, "format": "pt"} if config_json else
                      {"format": "pt"})
        return
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_write(path) as tmp:
        _torch_save({"state_dict": tensors, CONFIG_METADATA_KEY: config_json} if config_json else tensors, tmp, path)


def _torch_save(obj, tmp: str, path: PathLike) -> None:
    """torch.save into an open file, so a full or read-only disk is an OSError naming `path` (torch's own writer
    reports it as a RuntimeError)."""
    errors = []

    class Writes:  # keeps the OSError of a failed write: torch reports it as RuntimeError 'unexpected pos'
        def write(self, data) -> int:
            try:
                return f.write(data)
            except OSError as e:
                errors.append(e)
                raise

        def flush(self) -> None:
            f.flush()

    with open(tmp, "wb") as f:
        try:
            torch.save(obj, Writes())
        except RuntimeError as e:
            if errors and errors[0].errno is not None:
                raise OSError(errors[0].errno, errors[0].strerror, os.fspath(path)) from None
            raise OSError(f"cannot write {os.fspath(path)} ({str(e).splitlines()[-1]})") from None


def _unwrap_state_dict(obj, path: str) -> StateDict:
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a checkpoint: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def check_keys(sd: StateDict, expected: Dict[str, tuple], header: str) -> None:
    """Raise CheckpointError(header + details) naming every missing, unexpected, wrongly shaped and non-float
    key."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {expected[k]}"
                   for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k])
    dtypes = sorted(f"{k}: {sd[k].dtype}" for k in set(expected) & set(sd) if not sd[k].is_floating_point())
    if missing or unexpected or wrong or dtypes:
        parts = [header]
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong),
                             ("not floating point", dtypes)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointError("\n  ".join(parts))
