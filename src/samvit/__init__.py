"""samvit: the Segment Anything (SAM) ViT image encoder, faithful, fast and at scale.

The public API is re-exported here lazily (PEP 562): `import samvit` is cheap (no torch) and each name imports
its module on first use. Where each stage lives: README.md, "Layout".
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, List

from ._version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "EncoderConfig": "config", "DecoderConfig": "config", "PRESETS": "config", "preset": "config",
    "tune_allocator": "runtime",
    "ImageError": "data.images", "load_image": "data.images",
    "PreparedImage": "data.preprocess", "preprocess": "data.preprocess",
    "ImageEncoder": "modeling.encoder", "SamDecoder": "modeling.sam",
    "CheckpointError": "checkpoints.files",
    "load_encoder": "checkpoints.load", "load_decoder": "checkpoints.load", "load_sam": "checkpoints.load",
    "save_encoder": "checkpoints.load",
    "download_checkpoint": "checkpoints.registry", "resolve_checkpoint": "checkpoints.registry",
    "convert_checkpoint": "checkpoints.convert",
    "EmbeddingStore": "embeddings.store", "embed": "embeddings.pipeline",
    "Predictor": "masks.predictor", "PromptError": "masks.prompts", "AutomaticMaskGenerator": "masks.automatic",
    "export_onnx": "export", "export_decoder_onnx": "export",
    "MAEConfig": "config", "MAE_PRESETS": "config", "mae_preset": "config", "MaskedAutoencoder": "modeling.mae",
    "Sam": "modeling.sam",
    "TinyViTConfig": "config", "TinyViT": "modeling.tinyvit",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from .checkpoints.convert import convert_checkpoint
    from .checkpoints.files import CheckpointError
    from .checkpoints.load import load_decoder, load_encoder, load_sam, save_encoder
    from .checkpoints.registry import download_checkpoint, resolve_checkpoint
    from .config import (MAE_PRESETS, PRESETS, DecoderConfig, EncoderConfig, MAEConfig, TinyViTConfig, mae_preset,
                         preset)
    from .data.images import ImageError, load_image
    from .data.preprocess import PreparedImage, preprocess
    from .embeddings.pipeline import embed
    from .embeddings.store import EmbeddingStore
    from .export import export_decoder_onnx, export_onnx
    from .masks.automatic import AutomaticMaskGenerator
    from .masks.predictor import Predictor
    from .masks.prompts import PromptError
    from .modeling.encoder import ImageEncoder
    from .modeling.mae import MaskedAutoencoder
    from .modeling.sam import SamDecoder
    from .modeling.tinyvit import TinyViT
    from .runtime import tune_allocator


# subpackages reachable as attributes of `samvit` (samvit.inspect.attention(...)) without an explicit import
_SUBPACKAGES = ("inspect", "ray")  # samvit.ray: the Ray Data adapters (imports ray on first use)


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'samvit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBPACKAGES))
