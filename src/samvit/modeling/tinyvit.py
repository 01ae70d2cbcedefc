"""TinyViT, MobileSAM's image encoder (Wu et al. 2022; Zhang et al. 2023): a conv stem and an MBConv stage, then
windowed-attention stages with a learned relative bias, the last one at stride 16, and SAM's neck. It gives the
same (B,256,64,64) embedding at 1024 input as the ViT encoder, for SAM's own prompt encoder and mask decoder.

Parameter names match the `image_encoder.` keys of MobileSAM's `mobile_sam.pt` and segment-anything-hq's
`vit_tiny` (the classifier head those files also carry is not part of the encoder: see checkpoints.load).
The arithmetic is the official one, with the token grid taken from the input (the official code fixes it to 64x64).
"""
from __future__ import annotations

import functools
import itertools
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import TinyViTConfig
from ..errors import ParameterError
from .common import LayerNorm2d
from .encoder import check_float16, check_input


class Conv2dBN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d (keys `c.*`, `bn.*`)."""

    def __init__(self, cin: int, cout: int, ks: int = 1, stride: int = 1, pad: int = 0, groups: int = 1,
                 bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, ks, stride, pad, groups=groups, bias=False))
        bn = nn.BatchNorm2d(cout)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.zeros_(bn.bias)
        self.add_module("bn", bn)


class PatchEmbed(nn.Module):
    """Image (B,3,H,W) -> (B,C,H/4,W/4): two stride-2 3x3 convs with GELU between."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(Conv2dBN(in_chans, dim // 2, 3, 2, 1), nn.GELU(), Conv2dBN(dim // 2, dim, 3, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU; (B,C,H,W) in and out."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, ks=3, stride=1, pad=1, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim, bn_weight_init=0.0)
        self.drop_path = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))
        return F.gelu(x + _drop(y, self.drop_path, self.training))


class PatchMerging(nn.Module):
    """(B,C,H,W) -> (B,C',H/s,W/s): 1x1 conv, 3x3 depthwise conv of stride s, 1x1 conv, GELU between."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


@functools.lru_cache(maxsize=None)
def bias_index(window: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """(N,N) index of each query/key pair's offset (|dy|,|dx|) in a window of N = window**2 tokens, offsets
    numbered in order of first appearance (the official order: attention_biases' columns). Cached per device (not
    a buffer: a model built on the meta device and loaded with assign=True would keep a meta one); made outside
    inference mode, so that a first call under inference_mode does not cache a tensor training cannot use."""
    with torch.inference_mode(False):
        if device.type != "cpu":
            return bias_index(window).to(device)
        points = list(itertools.product(range(window), range(window)))
        offsets: dict = {}
        idx = [offsets.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(offsets)) for a in points for b in points]
        return torch.tensor(idx, dtype=torch.long).view(len(points), len(points))


class Attention(nn.Module):
    """Multi-head attention over (B*windows, N, C) tokens, LayerNorm first, plus a learned bias per head and
    relative offset (attention_biases: (heads, window**2))."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads, self.key_dim = num_heads, dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, N, self.num_heads, 3, self.key_dim).permute(3, 0, 2, 1, 4)
        bias = self.attention_biases[:, bias_index(self.window, x.device)].to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.key_dim ** -0.5)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """LayerNorm, Linear, GELU, Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention (the raw tokens zero-padded to whole windows, as the official), a 3x3 depthwise conv,
    an MLP; (B,H,W,C) in and out."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float, local_conv_size: int) -> None:
        super().__init__()
        self.window = window
        self.attn = Attention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, ks=local_conv_size, pad=local_conv_size // 2, groups=dim)
        self.drop_path = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        ws = self.window
        pad_b, pad_r = (ws - H % ws) % ws, (ws - W % ws) % ws
        y = F.pad(x, (0, 0, 0, pad_r, 0, pad_b)) if pad_b or pad_r else x
        nh, nw = (H + pad_b) // ws, (W + pad_r) // ws
        y = y.view(B, nh, ws, nw, ws, C).transpose(2, 3).reshape(B * nh * nw, ws * ws, C)
        y = self.attn(y).view(B, nh, nw, ws, ws, C).transpose(2, 3).reshape(B, nh * ws, nw * ws, C)
        x = x + _drop(y[:, :H, :W], self.drop_path, self.training)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + _drop(self.mlp(x), self.drop_path, self.training)


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks, then a patch merging to the next stage's width."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: Optional[PatchMerging]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample


class BasicLayer(nn.Module):
    """Stages 1..: TinyViT blocks, then (all but the last stage) a patch merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float, local_conv_size: int,
                 downsample: Optional[PatchMerging]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TinyViTBlock(dim, num_heads, window, mlp_ratio, local_conv_size)
                                    for _ in range(depth))
        self.downsample = downsample


