"""The SAM ViT image encoder: patch embedding, absolute position embedding, pre-norm blocks, neck.

The attention kernel is chosen in one place (ImageEncoder(kernel=...) / set_kernel; see attention.KERNELS).
Training hooks in the manner of timm: set_grad_checkpointing, forward_intermediates.
"""
from __future__ import annotations

import threading
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import EncoderConfig
from .attention import (DEFAULT_KERNEL, KERNEL_ALIASES, Attention, get_kernel, resize_rel_pos, window_partition,
                        window_unpartition)
from .common import LayerNorm2d, MLPBlock
from .workspace import Workspace
from ..errors import ParameterError


def _layer_norm(x: torch.Tensor, norm: nn.LayerNorm, dtype: torch.dtype) -> torch.Tensor:
    """LayerNorm over the last axis computed in x's dtype (float32 for a low-precision model's residual stream),
    returned in `dtype`, the dtype of the matmuls that follow."""
    if x.dtype == norm.weight.dtype == dtype:
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return F.layer_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps).to(dtype)


class PatchEmbed(nn.Module):
    """Image (B,3,H,W) -> patch tokens (B,H/16,W/16,C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Block(nn.Module):
    """Pre-norm transformer block; windowed attention when window_size > 0, else global."""

    def __init__(self, cfg: EncoderConfig, window_size: int) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        attn_size = (window_size, window_size) if window_size > 0 else (cfg.grid_size, cfg.grid_size)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias, cfg.use_rel_pos, attn_size)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = MLPBlock(dim, int(dim * cfg.mlp_ratio))
        self.window_size = window_size
        self.drop_path = 0.0  # stochastic depth of both branches in training (ImageEncoder.set_drop_path)

    def forward(self, x: torch.Tensor, workspace: Optional[Workspace] = None) -> torch.Tensor:
        """x: the residual stream (B,H,W,C); the official arithmetic when the kernel asks for it. With a workspace
        (inference only) x is updated in place and returned."""
        if self.attn.kernel.official:
            return self.forward_reference(x)
        if workspace is not None:
            return self.forward_inplace(x, workspace)
        return self.forward_fast(x)

    def forward_inplace(self, x: torch.Tensor, workspace: Workspace) -> torch.Tensor:
        """forward_fast's arithmetic adding into the residual stream x in place, with every large intermediate in
        workspace buffers: nothing big is allocated (inference only)."""
        dtype = self.attn.qkv.weight.dtype
        self.attn.forward_into(_layer_norm(x, self.norm1, dtype), x, self.window_size, workspace)
        C = x.shape[-1]
        self.mlp.forward_into(_layer_norm(x, self.norm2, dtype).view(-1, C), x.view(-1, C), workspace)
        return x

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """x: the residual stream (float32 when the weights are bfloat16/float16); windows without padded qkv/proj."""
        dtype = self.attn.qkv.weight.dtype
        y = _layer_norm(x, self.norm1, dtype)
        y = self.attn.forward_windowed(y, self.window_size) if self.window_size > 0 else self.attn(y)
        x = x + self._drop(y)
        return x + self._drop(self.mlp(_layer_norm(x, self.norm2, dtype)))

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The official block arithmetic: pad, partition, attention on every window token, unpartition."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(x), self.window_size, pad_hw, (H, W))
        else:
            x = self.attn(x)
        x = shortcut + self._drop(x)
        return x + self._drop(self.mlp(self.norm2(x)))

    def _drop(self, y: torch.Tensor) -> torch.Tensor:
        """Drop path (stochastic depth, as timm): in training, each sample's branch is zeroed with probability
        drop_path and the others scaled by 1 / (1 - drop_path); the identity otherwise."""
        if not self.training or self.drop_path == 0.0:
            return y
        keep = 1.0 - self.drop_path
        mask = y.new_empty((y.shape[0],) + (1,) * (y.ndim - 1)).bernoulli_(keep)
        return y * mask / keep

    def forward_seq(self, x: torch.Tensor) -> torch.Tensor:
        """The block on a token sequence (B,N,C) with global attention (the MAE ViT)."""
        x = x + self.attn.forward_seq(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """This block's attention probabilities for the residual stream x (B,H,W,C), by the reference arithmetic:
        (B * windows, heads, N, N), N = window_size**2 (zero-padded windows, as the official) or H*W."""
        y = _layer_norm(x, self.norm1, self.attn.qkv.weight.dtype)
        if self.window_size > 0:
            y = window_partition(y, self.window_size)[0]
        return self.attn.attention_probs(y)


def build_neck(embed_dim: int, out_chans: int, eps: float) -> nn.Sequential:
    """1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d (no conv bias): C -> out_chans."""
    return nn.Sequential(
        nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
        LayerNorm2d(out_chans, eps),
        nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(out_chans, eps),
    )


def resize_pos_embed(pos_embed: torch.Tensor, hw: Tuple[int, int], antialias: bool = True) -> torch.Tensor:
    """(1,h,w,C) absolute position table resized to (1,H,W,C) for other input sizes: bicubic in float32, with
    antialiasing as timm's resample_abs_pos_embed_nhwc (timm's ViT-SAM runs other input sizes this way); without
    it, plain bicubic as ViTDet's MAE-to-detector transfer."""
    if tuple(pos_embed.shape[1:3]) == tuple(hw):
        return pos_embed
    p = F.interpolate(pos_embed.permute(0, 3, 1, 2).float(), size=tuple(hw), mode="bicubic", antialias=antialias)
    return p.permute(0, 2, 3, 1).to(pos_embed.dtype)


