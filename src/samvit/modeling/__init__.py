"""nn.Modules of samvit: common layers, attention (and its kernel registry), the encoder, the prompt encoder,
the mask decoder's transformer, the mask decoder, SamDecoder (prompt encoder + mask decoder), Sam (the whole
trainable model), LoRA adapters, and the MAE pre-training model."""
from .attention import KERNELS, Attention, register_kernel
from .common import LayerNorm2d, MLPBlock
from .encoder import Block, ImageEncoder
from .mae import MaskedAutoencoder

__all__ = ["Attention", "Block", "ImageEncoder", "KERNELS", "LayerNorm2d", "MLPBlock", "MaskedAutoencoder",
           "register_kernel"]
