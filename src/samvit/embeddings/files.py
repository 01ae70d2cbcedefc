"""One embedding per file: a .safetensors holding `embedding` (C,h,w) and, in its metadata, the image sizes and
provenance (model, checkpoint sha256, samvit version, dtype, source)."""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

from ..checkpoints.files import write_tensors


def output_path(out_dir: str, key: str) -> str:
    """Where the embedding of the input keyed `key` goes: same relative path, suffix .safetensors."""
    return os.path.join(out_dir, os.path.splitext(key)[0] + ".safetensors")


def save_embedding(path: str, embedding: torch.Tensor, original_size: Tuple[int, int],
                   input_size: Tuple[int, int], metadata: Dict[str, str]) -> None:
    """Write one embedding (C,h,w) and its metadata, atomically."""
    meta = dict(metadata, original_size=f"{original_size[0]},{original_size[1]}",
                input_size=f"{input_size[0]},{input_size[1]}")
    write_tensors(path, {"embedding": embedding}, meta)


def embedding_img_size(path: str) -> Optional[int]:
    """The model input side an embedding file was made with (its `img_size` metadata), None for older files."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        value = (f.metadata() or {}).get("img_size")
    return None if value is None else int(value)


def load_embedding(path: str) -> Tuple[torch.Tensor, Dict[str, object]]:
    """Read an embedding file written by save_embedding: (embedding (C,h,w), metadata with int sizes)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta: Dict[str, object] = dict(f.metadata() or {})
        emb = f.get_tensor("embedding")
    for k in ("original_size", "input_size"):
        if k in meta:
            meta[k] = tuple(int(v) for v in str(meta[k]).split(","))
    if "img_size" in meta:
        meta["img_size"] = int(meta["img_size"])
    return emb, meta
