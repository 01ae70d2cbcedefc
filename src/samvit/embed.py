"""Embedding a few images into one .safetensors file each (the embedding plus its sizes and provenance)."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .modeling.encoder import ImageEncoder
from .data.images import ImageError
from .data.preprocess import PreparedImage, collate, preprocess


@dataclass
class EmbedReport:
    written: List[str] = field(default_factory=list)
    failed: List[Tuple[str, str]] = field(default_factory=list)  # (input, reason)


@torch.inference_mode()
def encode_batch(encoder: ImageEncoder, items: Sequence[PreparedImage]) -> torch.Tensor:
    """Run the encoder on prepared images; returns float32 embeddings on the CPU."""
    p = next(encoder.parameters())
    x = collate(items).to(device=p.device, dtype=encoder.dtype)
    return encoder(x).float().cpu()


def output_path(out_dir: str, key: str) -> str:
    """Where the embedding of the input keyed `key` goes: same relative path, suffix .safetensors."""
    return os.path.join(out_dir, os.path.splitext(key)[0] + ".safetensors")


def save_embedding(path: str, embedding: torch.Tensor, original_size: Tuple[int, int],
                   input_size: Tuple[int, int], metadata: Dict[str, str]) -> None:
    """Write one embedding (C,64,64) and its metadata; atomic (temp file, then rename)."""
    meta = dict(metadata, original_size=f"{original_size[0]},{original_size[1]}",
                input_size=f"{input_size[0]},{input_size[1]}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file({"embedding": embedding.contiguous()}, tmp, metadata=meta)
    os.replace(tmp, path)


def load_embedding(path: str) -> Tuple[torch.Tensor, Dict[str, object]]:
    """Read an embedding file written by save_embedding: (embedding (C,64,64), metadata with int sizes)."""
    with safe_open(path, framework="pt") as f:
        meta: Dict[str, object] = dict(f.metadata() or {})
        emb = f.get_tensor("embedding")
    for k in ("original_size", "input_size"):
        if k in meta:
            meta[k] = tuple(int(v) for v in str(meta[k]).split(","))
    return emb, meta


def embed_files(encoder: ImageEncoder, items: Sequence[Tuple[str, str]], out_dir: str, batch_size: int = 1,
                metadata: Optional[Dict[str, str]] = None, progress: Optional[bool] = None) -> EmbedReport:
    """Embed (path, key) items in batches into out_dir; a bad image is reported and the rest go on."""
    from tqdm import tqdm

    report = EmbedReport()
    metadata = dict(metadata or {})
    img_size = encoder.config.img_size
    disable = not sys.stderr.isatty() if progress is None else not progress
    bar = tqdm(total=len(items), unit="img", disable=disable, desc="embed")
    for start in range(0, len(items), max(1, batch_size)):
        batch, keys = [], []
        for path, key in items[start:start + batch_size]:
            try:
                batch.append(preprocess(path, img_size))
                keys.append((path, key))
            except ImageError as e:
                report.failed.append((path, str(e)))
                bar.update(1)
        if not batch:
            continue
        emb = encode_batch(encoder, batch)
        for (path, key), prepared, e in zip(keys, batch, emb):
            dest = output_path(out_dir, key)
            save_embedding(dest, e, prepared.original_size, prepared.input_size, dict(metadata, source=key))
            report.written.append(dest)
            bar.update(1)
    bar.close()
    return report