def fit_position_tables(sd: Dict[str, torch.Tensor], cfg: EncoderConfig) -> Dict[str, torch.Tensor]:
    """An encoder state dict with its position embedding and its global blocks' relative-position tables resized
    to cfg.img_size (the same arithmetic as running the original tables on that input size); other tensors as is."""
    out = dict(sd)
    g = cfg.grid_size
    if cfg.use_abs_pos and "pos_embed" in out:
        out["pos_embed"] = resize_pos_embed(out["pos_embed"], (g, g))
    if cfg.use_rel_pos:
        for i in range(cfg.depth):
            if cfg.block_window_size(i) == 0:
                for axis in ("h", "w"):
                    key = f"blocks.{i}.attn.rel_pos_{axis}"
                    if key in out:
                        out[key] = resize_rel_pos(out[key], 2 * g - 1).contiguous()
    return out


def _layer_norm_2d(x: torch.Tensor, norm: LayerNorm2d, out_dtype: torch.dtype) -> torch.Tensor:
    """LayerNorm2d as one F.layer_norm over the channels of channels-last memory, in float32 for low precision."""
    y = x.permute(0, 2, 3, 1)
    y = y.float() if x.dtype in (torch.bfloat16, torch.float16) else y
    y = F.layer_norm(y, (y.shape[-1],), norm.weight.to(y.dtype), norm.bias.to(y.dtype), norm.eps)
    return y.to(out_dtype).permute(0, 3, 1, 2)


def _residual_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _check_input(x: torch.Tensor, cfg: EncoderConfig) -> None:
    if x.ndim != 4 or x.shape[1] != cfg.in_chans or not x.is_floating_point():
        raise ParameterError(f"encoder input: expected a float tensor (B,{cfg.in_chans},H,W), "
                             f"got {x.dtype} of shape {tuple(x.shape)}")
    if x.shape[2] % cfg.patch_size or x.shape[3] % cfg.patch_size:
        raise ParameterError(f"encoder input: height and width must be multiples of the patch size {cfg.patch_size}, "
                             f"got {tuple(x.shape[2:])}")


def check_float16(cfg: EncoderConfig, device: torch.device) -> None:
    """float16 only where it is safe: refused on CPU (no faster there, and not shown safe) and for ViT-H-sized
    models, whose activations overflow float16 (segment-anything issue 540). bfloat16 is the fast dtype."""
    if device.type == "cpu":
        raise ParameterError("float16 is not supported on CPU (no faster than float32 there, and not shown to be "
                             "accurate); use bfloat16 or float32")
    if cfg.embed_dim >= 1280:
        raise ParameterError(f"float16 is refused for model {cfg.name!r} (width {cfg.embed_dim}): ViT-H activations "
                             "overflow float16 (segment-anything issue 540); use bfloat16")


