"""nn.Modules of samvit: common layers, attention (and its kernel registry), the encoder, the prompt encoder,
the mask decoder's transformer, the mask decoder, SamDecoder (prompt encoder + mask decoder), Sam (the whole
trainable model), LoRA adapters, and the MAE pre-training model."""
from .attention import Attention
from .common import LayerNorm2d, MLPBlock
from .encoder import Block, ImageEncoder
from .kernels import KERNELS, AttnInputs, register_kernel
from .mae import MaskedAutoencoder

__all__ = ["Attention", "AttnInputs", "Block", "ImageEncoder", "KERNELS", "LayerNorm2d", "MLPBlock",
           "MaskedAutoencoder", "register_kernel"]
