"""The SAM mask decoder: output tokens + prompt tokens through the two-way transformer -> mask logits, IoU."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import LayerNorm2d
from .transformer import TwoWayTransformer


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskDecoder(nn.Module):
    """Official SAM MaskDecoder: output tokens + prompt tokens through the two-way transformer -> mask logits, IoU."""

    def __init__(self, transformer_dim: int, transformer: TwoWayTransformer, num_multimask_outputs: int = 3,
                 iou_head_depth: int = 3, iou_head_hidden_dim: int = 256) -> None:
        super().__init__()
        self.transformer = transformer
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        d = transformer_dim
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(d, d // 4, kernel_size=2, stride=2),
            LayerNorm2d(d // 4),
            nn.GELU(),
            nn.ConvTranspose2d(d // 4, d // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(d, d, d // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(d, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(self, image_embeddings: Tensor, image_pe: Tensor, sparse_prompt_embeddings: Tensor,
                dense_prompt_embeddings: Tensor, multimask_output: bool) -> Tuple[Tensor, Tensor]:
        """(1 or B,C,h,w) image, (1,C,h,w) pe, (B,N,C) sparse, (B,C,h,w) dense -> (B,M,4h,4w) logits, (B,M) IoU.

        M is 3 (masks 1..3) with multimask_output, else 1 (mask 0), as the official.
        """
        masks, iou_pred = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings,
                                             dense_prompt_embeddings)
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou_pred[:, sl]

    def predict_masks(self, image_embeddings: Tensor, image_pe: Tensor, sparse_prompt_embeddings: Tensor,
                      dense_prompt_embeddings: Tensor) -> Tuple[Tensor, Tensor]:
        """All num_mask_tokens masks and IoU predictions."""
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        hs, up = self.run_transformer(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                                      out_tokens)
        mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens]
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
                               dim=1)
        return masks_from(hyper_in, up), self.iou_prediction_head(hs[:, 0])

    def run_transformer(self, image_embeddings: Tensor, image_pe: Tensor, sparse_prompt_embeddings: Tensor,
                        dense_prompt_embeddings: Tensor, out_tokens: Tensor) -> Tuple[Tensor, Tensor]:
        """Output tokens (T,C) + B prompts through the two-way transformer -> (tokens out (B,T+N,C), upscaled
        image embedding (B,C/8,4h,4w))."""
        b = sparse_prompt_embeddings.shape[0]
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1)
        src = (image_embeddings + dense_prompt_embeddings).expand(b, -1, -1, -1)  # one image, b prompts
        _, c, h, w = src.shape
        hs, src = self.transformer(src, image_pe, tokens)
        return hs, self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))


def masks_from(hyper_in: Tensor, upscaled: Tensor) -> Tensor:
    """(B,M,C) hypernetwork weights x (B,C,H,W) upscaled embedding -> (B,M,H,W) mask logits."""
    b, c, h, w = upscaled.shape
    return (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