class ImageEncoder(nn.Module):
    """The SAM ViT image encoder; parameter names match the official `image_encoder.` keys."""

    def __init__(self, config: EncoderConfig, kernel: str = DEFAULT_KERNEL, compile: bool = False,
                 attn_impl: Optional[str] = None) -> None:
        """Args:
            config: the architecture.
            kernel: the attention kernel ("auto", "sdpa_chunked", "matmul_blocked", "reference", or any
                registered; "fast" = auto).
            compile: torch.compile the forward (lazily, at the first call).
            attn_impl: former name of `kernel` ("fast" or "reference"); wins when given.
        """
        super().__init__()
        self.config = cfg = config
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.pos_embed: Optional[nn.Parameter] = None
        if cfg.use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid_size, cfg.grid_size, cfg.embed_dim))
        self.blocks = nn.ModuleList(Block(cfg, cfg.block_window_size(i)) for i in range(cfg.depth))
        self.neck = build_neck(cfg.embed_dim, cfg.out_chans, cfg.norm_eps) if cfg.out_chans else None
        self.grad_checkpointing = False
        self._workspaces: Dict[int, Workspace] = {}  # per thread: buffers of the inference path
        self.set_kernel(attn_impl or kernel)
        if compile:  # torch.compile of the whole forward, done lazily at the first call (after loading weights)
            self.compile(dynamic=False)

    def _apply(self, fn, recurse=True):
        """Casts to bfloat16/float16 (`.to(dtype)`, `.bfloat16()`, load_encoder(dtype=...)) keep the small,
        precision-sensitive tensors in float32: LayerNorm scales and shifts, the position embedding and the
        relative-position tables (0.3% of ViT-B's parameters). Device moves apply to them as usual."""
        keep = {id(t) for t in self._float32_tensors()}

        def cast(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if id(t) in keep and t.dtype == torch.float32 and out.dtype in (torch.bfloat16, torch.float16):
                return t.to(device=out.device)
            return out

        return super()._apply(cast, recurse)

    def _float32_tensors(self):
        for m in self.modules():
            if isinstance(m, (nn.LayerNorm, LayerNorm2d)):
                yield from (t for t in (m.weight, m.bias) if t is not None)
            elif isinstance(m, Attention) and m.use_rel_pos:
                yield from (m.rel_pos_h, m.rel_pos_w)
        if self.pos_embed is not None:
            yield self.pos_embed

    def set_kernel(self, name: str) -> "ImageEncoder":
        """Use the attention kernel `name` in every block: "auto" (the fast default), "sdpa_chunked",
        "matmul_blocked", "reference" (the official arithmetic throughout: the oracle), or any kernel registered
        with attention.register_kernel."""
        kernel = get_kernel(name)
        for blk in self.blocks:
            blk.attn.kernel = kernel
        self.kernel = kernel.name
        self._official = kernel.official
        return self

    def set_attention(self, impl: str) -> "ImageEncoder":
        """Former name of set_kernel ("fast" = "auto", "reference")."""
        return self.set_kernel(impl)

    @property
    def attn_impl(self) -> str:
        """Former name of `kernel`: "fast" for auto (the default)."""
        return {v: k for k, v in KERNEL_ALIASES.items()}.get(self.kernel, self.kernel)

    def set_drop_path(self, rate: float) -> "ImageEncoder":
        """Stochastic depth for training: block i drops its branches with probability rate * i / (depth - 1)
        (0 in the first block, `rate` in the last, as timm's linear rule); 0 turns it off."""
        if not 0.0 <= rate < 1.0:
            raise ParameterError(f"drop path rate must be in [0, 1), got {rate}")
        n = len(self.blocks)
        for i, blk in enumerate(self.blocks):
            blk.drop_path = rate * i / (n - 1) if n > 1 else rate
        return self

    def workspace(self) -> Optional[Workspace]:
        """This thread's scratch buffers when the in-place inference path applies (no autograd, not compiling or
        tracing, fast kernel, no drop path in training), else None."""
        if (torch.is_grad_enabled() or self._official or torch.jit.is_tracing() or torch.compiler.is_compiling()
                or torch.onnx.is_in_onnx_export()
                or (self.training and any(blk.drop_path > 0 for blk in self.blocks))):
            return None
        return self._workspaces.setdefault(threading.get_ident(), Workspace())

    def release_workspace(self) -> int:
        """Free the inference path's scratch buffers (they are rebuilt at the next call); returns the bytes freed."""
        freed = sum(ws.nbytes() for ws in self._workspaces.values())
        self._workspaces.clear()
        return freed

    def set_grad_checkpointing(self, enable: bool = True) -> "ImageEncoder":
        """Recompute each block's activations in the backward pass instead of keeping them (when grad is enabled)."""
        self.grad_checkpointing = enable
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised padded images (B,3,S,S) -> pre-neck features (B,S/16,S/16,C).

        Any float input is cast to the weights' dtype. Outputs are float32 for bfloat16/float16 weights: the
        residual stream and the LayerNorms run in float32, and rounding their result would only lose precision.
        """
        return self._features(x).to(_residual_dtype(self.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised padded images (B,3,1024,1024) -> embedding (B,256,64,64), or features without a neck;
        float32 for bfloat16/float16 weights (see forward_features)."""
        return self._head(self._features(x))

    def forward_intermediates(self, x: torch.Tensor, blocks: Optional[Sequence[int]] = None,
                              return_attention: bool = False) -> Union[Tuple[torch.Tensor, List[torch.Tensor]],
                                                                       Tuple[torch.Tensor, List[torch.Tensor],
                                                                             List[torch.Tensor]]]:
        """The output of forward and the outputs of some blocks (in the manner of timm).

        Args:
            x: normalised padded images (B,3,S,S).
            blocks: block indices (negative ones count from the end); None: every block.
            return_attention: also return those blocks' attention probabilities, computed beside the forward
                pass by the reference arithmetic (whole score matrices: for small inputs).
        Returns:
            (output as forward gives it, [(B,h,w,C) residual stream after each listed block, in block order]),
            plus [(B * windows, heads, N, N) probabilities per listed block] with return_attention.
        """
        n = len(self.blocks)
        take = set(range(n)) if blocks is None else set()
        for i in blocks or ():
            if not -n <= int(i) < n:
                raise ParameterError(f"block index {i} is outside the {n} blocks of model {self.config.name!r}")
            take.add(int(i) % n)
        x = self.forward_embed(x)
        ws = self.workspace()  # inference: x is updated in place, so the intermediates are copies
        inter, attn = [], []
        for i, blk in enumerate(self.blocks):
            if return_attention and i in take:
                with torch.no_grad():
                    attn.append(blk.attention_probs(x))
            x = blk(x, ws) if ws is not None else self._block(blk, x)
            if i in take:
                inter.append(x.to(_residual_dtype(self.dtype), copy=ws is not None))
        out = self._head(x)
        return (out, inter, attn) if return_attention else (out, inter)

    def forward_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised padded images (B,3,S,S) -> the residual stream the first block takes (B,S/16,S/16,C): patch
        embedding plus position embedding, in the dtype and memory layout of the encoder's own path."""
        dtype = self.dtype
        _check_input(x, self.config)
        if dtype == torch.float16:
            check_float16(self.config, x.device)
        x = self.patch_embed(x.to(dtype))
        if not self._official:
            # A contiguous (B,H,W,C) residual stream (the official one stays channels-first in memory, so every
            # LayerNorm and Linear copies it), kept in float32 for bfloat16/float16 weights.
            x = x.to(_residual_dtype(dtype)).contiguous()
        if self.pos_embed is not None:
            x = x + resize_pos_embed(self.pos_embed, x.shape[1:3]).to(x.dtype)
        return x

    def _block(self, blk: Block, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_embed(x)
        ws = self.workspace()
        if ws is not None:  # inference: the residual stream (this call's own tensor) is updated in place
            for blk in self.blocks:
                blk(x, ws)
            return x
        for blk in self.blocks:
            x = self._block(blk, x)
        return x

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stream after the last block -> the neck's output (if any), with the float16 check."""
        dtype = self.dtype
        if self.neck is not None:
            x = self.neck(x.permute(0, 3, 1, 2)) if self._official else self._neck_fast(x)
        x = x.to(_residual_dtype(dtype))
        if dtype == torch.float16 and not torch.isfinite(x).all():
            raise FloatingPointError(f"float16 overflowed in model {self.config.name!r} (non-finite output); "
                                     "use bfloat16 or float32")
        return x

    def _neck_fast(self, x: torch.Tensor) -> torch.Tensor:
        """The neck on channels-last memory, its LayerNorms in float32 for a low-precision model."""
        conv1, norm1, conv2, norm2 = self.neck
        dtype = self.dtype
        x = _layer_norm_2d(conv1(x.to(dtype).permute(0, 3, 1, 2)), norm1, dtype)
        x = _layer_norm_2d(conv2(x), norm2, _residual_dtype(dtype))
        return x.contiguous()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the matmuls and of the input they take (that of the linear and conv weights)."""
        return self.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        """The device of the weights (and of the input they take)."""
        return self.patch_embed.proj.weight.device

    def num_parameters(self, include_pos_embed: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not include_pos_embed and self.pos_embed is not None:
            n -= self.pos_embed.numel()
        return n
