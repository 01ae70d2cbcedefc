"""The implementations the benchmark compares: samvit's paths, official segment-anything, timm, transformers,
each built from the same official-layout weights."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable, Dict, Tuple

from ..config import EncoderConfig, TinyViTConfig
from ..errors import ParameterError

if TYPE_CHECKING:  # torch is imported when a model is built, so that `samvit bench --help` starts without it
    import torch

# name -> (what it is, precisions it runs). Peers run bfloat16 the way their users do: autocast over fp32 weights.
SAMVIT_IMPLS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "samvit": ("samvit fast path (default kernel: auto)", ("float32", "bfloat16")),
    "samvit-sdpa": ("samvit fast path (sdpa_chunked)", ("float32", "bfloat16")),
    "samvit-blocked": ("samvit fast path (matmul_blocked)", ("float32", "bfloat16")),
    "samvit-compiled": ("samvit fast path + torch.compile", ("float32", "bfloat16")),
    "samvit-reference": ("samvit reference path (official arithmetic)", ("float32",)),
}
PEER_IMPLS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "official": ("official segment-anything", ("float32", "bfloat16")),
    "official-compiled": ("official + torch.compile", ("float32", "bfloat16")),
    "timm": ("timm samvit (VisionTransformerSAM)", ("float32", "bfloat16")),
    "transformers": ("transformers SamVisionModel, sdpa", ("float32", "bfloat16")),
    "transformers-eager": ("transformers SamVisionModel, eager", ("float32", "bfloat16")),
    "onnxruntime": ("ONNX Runtime (samvit ONNX export)", ("float32",)),
    "openvino": ("OpenVINO (samvit ONNX export)", ("float32", "bfloat16")),
}
IMPLS = {**SAMVIT_IMPLS, **PEER_IMPLS}
SAMVIT_KERNELS = {"samvit": "auto", "samvit-compiled": "auto", "samvit-reference": "reference",
                  "samvit-sdpa": "sdpa_chunked", "samvit-blocked": "matmul_blocked"}
DEFAULT_IMPLS = ("samvit", "samvit-reference", "official", "timm", "transformers")
TUNED_ENV = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
ALLOCATORS = ("default", "tuned")
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


# TinyViT (MobileSAM's encoder, a TinyViTConfig) runs in samvit and in the official code (segment-anything-hq's
# tiny_vit_sam); samvit's kernel variants are one arithmetic there, and the other peers have no TinyViT.
TINYVIT_IMPLS = ("samvit", "samvit-compiled", "samvit-reference", "official", "official-compiled")


def unsupported(impl: str, cfg) -> str:
    """Why `impl` cannot run the encoder of `cfg` ("" when it can)."""
    if not isinstance(cfg, TinyViTConfig):
        return ""
    if impl not in TINYVIT_IMPLS:
        return f"{impl} has no TinyViT (MobileSAM's encoder); TinyViT runs in {', '.join(TINYVIT_IMPLS)}"
    if impl.startswith("official"):
        return _official_tinyvit_refuses(cfg)
    return ""


def _official_tinyvit_refuses(cfg: TinyViTConfig) -> str:
    if cfg.img_size != 1024 or cfg.out_chans != 256 or cfg.embed_dims[-1] not in (320, 448, 576):
        return ("the official TinyViT runs only at 1024 input with a 256-channel neck and a last width of 320, 448 "
                f"or 576; this config has {cfg.img_size}, {cfg.out_chans}, {cfg.embed_dims[-1]}")
    return ""


def official_tinyvit(cfg: TinyViTConfig) -> "torch.nn.Module":
    """segment-anything-hq's TinyViT with the architecture of `cfg`, as MobileSAM runs it (forward gives the
    embedding alone). The official code fixes a 64x64 token grid (1024 input) and keeps the resolution in the last
    patch merging only for a last width of 320, 448 or 576."""
    import warnings

    with warnings.catch_warnings():  # it imports timm's deprecated module paths
        warnings.simplefilter("ignore")
        from segment_anything_hq.modeling.tiny_vit_sam import TinyViT

    if _official_tinyvit_refuses(cfg):
        raise ValueError(_official_tinyvit_refuses(cfg))

    class MobileSAMTinyViT(TinyViT):
        def forward(self, x):
            return super().forward(x)[0]

    return MobileSAMTinyViT(img_size=cfg.img_size, in_chans=cfg.in_chans, embed_dims=list(cfg.embed_dims),
                            depths=list(cfg.depths), num_heads=list(cfg.num_heads),
                            window_sizes=list(cfg.window_sizes), mlp_ratio=cfg.mlp_ratio, drop_path_rate=0.0,
                            mbconv_expand_ratio=cfg.mbconv_expand_ratio, local_conv_size=cfg.local_conv_size)


def official_encoder(cfg: EncoderConfig) -> "torch.nn.Module":
    """segment-anything's ImageEncoderViT with the architecture of `cfg` (segment-anything-hq's TinyViT for a
    TinyViTConfig)."""
    from functools import partial

    import torch

    from segment_anything.modeling import ImageEncoderViT

    if isinstance(cfg, TinyViTConfig):
        return official_tinyvit(cfg)
    if cfg.out_chans is None:
        raise ParameterError("the official encoder always has a neck; this config has none (out_chans=None)")
    return ImageEncoderViT(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                           embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                           out_chans=cfg.out_chans, qkv_bias=cfg.qkv_bias,
                           norm_layer=partial(torch.nn.LayerNorm, eps=cfg.norm_eps), use_abs_pos=cfg.use_abs_pos,
                           use_rel_pos=cfg.use_rel_pos, window_size=cfg.window_size,
                           global_attn_indexes=cfg.global_attn_indexes)


def build(impl: str, cfg: EncoderConfig, sd: Dict[str, torch.Tensor], dtype: torch.dtype
          ) -> Tuple[Callable[[torch.Tensor], torch.Tensor], torch.dtype, bool]:
    """(forward, input dtype, autocast?) for one implementation holding the official-layout weights `sd`."""
    import torch

    from ..checkpoints.keymaps import from_official

    why = unsupported(impl, cfg)
    if why:
        raise ValueError(why)
    if impl.startswith("samvit"):  # as a library user gets it: load_encoder, nothing else
        from ..checkpoints.load import load_encoder

        enc = load_encoder(cfg, checkpoint=sd, dtype=dtype, kernel=SAMVIT_KERNELS[impl])
        if impl == "samvit-compiled":
            enc.compile(dynamic=False)
        return enc, dtype, False
    if impl in ("onnxruntime", "openvino"):
        return _runtime_peer(impl, cfg, sd, dtype), torch.float32, False
    autocast = dtype != torch.float32
    if impl.startswith("official"):
        model = official_encoder(cfg)
        missing, unexpected = model.load_state_dict(sd, strict=not isinstance(cfg, TinyViTConfig))
        if unexpected or any(not k.startswith(("head.", "norm_head.")) for k in missing):
            raise ValueError(f"official TinyViT: weights do not fit ({(missing + unexpected)[:4]})")
        model.eval()  # after loading: the official TinyViT caches its attention bias table in eval()
        fwd = torch.compile(model) if impl == "official-compiled" else model
        return fwd, torch.float32, autocast
    if impl == "timm":
        from functools import partial

        from timm.models.vision_transformer_sam import VisionTransformerSAM

        model = VisionTransformerSAM(
            img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
            depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
            norm_layer=partial(torch.nn.LayerNorm, eps=cfg.norm_eps), use_abs_pos=cfg.use_abs_pos,
            use_rel_pos=cfg.use_rel_pos, window_size=cfg.window_size, global_attn_indexes=cfg.global_attn_indexes,
            neck_chans=cfg.out_chans, num_classes=0, global_pool="")
        model.load_state_dict(from_official(sd, "timm"))
        return model.eval().forward_features, torch.float32, autocast
    if impl.startswith("transformers"):
        from transformers import SamVisionConfig, SamVisionModel

        hc = SamVisionConfig(hidden_size=cfg.embed_dim, output_channels=cfg.out_chans, num_hidden_layers=cfg.depth,
                             num_attention_heads=cfg.num_heads, num_channels=cfg.in_chans, image_size=cfg.img_size,
                             patch_size=cfg.patch_size, layer_norm_eps=cfg.norm_eps, qkv_bias=cfg.qkv_bias,
                             mlp_ratio=cfg.mlp_ratio, use_abs_pos=cfg.use_abs_pos, use_rel_pos=cfg.use_rel_pos,
                             window_size=cfg.window_size, global_attn_indexes=list(cfg.global_attn_indexes))
        hc._attn_implementation = "eager" if impl == "transformers-eager" else "sdpa"
        model = SamVisionModel(hc)
        model.load_state_dict(from_official(sd, "transformers"))
        model.eval()
        return (lambda x: model(pixel_values=x).last_hidden_state), torch.float32, autocast
    raise ParameterError(f"unknown implementation {impl!r}; expected one of {', '.join(IMPLS)}")


def _runtime_peer(impl: str, cfg: EncoderConfig, sd: Dict[str, "torch.Tensor"], dtype: "torch.dtype"
                  ) -> Callable[["torch.Tensor"], "torch.Tensor"]:
    """samvit's float32 encoder exported to ONNX (samvit.export), run by onnxruntime or OpenVINO (OpenVINO in
    float32 or bfloat16 inference precision, as asked) with torch's thread count."""
    import tempfile

    import torch

    from ..checkpoints.load import load_encoder
    from ..export import OpenVINOEncoder, export_onnx, onnx_session

    encoder = load_encoder(cfg, checkpoint=sd, dtype=torch.float32)
    if impl == "openvino":
        return OpenVINOEncoder(encoder, precision="bf16" if dtype == torch.bfloat16 else "f32", dynamic_batch=False)
    with tempfile.TemporaryDirectory(prefix="samvit-bench-onnx-") as tmp:  # the session holds the model once loaded
        path = os.path.join(tmp, "encoder.onnx")
        export_onnx(encoder, path, dynamic_batch=False, check=False)
        sess = onnx_session(path, threads=torch.get_num_threads())
    name = sess.get_inputs()[0].name
    return lambda x: torch.from_numpy(sess.run(None, {name: x.numpy()})[0])
