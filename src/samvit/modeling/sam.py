"""SamDecoder: the prompt encoder and the mask decoder together, under the official checkpoint key names."""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor, nn

from ..config import DecoderConfig
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .transformer import TwoWayTransformer


class SamDecoder(nn.Module):
    """Prompt encoder + mask decoder; state dict keys equal the official `prompt_encoder.*` / `mask_decoder.*`."""

    def __init__(self, config: DecoderConfig = DecoderConfig()) -> None:
        super().__init__()
        c = config
        self.config = c
        self.prompt_encoder = PromptEncoder(c.embed_dim, (c.image_embedding_size,) * 2, (c.input_image_size,) * 2,
                                            c.mask_in_chans)
        self.mask_decoder = MaskDecoder(c.embed_dim, TwoWayTransformer(c.depth, c.embed_dim, c.num_heads, c.mlp_dim),
                                        c.num_multimask_outputs, c.iou_head_depth, c.iou_head_hidden_dim)

    def dense_pe(self) -> Tensor:
        """The image embedding's position encoding (1,C,h,w) in the module's dtype."""
        return self.prompt_encoder.get_dense_pe().to(self.mask_decoder.iou_token.weight.dtype)

    def forward(self, image_embeddings: Tensor, points: Optional[Tuple[Tensor, Tensor]] = None,
                boxes: Optional[Tensor] = None, masks: Optional[Tensor] = None,
                multimask_output: bool = True) -> Tuple[Tensor, Tensor]:
        """One image's embedding (1,C,h,w) and B prompts in the input frame -> (B,M,4h,4w) logits, (B,M) IoU."""
        w = self.mask_decoder.iou_token.weight
        sparse, dense = self.prompt_encoder(points, boxes, masks)
        return self.mask_decoder(image_embeddings.to(w.dtype), self.dense_pe(), sparse, dense, multimask_output)
