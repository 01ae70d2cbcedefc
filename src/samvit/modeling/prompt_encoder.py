"""The SAM prompt encoder: points and boxes -> sparse tokens, a low-res mask -> a dense embedding."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Fourier features of (x, y) in [0,1]^2 with random Gaussian frequencies (a buffer in the checkpoint).

    Computed in float32 whatever the module's dtype; callers cast the result.
    """

    def __init__(self, num_pos_feats: int = 64) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def _pe_encoding(self, coords: Tensor) -> Tensor:
        # always float32: sin/cos of these large arguments lose everything in bfloat16
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix.float()
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: Tuple[int, int]) -> Tensor:
        """Encoding of the pixel centres of an (h, w) grid: (C, h, w)."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack([x[None, :].expand(h, w), y[:, None].expand(h, w)], dim=-1)
        return self._pe_encoding(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: Tensor, image_size: Tuple[int, int]) -> Tensor:
        """Encoding of (..., 2) pixel coordinates (x, y) in an image of (H, W)."""
        coords = coords.float()
        return self._pe_encoding(torch.stack([coords[..., 0] / image_size[1], coords[..., 1] / image_size[0]], -1))


class PromptEncoder(nn.Module):
    """Official SAM PromptEncoder: labels 1/0 = foreground/background point, 2/3 = box corners, -1 = padding."""

    def __init__(self, embed_dim: int, image_embedding_size: Tuple[int, int], input_image_size: Tuple[int, int],
                 mask_in_chans: int = 16) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> Tensor:
        """Position encoding of every image-embedding cell: (1, C, h, w)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: Tensor, labels: Tensor, pad: bool) -> Tensor:
        points = points + 0.5  # pixel centres
        if pad:  # without a box, one padding token stands in for it (official)
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        emb = torch.where(labels == -1, self.not_a_point_embed.weight, emb)
        emb = torch.where(labels == 0, emb + self.point_embeddings[0].weight, emb)
        emb = torch.where(labels == 1, emb + self.point_embeddings[1].weight, emb)
        return emb

    def _embed_boxes(self, boxes: Tensor) -> Tensor:
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_embed = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])
        return emb + corner_embed

    def forward(self, points: Optional[Tuple[Tensor, Tensor]], boxes: Optional[Tensor],
                masks: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Prompts in the model's input frame -> (sparse (B,N,C), dense (B,C,h,w)) embeddings."""
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        w = self.no_mask_embed.weight
        parts = [w.new_empty(bs, 0, self.embed_dim)]
        if points is not None:
            parts.append(self._embed_points(points[0], points[1], pad=boxes is None).to(w.dtype))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes).to(w.dtype))
        sparse = torch.cat(parts, dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks.to(w.dtype))
        else:
            dense = w.reshape(1, -1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return sparse, dense
