"""samvit: the Segment Anything (SAM) ViT image encoder, faithful, fast and at scale."""
from .config import PRESETS, EncoderConfig, preset
from .modeling.encoder import ImageEncoder
from .runtime import tune_allocator
from .transforms import ImageError, PreparedImage, load_image, preprocess
from .weights import CheckpointError, load_encoder, save_encoder
from .store import EmbeddingStore
from .hub import download_checkpoint, resolve_checkpoint
from .convert import convert_checkpoint
from .predictor import Predictor, PromptError
from .automatic import AutomaticMaskGenerator
from .decoder_weights import load_decoder
from .export import export_onnx
from .config import MAE_PRESETS, MAEConfig, mae_preset
from .modeling.mae import MaskedAutoencoder

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "EncoderConfig", "preset", "ImageEncoder", "tune_allocator", "ImageError", "PreparedImage",
    "load_image", "preprocess", "CheckpointError", "load_encoder", "save_encoder", "__version__",
    "EmbeddingStore", "resolve_checkpoint", "download_checkpoint", "convert_checkpoint",
    "Predictor", "PromptError", "AutomaticMaskGenerator", "load_decoder", "export_onnx",
    "MAE_PRESETS", "MAEConfig", "mae_preset", "MaskedAutoencoder",
]
