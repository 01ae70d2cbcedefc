"""HQ-SAM's mask decoder (Ke et al. 2023, the `segment-anything-hq` package): SAM's mask decoder plus a high-quality
output token whose mask is read from the decoder's upscaled embedding fused with the encoder's early features
(the residual stream after its first global-attention block). State dict keys equal the official ones."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

from .common import LayerNorm2d
from .mask_decoder import MLP, MaskDecoder, masks_from
from .tinyvit import TinyViT
from .transformer import TwoWayTransformer
from ..errors import ParameterError


class MaskDecoderHQ(MaskDecoder):
    """SAM's MaskDecoder + the HQ output token (`hf_token`, `hf_mlp`) and the HQ feature fusion
    (`compress_vit_feat`, `embedding_encoder`, `embedding_maskfeature`); `vit_dim` is the encoder's width."""

    def __init__(self, transformer_dim: int, transformer: TwoWayTransformer, num_multimask_outputs: int = 3,
                 iou_head_depth: int = 3, iou_head_hidden_dim: int = 256, vit_dim: int = 1024) -> None:
        super().__init__(transformer_dim, transformer, num_multimask_outputs, iou_head_depth, iou_head_hidden_dim)
        d = transformer_dim
        self.hf_token = nn.Embedding(1, d)
        self.hf_mlp = MLP(d, d, d // 8, 3)
        self.compress_vit_feat = nn.Sequential(
            nn.ConvTranspose2d(vit_dim, d, kernel_size=2, stride=2),
            LayerNorm2d(d),
            nn.GELU(),
            nn.ConvTranspose2d(d, d // 8, kernel_size=2, stride=2),
        )
        self.embedding_encoder = nn.Sequential(
            nn.ConvTranspose2d(d, d // 4, kernel_size=2, stride=2),
            LayerNorm2d(d // 4),
            nn.GELU(),
            nn.ConvTranspose2d(d // 4, d // 8, kernel_size=2, stride=2),
        )
        self.embedding_maskfeature = nn.Sequential(
            nn.Conv2d(d // 8, d // 4, 3, 1, 1),
            LayerNorm2d(d // 4),
            nn.GELU(),
            nn.Conv2d(d // 4, d // 8, 3, 1, 1),
        )

    def hq_features(self, image_embeddings: Tensor, early_features: Tensor) -> Tensor:
        """(1,C,h,w) image embedding + (1,vit_dim,h,w) early encoder features -> (1,C/8,4h,4w) HQ features."""
        return self.embedding_encoder(image_embeddings) + self.compress_vit_feat(early_features)

    def forward(self, image_embeddings: Tensor, image_pe: Tensor, sparse_prompt_embeddings: Tensor,
                dense_prompt_embeddings: Tensor, multimask_output: bool, hq_token_only: bool = False,
                early_features: Tensor = None) -> Tuple[Tensor, Tensor]:
        """As MaskDecoder, plus the early features (1,vit_dim,h,w) -> (B,1,4h,4w) logits, (B,1) IoU, as the official.

        The SAM mask is token 0, or with multimask_output the one of tokens 1..3 with the highest predicted IoU
        (its IoU is returned); the logits are the HQ mask alone (hq_token_only) or the SAM mask plus the HQ mask.
        """
        if early_features is None:
            raise ParameterError("the HQ-SAM mask decoder needs the encoder's early features (early_features=...)")
        masks, iou = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings,
                                        dense_prompt_embeddings, self.hq_features(image_embeddings, early_features))
        return select_hq(masks, iou, multimask_output, hq_token_only)

    def predict_masks(self, image_embeddings: Tensor, image_pe: Tensor, sparse_prompt_embeddings: Tensor,
                      dense_prompt_embeddings: Tensor, hq_features: Tensor = None) -> Tuple[Tensor, Tensor]:
        """All masks (B,num_mask_tokens+1,4h,4w): the SAM tokens' masks then the HQ token's; IoU (B,num_mask_tokens)."""
        if hq_features is None:
            raise ParameterError("the HQ-SAM mask decoder needs its HQ features (hq_features(embedding, early features))")
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight, self.hf_token.weight], dim=0)
        hs, up = self.run_transformer(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                                      out_tokens)
        n = self.num_mask_tokens
        hyper_sam = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        up_hq = self.embedding_maskfeature(up) + hq_features.expand(up.shape[0], -1, -1, -1)
        masks = torch.cat([masks_from(hyper_sam, up), masks_from(self.hf_mlp(hs[:, 1 + n])[:, None], up_hq)], dim=1)
        return masks, self.iou_prediction_head(hs[:, 0])


def encode_hq(encoder: nn.Module, x: Tensor, early_block: int) -> Tuple[Tensor, Tensor]:
    """Images (B,3,S,S) -> (embeddings (B,C,h,w), early features (B,C_vit,h,w)): the encoder's output and, for
    HQ-SAM's decoder, the residual stream after block early_block (ImageEncoder.forward_intermediates), or for
    TinyViT (HQ-SAM's vit_tiny) the output of stage early_block (TinyViT.forward_intermediates)."""
    if isinstance(encoder, TinyViT):
        out, (early,) = encoder.forward_intermediates(x, stages=[early_block])
    else:
        out, (early,) = encoder.forward_intermediates(x, blocks=[early_block])
    return out, early.permute(0, 3, 1, 2)


def select_hq(masks: Tensor, iou: Tensor, multimask_output: bool, hq_token_only: bool) -> Tuple[Tensor, Tensor]:
    """All masks (B,M+1,H,W) (the HQ mask last) and IoU (B,M) -> the official HQ-SAM output (B,1,H,W), (B,1)."""
    m = iou.shape[1]
    if multimask_output:
        iou, best = iou[:, 1:m].max(dim=1, keepdim=True)
        sam = masks[:, 1:m].gather(1, best[:, :, None, None].expand(-1, -1, *masks.shape[-2:]))
    else:
        iou, sam = iou[:, :1], masks[:, :1]
    hq = masks[:, m:m + 1]
    return (hq if hq_token_only else sam + hq), iou
