"""MAE ViT -> SAM image encoder, as SAM itself was built (a ViTDet-style backbone from an MAE-pre-trained ViT).

Copied: the patch embedding and every block (norms, qkv, proj, MLP). Resized: the position embedding, without its
class-token entry, from the MAE grid (14x14 at 224/16) to the encoder's (64x64 at 1024/16), bicubically as ViTDet
does. Dropped: the class token, MAE's final LayerNorm and the decoder. Fresh: the relative-position tables (zero,
trainable) and the neck (PyTorch's default init). Windowed and global blocks follow the preset.
"""
from __future__ import annotations

import os
from typing import Dict, Union

import torch

from ..config import EncoderConfig, preset
from ..modeling.encoder import ImageEncoder, resize_pos_embed
from ..modeling.mae import MaskedAutoencoder
from ..checkpoints.files import CheckpointError
from .mae_weights import read_mae_file, to_mae_state
from ..errors import ParameterError

StateDict = Dict[str, torch.Tensor]
MAESource = Union[MaskedAutoencoder, StateDict, str, os.PathLike]
_BLOCK_PARTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.lin1", "mlp.lin2")


def _mae_encoder_state(src: MAESource) -> StateDict:
    if isinstance(src, MaskedAutoencoder):
        return src.state_dict()
    return to_mae_state(src if isinstance(src, dict) else read_mae_file(src))[0]


def mae_to_sam_encoder(src: MAESource, encoder: Union[str, EncoderConfig] = "vit_b") -> ImageEncoder:
    """A SAM ImageEncoder (a preset name: vit_b, vit_l, vit_h, vit_h_spec, or an EncoderConfig) whose patch
    embedding, blocks and position embedding come from an MAE model (a MaskedAutoencoder, or an official,
    transformers or samvit MAE state dict or file). Width, depth, patch size and MLP size must match."""
    cfg = preset(encoder) if isinstance(encoder, str) else encoder
    sd = _mae_encoder_state(src)
    where = f"MAE model {src.config.name!r}" if isinstance(src, MaskedAutoencoder) else "MAE checkpoint"
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        raise CheckpointError(f"{where}: no patch_embed.proj.weight / pos_embed tensor: not an MAE encoder")
    dim, in_chans, patch, _ = sd["patch_embed.proj.weight"].shape
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    hidden = sd["blocks.0.mlp.lin1.weight"].shape[0] if depth else None
    mae_heads = src.config.num_heads if isinstance(src, MaskedAutoencoder) else cfg.num_heads
    problems = [f"{what}: MAE {a} vs encoder {b}" for what, a, b in (
        ("width", dim, cfg.embed_dim), ("depth", depth, cfg.depth), ("patch size", patch, cfg.patch_size),
        ("input channels", in_chans, cfg.in_chans), ("MLP hidden size", hidden, int(cfg.embed_dim * cfg.mlp_ratio)),
        ("heads", mae_heads, cfg.num_heads)) if a != b]
    if not cfg.qkv_bias:
        problems.append("qkv bias: MAE has one, the encoder config has qkv_bias=False")
    if problems:
        raise ParameterError(f"{where} does not fit encoder {cfg.name!r}: " + "; ".join(problems))

    with torch.random.fork_rng(devices=[]):  # the new parts (the neck) initialised the same way every time
        torch.manual_seed(0)
        model = ImageEncoder(cfg)
    with torch.no_grad():
        model.patch_embed.proj.weight.copy_(sd["patch_embed.proj.weight"])
        model.patch_embed.proj.bias.copy_(sd["patch_embed.proj.bias"])
        for i, blk in enumerate(model.blocks):
            for part in _BLOCK_PARTS:
                module = blk.get_submodule(part)
                module.weight.copy_(sd[f"blocks.{i}.{part}.weight"])
                module.bias.copy_(sd[f"blocks.{i}.{part}.bias"])
        if model.pos_embed is not None:
            pos = sd["pos_embed"][:, 1:, :]  # the class token's entry is dropped with the token
            grid = int(round(pos.shape[1] ** 0.5))
            pos = pos.reshape(1, grid, grid, dim).float()
            model.pos_embed.copy_(resize_pos_embed(pos, (cfg.grid_size, cfg.grid_size), antialias=False))
    return model
