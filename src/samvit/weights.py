"""Loading and saving encoder weights: format detection, safe loading, strict key checks, preset inference."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from typing import Dict, Optional, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from .config import PRESETS, EncoderConfig, preset
from .modeling.encoder import ImageEncoder

StateDict = Dict[str, torch.Tensor]
ModelSpec = Union[str, EncoderConfig, None]
ENCODER_PREFIX = "image_encoder."
CONFIG_METADATA_KEY = "samvit_config"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose tensors do not fit the model."""


def file_sha256(path: Union[str, os.PathLike], chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes (taken from the download cache's marker for a verified registry file)."""
    from .hub import known_sha256

    known = known_sha256(path)
    if known:
        return known
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _is_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n < os.path.getsize(path)


def read_checkpoint(path: Union[str, os.PathLike]) -> Tuple[StateDict, Dict[str, str]]:
    """Read a .pth/.pt (weights_only) or .safetensors file into (state dict, metadata)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    if _is_safetensors(path):
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
            return load_safetensors(path), metadata
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


def encoder_state_dict(sd: StateDict) -> StateDict:
    """The encoder's tensors under official key names, from an official, transformers or timm state dict."""
    from .convert import to_official

    sd = to_official(sd)
    if any(k.startswith(ENCODER_PREFIX) for k in sd):
        return {k[len(ENCODER_PREFIX):]: v for k, v in sd.items() if k.startswith(ENCODER_PREFIX)}
    return dict(sd)


def infer_config(sd: StateDict) -> EncoderConfig:
    """The preset whose parameter names and shapes match an encoder state dict exactly."""
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    for name, cfg in PRESETS.items():
        ref = _expected_shapes(cfg)
        if ref == shapes:
            return cfg
    w = sd.get("patch_embed.proj.weight")
    if w is None:
        raise CheckpointError("cannot infer the model: no `patch_embed.proj.weight` tensor "
                              "(is this a SAM image encoder checkpoint?)")
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    raise CheckpointError(
        f"no preset matches this checkpoint (width {w.shape[0]}, {depth} blocks); pass model= with one of "
        f"{', '.join(PRESETS)} or an EncoderConfig")


_SHAPE_CACHE: Dict[EncoderConfig, Dict[str, tuple]] = {}


def _expected_shapes(cfg: EncoderConfig) -> Dict[str, tuple]:
    if cfg not in _SHAPE_CACHE:
        with torch.device("meta"):
            model = ImageEncoder(cfg)
        _SHAPE_CACHE[cfg] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return _SHAPE_CACHE[cfg]


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


def check_state_dict(sd: StateDict, cfg: EncoderConfig, source: str = "checkpoint") -> None:
    """Raise CheckpointError naming every missing, unexpected and wrongly shaped encoder key."""
    check_keys(sd, _expected_shapes(cfg), f"{source} does not fit model {cfg.name!r}:")


def _resolve_config(model: ModelSpec) -> Optional[EncoderConfig]:
    if model is None or isinstance(model, EncoderConfig):
        return model
    return preset(model)


def load_encoder(model: ModelSpec = None, checkpoint: Union[str, os.PathLike, None] = None,
                 device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None,
                 attn_impl: str = "fast") -> ImageEncoder:
    """Build an ImageEncoder and load its weights (official, transformers or timm layout; .pth/.bin/.safetensors).

    `checkpoint` is a file, or a registry name (vit_b, vit_l, vit_h) fetched into the verified cache.

    With no checkpoint, the preset's freshly initialised weights are returned. With no model, the preset is
    taken from the safetensors metadata or inferred from the tensors' names and shapes.
    """
    cfg = _resolve_config(model)
    if checkpoint is None:
        if cfg is None:
            raise ValueError("load_encoder needs a model preset, a checkpoint, or both")
        encoder = ImageEncoder(cfg, attn_impl=attn_impl)
    else:
        from .hub import resolve_checkpoint

        checkpoint = resolve_checkpoint(checkpoint)
        sd, metadata = read_checkpoint(checkpoint)
        sd = encoder_state_dict(sd)
        if cfg is None and CONFIG_METADATA_KEY in metadata:
            cfg = EncoderConfig.from_json(metadata[CONFIG_METADATA_KEY])
        if cfg is None:
            cfg = infer_config(sd)
        check_state_dict(sd, cfg, source=os.fspath(checkpoint))
        with torch.device("meta"):
            encoder = ImageEncoder(cfg, attn_impl=attn_impl)
        encoder.load_state_dict(sd, strict=True, assign=True)
    encoder.eval()
    if device is not None or dtype is not None:
        encoder.to(device=device, dtype=dtype)
    return encoder


def save_encoder(encoder: ImageEncoder, path: Union[str, os.PathLike], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write the encoder's weights as safetensors, with its config in the metadata."""
    meta = {CONFIG_METADATA_KEY: encoder.config.to_json(), "format": "samvit"}
    meta.update(metadata or {})
    tensors = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    save_safetensors(tensors, os.fspath(path), metadata=meta)


def checkpoint_info(path: Union[str, os.PathLike]) -> Dict[str, object]:
    """Config, parameter count and tensor keys of a checkpoint, without building the model on real memory."""
    from .hub import resolve_checkpoint

    sd, metadata = read_checkpoint(resolve_checkpoint(path))
    sd = encoder_state_dict(sd)
    cfg = EncoderConfig.from_json(metadata[CONFIG_METADATA_KEY]) if CONFIG_METADATA_KEY in metadata else infer_config(sd)
    return {"config": cfg, "num_parameters": sum(v.numel() for v in sd.values()),
            "dtypes": sorted({str(v.dtype) for v in sd.values()}), "metadata": json.dumps(metadata)}
