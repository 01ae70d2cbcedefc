"""nn.Modules of samvit."""
from .attention import Attention
from .encoder import Block, ImageEncoder, LayerNorm2d
from .mae import MaskedAutoencoder

__all__ = ["Attention", "Block", "ImageEncoder", "LayerNorm2d", "MaskedAutoencoder"]