def _drop(y: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Drop path (stochastic depth) of a residual branch in training; the identity otherwise."""
    if not training or rate == 0.0:
        return y
    keep = 1.0 - rate
    return y * y.new_empty((y.shape[0],) + (1,) * (y.ndim - 1)).bernoulli_(keep) / keep


class TinyViT(nn.Module):
    """MobileSAM's TinyViT image encoder with SAM's neck; keys match the official `image_encoder.` keys."""

    def __init__(self, config: TinyViTConfig) -> None:
        super().__init__()
        self.config = cfg = config
        dims, n = cfg.embed_dims, len(cfg.embed_dims)
        self.patch_embed = PatchEmbed(cfg.in_chans, dims[0])
        self.layers = nn.ModuleList()
        for i in range(n):
            # the last merging keeps the resolution (stride 16 overall), as the official for every released size
            down = PatchMerging(dims[i], dims[i + 1], 1 if i == n - 2 else 2) if i < n - 1 else None
            if i == 0:
                self.layers.append(ConvLayer(dims[0], cfg.depths[0], cfg.mbconv_expand_ratio, down))
            else:
                self.layers.append(BasicLayer(dims[i], cfg.depths[i], cfg.num_heads[i], cfg.window_sizes[i],
                                              cfg.mlp_ratio, cfg.local_conv_size, down))
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], cfg.out_chans, kernel_size=1, bias=False), LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, kernel_size=3, padding=1, bias=False), LayerNorm2d(cfg.out_chans))
        self.grad_checkpointing = False
        self.kernel = "reference"  # one arithmetic (the official): the ViT's attention kernels do not apply
        for m in self.modules():  # the official initialisation (TinyViT._init_weights)
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised padded images (B,3,S,S) -> embedding (B,256,S/16,S/16); float32 for bfloat16 weights."""
        return self.forward_intermediates(x, stages=())[0]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised padded images (B,3,S,S) -> pre-neck features (B,S/16,S/16,C) (float32 for low precision)."""
        return self._stages(x, ())[0].to(_out_dtype(self.dtype))

    def forward_intermediates(self, x: torch.Tensor, stages: Optional[Sequence[int]] = (1,)
                              ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(output as forward gives it, [(B,h,w,C) output of each listed stage, after its patch merging]).

        The default, stage 1 (B,S/16,S/16,160 for TinyViT-5M), is the early feature HQ-SAM's decoder fuses
        (`interm_embeddings` of the official code). None: every stage.
        """
        n = len(self.layers)
        take = range(n) if stages is None else stages
        bad = [s for s in take if not 0 <= int(s) < n]
        if bad:
            raise ParameterError(f"stage {bad[0]} is outside the {n} stages of model {self.config.name!r}")
        x, inter = self._stages(x, {int(s) for s in take})
        x = self.neck(x.permute(0, 3, 1, 2))
        return x.to(_out_dtype(self.dtype)), [t.to(_out_dtype(self.dtype)) for t in inter]

    def _stages(self, x: torch.Tensor, take) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The final stage's (B,h,w,C) tokens and those of the stages in `take`."""
        cfg, dtype = self.config, self.dtype
        check_input(x, cfg)
        if dtype == torch.float16:
            check_float16(cfg, x.device)
        x = self.patch_embed(x.to(dtype))  # (B,C,h,w) between stages
        inter = []
        for i, layer in enumerate(self.layers):
            if i > 0:
                x = x.permute(0, 2, 3, 1)  # the attention stages run on (B,h,w,C) tokens
            for blk in layer.blocks:
                x = checkpoint(blk, x, use_reentrant=False) if self.grad_checkpointing and torch.is_grad_enabled() \
                    else blk(x)
            if i > 0:
                x = x.permute(0, 3, 1, 2)
            if layer.downsample is not None:
                x = layer.downsample(x)
            if i in take:
                inter.append(x.permute(0, 2, 3, 1))
        return x.permute(0, 2, 3, 1), inter

    def set_grad_checkpointing(self, enable: bool = True) -> "TinyViT":
        """Recompute each block's activations in the backward pass instead of keeping them (when grad is enabled)."""
        self.grad_checkpointing = enable
        return self

    def block_list(self) -> List[nn.Module]:
        """Every block in order over the stages, MBConv and TinyViT blocks (drop path, FSDP units, lr decay)."""
        return [b for layer in self.layers for b in layer.blocks]

    def attention_blocks(self) -> List[nn.Module]:
        """The blocks with attention and an MLP (where LoRA adapters go): the TinyViT blocks of stages 1-3."""
        return [b for b in self.block_list() if isinstance(b, TinyViTBlock)]

    def layer_id(self, name: str) -> int:
        """Depth of the parameter `name` (relative to the encoder) for layer-wise lr decay: 0 the patch embedding,
        i + 1 block i over all stages, a stage's downsampling that of its last block (as the official
        set_layer_lr_decay), depth + 1 the neck."""
        parts = name.split(".")
        if parts[0] == "patch_embed":
            return 0
        if parts[0] == "layers":
            stage = int(parts[1])
            before = sum(len(layer.blocks) for layer in self.layers[:stage])
            if parts[2] == "blocks":
                return before + int(parts[3]) + 1
            return before + len(self.layers[stage].blocks)
        return len(self.block_list()) + 1

    def set_drop_path(self, rate: float) -> "TinyViT":
        """Stochastic depth for training: rate * i / (blocks - 1) for block i over all stages (official rule)."""
        if not 0.0 <= rate < 1.0:
            raise ParameterError(f"drop path rate must be in [0, 1), got {rate}")
        blocks = self.block_list()
        for i, b in enumerate(blocks):
            b.drop_path = rate * i / (len(blocks) - 1) if len(blocks) > 1 else rate
        return self

    def set_kernel(self, name: str) -> "TinyViT":
        """TinyViT has one attention arithmetic (windows of at most 14x14 with a learned bias, by
        scaled_dot_product_attention): every kernel name of the ViT encoder is accepted and changes nothing."""
        from .kernels import resolve_kernel_name

        resolve_kernel_name(name)  # an unknown name is still an error
        return self

    def workspace(self) -> None:
        """No scratch buffers: TinyViT has no in-place inference path (the ViT encoder's API)."""
        return None

    def release_workspace(self) -> int:
        """Nothing to free (the ViT encoder's API); returns 0."""
        return 0

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the convs and matmuls (and of the input they take)."""
        return self.patch_embed.seq[0].c.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embed.seq[0].c.weight.device

    def num_parameters(self, include_pos_embed: bool = True) -> int:
        """Parameter count (TinyViT has no position embedding: include_pos_embed changes nothing)."""
        return sum(p.numel() for p in self.parameters())


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
