"""nn.Modules of samvit: common layers, attention (and its kernel registry), the encoder, the prompt encoder,
the mask decoder's transformer, the mask decoder, and SamDecoder (prompt encoder + mask decoder)."""
from .attention import KERNELS, Attention, register_kernel
from .common import LayerNorm2d, MLPBlock
from .encoder import Block, ImageEncoder

__all__ = ["Attention", "Block", "ImageEncoder", "KERNELS", "LayerNorm2d", "MLPBlock", "register_kernel"]
