"""Shared pieces of the fine-tuning tests: a tiny SAM (random weights, real file formats) and its official twin.

The training tests use a 128-pixel input (an 8x8 token grid, 32x32 low-res masks): the same code as 1024 at a
cost CPU tests can afford. The decoder is 64 wide with 8 heads, as the heads are not stored in a checkpoint and
every released SAM (and samvit's loader) uses 8.
"""
from __future__ import annotations

import os
from functools import partial

import torch

from samvit.config import DecoderConfig, EncoderConfig
from samvit.modeling.encoder import ImageEncoder
from samvit.modeling.sam import SamDecoder
from samvit.modeling.sam import Sam

SMALL = EncoderConfig(img_size=128, embed_dim=64, depth=2, num_heads=2, window_size=4, global_attn_indexes=(1,),
                      out_chans=64, name="tiny_ft")
SMALL_DECODER = DecoderConfig(embed_dim=64, image_embedding_size=8, input_image_size=128, mlp_dim=128,
                              iou_head_hidden_dim=64)


def tiny_sam(seed: int = 0, decoder: DecoderConfig = SMALL_DECODER) -> Sam:
    """A freshly initialised tiny Sam (PyTorch's default init, as segment-anything's modules), with a random
    absolute position embedding standing in for a pre-trained one (zeros would leave the tokens unplaced)."""
    torch.manual_seed(seed)
    sam = Sam(ImageEncoder(SMALL), SamDecoder(decoder))
    with torch.no_grad():
        sam.image_encoder.pos_embed.normal_(0, 0.1)
    return sam


def write_tiny_checkpoint(path, seed: int = 0) -> str:
    """The tiny Sam as an official-layout .pth (no config inside: load it with model=SMALL) or, for a
    .safetensors path, with its encoder config in the metadata (loads without model=)."""
    from samvit.checkpoints.files import CONFIG_METADATA_KEY, write_tensors

    sam = tiny_sam(seed)
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        write_tensors(path, sam.state_dict(), {CONFIG_METADATA_KEY: SMALL.to_json(), "format": "samvit"})
    else:
        torch.save(sam.state_dict(), path)
    return path


def official_small_sam(decoder: DecoderConfig = SMALL_DECODER):
    """segment-anything's Sam with the SMALL architecture (weights to be loaded)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam as OfficialSam, \
        TwoWayTransformer

    c, d = SMALL, decoder
    enc = ImageEncoderViT(img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth,
                          num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, out_chans=c.out_chans, qkv_bias=c.qkv_bias,
                          norm_layer=partial(torch.nn.LayerNorm, eps=c.norm_eps), use_abs_pos=c.use_abs_pos,
                          use_rel_pos=c.use_rel_pos, window_size=c.window_size,
                          global_attn_indexes=c.global_attn_indexes)
    g = c.grid_size
    return OfficialSam(image_encoder=enc,
                       prompt_encoder=PromptEncoder(embed_dim=d.embed_dim, image_embedding_size=(g, g),
                                                    input_image_size=(c.img_size, c.img_size), mask_in_chans=16),
                       mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=d.embed_dim,
                                                transformer=TwoWayTransformer(depth=d.depth,
                                                                              embedding_dim=d.embed_dim,
                                                                              mlp_dim=d.mlp_dim,
                                                                              num_heads=d.num_heads),
                                                iou_head_depth=3, iou_head_hidden_dim=d.iou_head_hidden_dim)).eval()
