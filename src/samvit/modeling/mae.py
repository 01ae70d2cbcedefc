"""The masked autoencoder (He et al. 2022) that pre-trains the ViT: the arithmetic of the official
facebookresearch/mae models_mae.py, on samvit's Block and Attention.

Parameter names follow the official model (cls_token, pos_embed, patch_embed.proj, blocks.N.attn.qkv, norm,
decoder_embed, mask_token, decoder_pos_embed, decoder_blocks.N, decoder_norm, decoder_pred), except samvit's
MLP (blocks.N.mlp.lin1/lin2 for the official mlp.fc1/fc2); samvit.train.mae_weights maps checkpoints in.
"""
from __future__ import annotations

from typing import Optional, Set, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import EncoderConfig, MAEConfig
from .encoder import Block, PatchEmbed
from ..errors import ParameterError


def sincos_pos_embed(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (1, [1 +] grid*grid, dim), float32, as MAE's util/pos_embed.py
    computes it (in float64): the first half of the channels encodes the column, the second the row; the class
    token's entry is zero."""
    omega = torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0)
    omega = 1.0 / 10000 ** omega
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None, :]
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([embed_1d(cols), embed_1d(rows)], dim=1)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, dim), emb], dim=0)
    return emb.float()[None]


def _blocks_config(cfg: MAEConfig, dim: int, depth: int, heads: int) -> EncoderConfig:
    """The EncoderConfig that samvit's Block reads: global attention, no relative position."""
    return EncoderConfig(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=dim,
                         depth=depth, num_heads=heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, use_abs_pos=False,
                         use_rel_pos=False, window_size=0, global_attn_indexes=(), out_chans=None,
                         norm_eps=cfg.norm_eps)


class MaskedAutoencoder(nn.Module):
    """MAE: patchify, mask a random subset per sample, encode the visible tokens, decode all, predict pixels."""

    def __init__(self, config: MAEConfig, target_dim: Optional[int] = None) -> None:
        """target_dim: the decoder predicts a target_dim feature per patch (SAMI: a teacher's features) instead of
        its pixels; forward then takes the target."""
        super().__init__()
        self.config = cfg = config
        self.target_dim = target_dim
        L = cfg.num_patches
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, cfg.embed_dim), requires_grad=False)  # fixed
        enc = _blocks_config(cfg, cfg.embed_dim, cfg.depth, cfg.num_heads)
        self.blocks = nn.ModuleList(Block(enc, 0) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)

        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, cfg.decoder_embed_dim), requires_grad=False)
        dec = _blocks_config(cfg, cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads)
        self.decoder_blocks = nn.ModuleList(Block(dec, 0) for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(cfg.decoder_embed_dim, eps=cfg.norm_eps)
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, target_dim or cfg.patch_size ** 2 * cfg.in_chans)
        self.grad_checkpointing = False
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The MAE init: sine-cosine positions, patch embedding as a linear (xavier on the flattened weight; the
        conv bias keeps PyTorch's default), normal(0.02) tokens, xavier-uniform linears with zero bias, LayerNorm
        weight 1 and bias 0."""
        self.pos_embed.copy_(sincos_pos_embed(self.config.embed_dim, self.config.grid_size))
        self.decoder_pos_embed.copy_(sincos_pos_embed(self.config.decoder_embed_dim, self.config.grid_size))
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> "MaskedAutoencoder":
        """Recompute each block's activations in the backward pass (non-reentrant torch.utils.checkpoint)."""
        self.grad_checkpointing = enable
        return self

    def no_weight_decay(self) -> Set[str]:
        """Parameters without weight decay besides norms and biases: the position embeddings and the tokens."""
        return {"pos_embed", "decoder_pos_embed", "cls_token", "mask_token"}

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B,C,H,W) -> (B, L, p*p*C), each patch's pixels in (row, column, channel) order."""
        p = self.config.patch_size
        B, C, H, W = imgs.shape
        x = imgs.reshape(B, C, H // p, p, W // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B,C,H,W) for a square grid."""
        p, C = self.config.patch_size, self.config.in_chans
        h = int(round(x.shape[1] ** 0.5))
        if h * h != x.shape[1] or x.shape[2] != p * p * C:
            raise ParameterError(f"unpatchify: expected (B, h*h, {p * p * C}), got {tuple(x.shape)}")
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, h, p, p, C))
        return x.reshape(x.shape[0], C, h * p, h * p)

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep int(L * (1 - mask_ratio)) tokens per sample: those with the smallest noise (uniform if not given).
        Returns the kept tokens (B, keep, D), the mask (B, L; 1 = masked) and ids_restore (B, L)."""
        B, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(B, L, device=x.device)
        elif noise.shape != (B, L):
            raise ParameterError(f"noise: expected shape {(B, L)} (batch, patches), got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise.to(x.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones(B, L, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images -> (latent (B, 1 + keep, D) with the class token first, mask (B, L), ids_restore (B, L))."""
        x = self.patch_embed(imgs).flatten(1, 2)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self._run(self.blocks, x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Latent (B, 1 + keep, D) -> predicted patch pixels (B, L, p*p*C), mask tokens in the masked places."""
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        x = self._run(self.decoder_blocks, x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only; targets normalised per patch with norm_pix_loss."""
        target = self.patchify(imgs)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: Optional[float] = None, noise: Optional[torch.Tensor] = None,
                target: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images (B,C,S,S) -> (loss, pred (B, L, p*p*C), mask (B, L); 1 = masked). mask_ratio defaults to the
        config's; noise (B, L) fixes the masking (the tokens with the smallest noise are kept). With target_dim,
        target (B, L, target_dim) is what the masked patches' predictions are compared with (mean squared error)."""
        if (target is None) != (self.target_dim is None):
            raise ParameterError("MAE target: give target (B, L, target_dim) exactly when the model was built with "
                                 f"target_dim (it was built with {self.target_dim})")
        cfg = self.config
        if imgs.ndim != 4 or tuple(imgs.shape[1:]) != (cfg.in_chans, cfg.img_size, cfg.img_size) \
                or not imgs.is_floating_point():
            raise ParameterError("MAE input: expected a float tensor "
                                 f"(B,{cfg.in_chans},{cfg.img_size},{cfg.img_size}), "
                                 f"got {imgs.dtype} of shape {tuple(imgs.shape)}")
        mask_ratio = cfg.mask_ratio if mask_ratio is None else mask_ratio
        if not 0.0 <= mask_ratio < 1.0:
            raise ParameterError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        if target is None:
            return self.forward_loss(imgs, pred, mask), pred, mask
        if target.shape != pred.shape:
            raise ParameterError(f"MAE target: expected shape {tuple(pred.shape)}, got {tuple(target.shape)}")
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum(), pred, mask
