"""Official segment-anything models with random weights, and the tiny encoder config the tests share."""
from __future__ import annotations

from functools import partial

import torch

from samvit import EncoderConfig
from samvit.bench.weights import randomize_

TINY = EncoderConfig(img_size=256, embed_dim=64, depth=3, num_heads=2, window_size=4, global_attn_indexes=(1,),
                     out_chans=32, name="tiny")


def official_sam(model_type: str = "vit_b", seed: int = 0):
    """The official segment-anything Sam of a released type, every parameter randomised, in eval mode."""
    from segment_anything import sam_model_registry

    torch.manual_seed(seed)
    sam = sam_model_registry[model_type]()
    return randomize_(sam, seed).eval()


def official_tiny_sam(cfg: EncoderConfig = TINY, seed: int = 0):
    """An official Sam whose image encoder has the given (small) config, every parameter randomised."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    enc = ImageEncoderViT(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                          num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, out_chans=cfg.out_chans,
                          qkv_bias=cfg.qkv_bias, norm_layer=partial(torch.nn.LayerNorm, eps=cfg.norm_eps),
                          use_abs_pos=cfg.use_abs_pos, use_rel_pos=cfg.use_rel_pos, window_size=cfg.window_size,
                          global_attn_indexes=cfg.global_attn_indexes)
    grid = cfg.grid_size
    sam = Sam(image_encoder=enc,
              prompt_encoder=PromptEncoder(embed_dim=cfg.out_chans, image_embedding_size=(grid, grid),
                                           input_image_size=(cfg.img_size, cfg.img_size), mask_in_chans=16),
              mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                       transformer=TwoWayTransformer(depth=2, embedding_dim=cfg.out_chans,
                                                                     mlp_dim=64, num_heads=2),
                                       transformer_dim=cfg.out_chans, iou_head_depth=3, iou_head_hidden_dim=64))
    torch.manual_seed(seed)
    return randomize_(sam, seed).eval()
