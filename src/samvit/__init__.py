"""samvit: the Segment Anything (SAM) ViT image encoder, faithful, fast and at scale."""
from .config import PRESETS, EncoderConfig, preset
from .modeling.encoder import ImageEncoder
from .runtime import tune_allocator
from .data.images import ImageError, load_image
from .data.preprocess import PreparedImage, preprocess
from .checkpoints.files import CheckpointError
from .checkpoints.load import load_decoder, load_encoder, load_sam, save_encoder
from .embeddings.store import EmbeddingStore
from .checkpoints.registry import download_checkpoint, resolve_checkpoint
from .checkpoints.convert import convert_checkpoint
from .masks.prompts import PromptError
from .masks.predictor import Predictor
from .masks.automatic import AutomaticMaskGenerator
from .export import export_onnx
from .config import MAE_PRESETS, MAEConfig, mae_preset
from .modeling.mae import MaskedAutoencoder

from ._version import __version__

__all__ = [
    "PRESETS", "EncoderConfig", "preset", "ImageEncoder", "tune_allocator", "ImageError", "PreparedImage",
    "load_image", "preprocess", "CheckpointError", "load_encoder", "save_encoder", "__version__",
    "EmbeddingStore", "resolve_checkpoint", "download_checkpoint", "convert_checkpoint",
    "Predictor", "PromptError", "AutomaticMaskGenerator", "load_decoder", "load_sam", "export_onnx",
    "MAE_PRESETS", "MAEConfig", "mae_preset", "MaskedAutoencoder",
]
