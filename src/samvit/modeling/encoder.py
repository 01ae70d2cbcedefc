"""The SAM ViT image encoder: patch embedding, absolute position embedding, pre-norm blocks, neck.

Modules have one forward each (timm's vision_transformer_sam shape); how the encoder computes is chosen in one place,
ImageEncoder.runner(): the modules' forward (training, tracing, export), the in-place inference runner
(inference.py: no autograd), or the official arithmetic (reference.py: kernel="reference", the oracle). The
attention kernel is a choice inside Attention (kernels.py). Training hooks in the manner of timm:
set_grad_checkpointing, set_drop_path, forward_intermediates.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import EncoderConfig
from .attention import DEFAULT_KERNEL, KERNEL_ALIASES, Attention, resize_rel_pos, resolve_kernel_name
from .common import LayerNorm, LayerNorm2d, MLPBlock, drop_path
from .inference import InferenceRunner
from .reference import ReferenceRunner
from .workspace import Workspace
from ..errors import ParameterError


class PatchEmbed(nn.Module):
    """Image (B,3,H,W) -> patch tokens (B,H/16,W/16,C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Block(nn.Module):
    """Pre-norm transformer block on a (B,H,W,C) grid (windowed attention when window_size > 0, else global) or a
    (B,N,C) sequence; the residual stream stays in x's dtype (float32 for a bfloat16/float16 model).

    Seams for variants: norm_layer (default: LayerNorm with the config's eps), mlp_layer (dim, hidden) -> module,
    drop_path_rate (stochastic depth of both branches; nn.Identity when 0).
    """

    def __init__(self, cfg: EncoderConfig, window_size: int, norm_layer: Optional[Callable[[int], nn.Module]] = None,
                 mlp_layer: Type[nn.Module] = MLPBlock, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        dim = cfg.embed_dim
        norm_layer = norm_layer or partial(LayerNorm, eps=cfg.norm_eps)
        self.norm1 = norm_layer(dim)
        attn_size = (window_size, window_size) if window_size > 0 else (cfg.grid_size, cfg.grid_size)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias, cfg.use_rel_pos, attn_size, window_size=window_size)
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(dim, int(dim * cfg.mlp_ratio))
        self.window_size = window_size
        self.drop_path = drop_path(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """This block's attention probabilities for the residual stream x (B,H,W,C), by the official arithmetic:
        (B * windows, heads, N, N), N = window_size**2 (zero-padded windows, as the official) or H*W."""
        return self.attn.attention_probs(self.norm1(x))


class ModuleRunner:
    """The modules' own forward: embed, each block's forward (hooks run: FSDP, checkpointing), the neck."""

    def embed(self, encoder: "ImageEncoder", x: torch.Tensor) -> torch.Tensor:
        return encoder.forward_embed(x)

    def block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return blk(x)

    def head(self, encoder: "ImageEncoder", x: torch.Tensor) -> torch.Tensor:
        return encoder.forward_head(x)


MODULES, REFERENCE = ModuleRunner(), ReferenceRunner()


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


def check_input(x: torch.Tensor, cfg) -> None:
    """A clear error for an input the encoder cannot take (cfg: an EncoderConfig or a TinyViTConfig)."""
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
                 attn_impl: Optional[str] = None, block_fn: Type[nn.Module] = Block,
                 norm_layer: Optional[Callable[[int], nn.Module]] = None,
                 mlp_layer: Type[nn.Module] = MLPBlock) -> None:
        """Args:
            config: the architecture.
            kernel: the attention kernel ("auto", "sdpa_chunked", "matmul_blocked", "reference", or any
                registered; "fast" = auto). "reference" also runs the official arithmetic around it (the oracle).
            compile: torch.compile the forward (lazily, at the first call).
            attn_impl: former name of `kernel` ("fast" or "reference"); wins when given.
            block_fn, norm_layer, mlp_layer: seams for variants (timm's names); block_fn(cfg, window_size,
                norm_layer=..., mlp_layer=...) builds each block.
        """
        super().__init__()
        self.config = cfg = config
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.pos_embed: Optional[nn.Parameter] = None
        if cfg.use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid_size, cfg.grid_size, cfg.embed_dim))
        self.blocks = nn.ModuleList(block_fn(cfg, cfg.block_window_size(i), norm_layer=norm_layer,
                                             mlp_layer=mlp_layer) for i in range(cfg.depth))
        self.neck = build_neck(cfg.embed_dim, cfg.out_chans, cfg.norm_eps) if cfg.out_chans else None
        self.grad_checkpointing = False
        self.inference = InferenceRunner()  # the in-place inference path and its per-thread workspaces
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
        """Use the attention kernel `name` in every block: "auto" (the fast default, chosen per call from the
        kernels' declarations), "sdpa_chunked", "matmul_blocked", "reference" (the official arithmetic
        throughout: the oracle), or any kernel registered with kernels.register_kernel."""
        name = resolve_kernel_name(name)
        for blk in self.blocks:
            blk.attn.set_kernel(name)
        self.kernel = name
        return self

    def set_attention(self, impl: str) -> "ImageEncoder":
        """Former name of set_kernel ("fast" = "auto", "reference")."""
        return self.set_kernel(impl)

    @property
    def attn_impl(self) -> str:
        """Former name of `kernel`: "fast" for auto (the default)."""
        return {v: k for k, v in KERNEL_ALIASES.items()}.get(self.kernel, self.kernel)

    def block_list(self) -> List[nn.Module]:
        """The blocks in order (drop path, FSDP units, layer-wise lr decay)."""
        return list(self.blocks)

    def attention_blocks(self) -> List[nn.Module]:
        """The blocks with attention and an MLP (where LoRA adapters go): every block."""
        return list(self.blocks)

    def layer_id(self, name: str) -> int:
        """Depth of the parameter `name` (relative to the encoder) for layer-wise lr decay: 0 the patch and position
        embeddings, i + 1 block i, depth + 1 the neck."""
        if name.startswith(("patch_embed.", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1

    def set_drop_path(self, rate: float) -> "ImageEncoder":
        """Stochastic depth for training: block i drops its branches with probability rate * i / (depth - 1)
        (0 in the first block, `rate` in the last, as timm's linear rule); 0 turns it off."""
        if not 0.0 <= rate < 1.0:
            raise ParameterError(f"drop path rate must be in [0, 1), got {rate}")
        n = len(self.blocks)
        for i, blk in enumerate(self.blocks):
            blk.drop_path = drop_path(rate * i / (n - 1) if n > 1 else rate)
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> "ImageEncoder":
        """Recompute each block's activations in the backward pass instead of keeping them (when grad is enabled)."""
        self.grad_checkpointing = enable
        return self

    def runner(self):
        """How this call computes, the one place it is chosen: the official arithmetic for kernel="reference",
        the in-place inference runner where it applies (no autograd, no tracing, standard blocks), else the
        modules' forward."""
        if self.kernel == "reference":
            return REFERENCE
        if self.inference.supports(self):
            return self.inference
        return MODULES

    def workspace(self) -> Optional[Workspace]:
        """This thread's scratch buffers when the in-place inference runner applies, else None."""
        return self.inference.workspace() if self.runner() is self.inference else None

    def release_workspace(self) -> int:
        """Free the inference path's scratch buffers (they are rebuilt at the next call); returns the bytes freed."""
        return self.inference.release()

    def iter_blocks(self, x: torch.Tensor, runner=None) -> Iterator[Tuple[int, torch.Tensor]]:
        """Embed the images x (B,3,S,S) and run the blocks by `runner` (default: self.runner()), yielding (i, the
        residual stream entering block i) for i = 0..depth (depth: after the last block). The inference runner
        updates the stream in place: use it before resuming, copy it to keep it."""
        runner = runner or self.runner()
        x = runner.embed(self, x)
        for i, blk in enumerate(self.blocks):
            yield i, x
            x = self._block(runner, blk, x)
        yield len(self.blocks), x

    def _block(self, runner, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(runner.block, blk, x, use_reentrant=False)
        return runner.block(blk, x)

    def _features(self, x: torch.Tensor, runner) -> torch.Tensor:
        """iter_blocks' walk as a plain loop (no generator in the path torch.compile traces)."""
        x = runner.embed(self, x)
        for blk in self.blocks:
            x = self._block(runner, blk, x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised padded images (B,3,S,S) -> pre-neck features (B,S/16,S/16,C).

        Any float input is cast to the weights' dtype. Outputs are float32 for bfloat16/float16 weights: the
        residual stream and the LayerNorms run in float32, and rounding their result would only lose precision.
        """
        return self._features(x, self.runner()).to(_residual_dtype(self.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised padded images (B,3,1024,1024) -> embedding (B,256,64,64), or features without a neck;
        float32 for bfloat16/float16 weights (see forward_features)."""
        runner = self.runner()
        return self._finish(runner.head(self, self._features(x, runner)))

    def forward_intermediates(self, x: torch.Tensor, blocks: Optional[Sequence[int]] = None,
                              return_attention: bool = False) -> Union[Tuple[torch.Tensor, List[torch.Tensor]],
                                                                       Tuple[torch.Tensor, List[torch.Tensor],
                                                                             List[torch.Tensor]]]:
        """The output of forward and the outputs of some blocks (in the manner of timm).

        Args:
            x: normalised padded images (B,3,S,S).
            blocks: block indices (negative ones count from the end); None: every block.
            return_attention: also return those blocks' attention probabilities, computed beside the forward
                pass by the official arithmetic (whole score matrices: for small inputs).
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
        runner = self.runner()
        copy = runner is self.inference  # the stream is updated in place: the intermediates are copies
        inter, attn = [], []
        for i, x in self.iter_blocks(x, runner):
            if i - 1 in take:
                inter.append(x.to(_residual_dtype(self.dtype), copy=copy))
            if return_attention and i in take:
                with torch.no_grad():
                    attn.append(self.blocks[i].attention_probs(x))
        out = self._finish(runner.head(self, x))
        return (out, inter, attn) if return_attention else (out, inter)

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """x checked (a float (B,3,H,W), sides multiples of the patch size; float16 where allowed) and cast to the
        weights' dtype."""
        check_input(x, self.config)
        if self.dtype == torch.float16:
            check_float16(self.config, x.device)
        return x.to(self.dtype)

    def position_embedding(self, hw: Tuple[int, int]) -> torch.Tensor:
        """The absolute position embedding (1,H,W,C) for a (H, W) token grid (resized when it differs)."""
        return resize_pos_embed(self.pos_embed, hw)

    def forward_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised padded images (B,3,S,S) -> the residual stream the first block takes (B,S/16,S/16,C): patch
        embedding plus position embedding, contiguous, in float32 for bfloat16/float16 weights (the official
        stream stays channels-first in memory, so that every LayerNorm and Linear copies it)."""
        x = self.patch_embed(self.check_input(x)).to(_residual_dtype(self.dtype)).contiguous()
        if self.pos_embed is not None:
            x = x + self.position_embedding(x.shape[1:3]).to(x.dtype)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stream after the last block -> the neck's output (B,out_chans,H,W) (x itself without a
        neck), on channels-last memory with its LayerNorms in float32 for a low-precision model."""
        if self.neck is None:
            return x
        conv1, norm1, conv2, norm2 = self.neck
        dtype = self.dtype
        x = _layer_norm_2d(conv1(x.to(dtype).permute(0, 3, 1, 2)), norm1, dtype)
        x = _layer_norm_2d(conv2(x), norm2, _residual_dtype(dtype))
        return x.contiguous()

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """The output in the residual dtype, with the float16 overflow check."""
        x = x.to(_residual_dtype(self.dtype))
        if self.dtype == torch.float16 and not torch.isfinite(x).all():
            raise FloatingPointError(f"float16 overflowed in model {self.config.name!r} (non-finite output); "
                                     "use bfloat16 or float32")
        return x

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the matmuls and of the input they take (that of the linear and conv weights)."""
        return self.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        """The device of the weights (and of the input they take)."""
        return self.patch_embed.proj.weight.device

    def num_parameters(self, include_pos_embed: bool = True) -> int:
        """Parameters, the position embedding optionally left out."""
        n = sum(p.numel() for p in self.parameters())
        if not include_pos_embed and self.pos_embed is not None:
            n -= self.pos_embed.numel()
        return n
