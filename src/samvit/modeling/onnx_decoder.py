"""DecoderOnnxModel: the prompt encoder + mask decoder with the official SAM ONNX decoder's interface
(segment_anything/utils/onnx.py's SamOnnxModel), written in ops that export with a dynamic number of points."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .sam import SamDecoder


class DecoderOnnxModel(nn.Module):
    """Prompt encoder + mask decoder + mask resizing with the official SamOnnxModel's inputs, outputs and arithmetic.

    point_coords (1,N,2) are in the model's input frame (the long side resized to 1024, as the official
    ResizeLongestSide.apply_coords gives), point_labels (1,N) float: 1 / 0 foreground / background point, 2 / 3 box
    corners, -1 padding (add one padding point when there is no box); mask_input (1,1,256,256) low-res logits used
    when has_mask_input (1,) is 1; orig_im_size (2,) float (H, W). Outputs: masks (1,M,H,W) logits at the original
    size, iou_predictions (1,M), low_res_masks (1,M,256,256); M = 4 (the single-mask output first, then the three
    multimask outputs), or 1 with return_single_mask (the official choice: mask 0 for more than one point, else the
    best of 1..3).
    """

    def __init__(self, decoder: SamDecoder, return_single_mask: bool = False) -> None:
        super().__init__()
        self.decoder = decoder
        self.img_size = decoder.config.input_image_size
        self.return_single_mask = return_single_mask

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.decoder.prompt_encoder
        emb = pe.pe_layer._pe_encoding((coords + 0.5) / self.img_size)
        labels = labels.unsqueeze(-1).expand_as(emb)
        emb = emb * (labels != -1) + pe.not_a_point_embed.weight * (labels == -1)
        for i, point_embed in enumerate(pe.point_embeddings):
            emb = emb + point_embed.weight * (labels == i)
        return emb

    def _embed_masks(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        pe = self.decoder.prompt_encoder
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return has_mask_input * pe.mask_downscaling(mask_input) + (1 - has_mask_input) * no_mask

    def _postprocess(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """Upsample to the input frame, crop the padding, resize to orig_im_size (sizes read from the tensor)."""
        s = self.img_size
        masks = F.interpolate(masks, (s, s), mode="bilinear", align_corners=False)  # x4: exact in any runtime
        size = orig_im_size.to(torch.float32)
        pre = torch.floor(size * (s / size.max()) + 0.5).to(torch.int64)
        ph, pw = pre[0].item(), pre[1].item()
        torch._check(ph >= 1)
        torch._check(ph <= s)
        torch._check(pw >= 1)
        torch._check(pw <= s)
        hw = size.to(torch.int64)
        h, w = hw[0].item(), hw[1].item()
        torch._check(h >= 1)
        torch._check(w >= 1)
        masks = masks[..., :ph, :pw]
        return _resize_bilinear(_resize_bilinear(masks, w, -1), h, -2)

    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                mask_input: torch.Tensor, has_mask_input: torch.Tensor, orig_im_size: torch.Tensor):
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_masks(mask_input, has_mask_input)
        masks, scores = self.decoder.mask_decoder.predict_masks(image_embeddings, self.decoder.prompt_encoder
                                                                .get_dense_pe(), sparse, dense)
        if self.return_single_mask:  # official select_masks: no control flow, mask 0 outweighs for > 2.5 points
            weight = torch.zeros_like(scores[:1])
            weight[:, 0] = 1000.0
            best = torch.argmax(scores + (point_coords.shape[1] - 2.5) * weight, dim=1)
            rows = torch.arange(masks.shape[0])
            masks, scores = masks[rows, best][:, None], scores[rows, best][:, None]
        return self._postprocess(masks, orig_im_size), scores, masks


def _resize_bilinear(x: torch.Tensor, size, dim: int) -> torch.Tensor:
    """F.interpolate(mode="bilinear", align_corners=False) along one axis, with PyTorch's own source coordinates.

    onnxruntime's Resize maps output pixels with (x + 0.5) / (out / in) - 0.5, PyTorch with (x + 0.5) * (in / out)
    - 0.5; in float32 the two differ by an ulp, which moves large logits by more than 1e-4 at the original size.
    Written out in plain ops, the exported graph computes PyTorch's coordinates and weights.
    """
    n_in = x.shape[dim]
    scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(size, dtype=torch.float32)
    src = ((torch.arange(size, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.to(torch.int64).clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = (src - i0.to(torch.float32)).clamp(0, 1)
    shape = [1] * x.ndim
    shape[dim] = -1
    w1 = w1.reshape(shape)
    return x.index_select(dim, i0) * (1 - w1) + x.index_select(dim, i1) * w1
