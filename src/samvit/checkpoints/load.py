"""Building models from checkpoints: load_encoder, load_decoder and load_sam resolve a checkpoint argument the
same way (registry name, file, transformers folder: registry.resolve_checkpoint), read the file once, map any
supported layout to the official names, resolve the encoder config once (given -> file metadata -> inferred
from the tensors) and check every key strictly before loading."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Dict, Optional, Tuple, Union

import torch

from ..config import (PRESETS, AnyEncoderConfig, DecoderConfig, EncoderConfig, TinyViTConfig,
                      encoder_config_from_json, preset)
from ..modeling.attention import DEFAULT_KERNEL
from ..modeling.encoder import ImageEncoder, fit_position_tables
from ..modeling.sam import SamDecoder
from ..modeling.tinyvit import TinyViT
from .files import (CONFIG_METADATA_KEY, DECODER_CONFIG_METADATA_KEY, CheckpointError, PathLike, StateDict, check_keys,
                    read_checkpoint, write_tensors)
from .keymaps import DECODER_PREFIXES, ENCODER_PREFIX, to_official
from .registry import resolve_checkpoint
from . import tinyvit as _tinyvit
from ..runtime import DtypeArg, as_device, resolve_dtype
from ..errors import ParameterError

ModelSpec = Union[str, EncoderConfig, TinyViTConfig, None]
Encoder = Union[ImageEncoder, TinyViT]  # the two encoder families
CheckpointSource = Union[str, os.PathLike, StateDict]
Device = Union[str, torch.device, None]


def read_official(checkpoint: CheckpointSource, progress: Optional[bool] = None
                  ) -> Tuple[StateDict, Dict[str, str], str]:
    """(state dict under official names, file metadata, source name) of a checkpoint argument or a state dict."""
    if isinstance(checkpoint, dict):
        return to_official(checkpoint), {}, "state dict"
    path = resolve_checkpoint(checkpoint, progress=progress)
    sd, metadata = read_checkpoint(path)
    return to_official(sd), metadata, path


def _encoder_part(sd: StateDict) -> StateDict:
    """The encoder tensors of an official-layout state dict (a full SAM model or an encoder alone)."""
    if any(k.startswith(ENCODER_PREFIX) for k in sd):
        sd = {k[len(ENCODER_PREFIX):]: v for k, v in sd.items() if k.startswith(ENCODER_PREFIX)}
    return _tinyvit.drop_head(sd) if _tinyvit.is_tinyvit(sd) else dict(sd)


def build_encoder(cfg: AnyEncoderConfig, kernel: str = DEFAULT_KERNEL) -> Encoder:
    """A freshly initialised encoder of either family: ImageEncoder for an EncoderConfig, TinyViT for a
    TinyViTConfig (which has one attention arithmetic: `kernel` is checked but changes nothing)."""
    if isinstance(cfg, TinyViTConfig):
        return TinyViT(cfg).set_kernel(kernel)
    return ImageEncoder(cfg, kernel)


def encoder_config(model: ModelSpec, metadata: Dict[str, str], sd: StateDict, source: str = "checkpoint"
                   ) -> AnyEncoderConfig:
    """The encoder config: `model` (preset name or EncoderConfig) if given, else the file's samvit metadata
    (validated: CheckpointError naming `source` when it is not a sane config), else the preset whose tensor names
    and shapes match `sd` (encoder keys, official names)."""
    if isinstance(model, (EncoderConfig, TinyViTConfig)):
        return model
    if model is not None:
        return preset(model)
    if CONFIG_METADATA_KEY in metadata:
        try:
            return encoder_config_from_json(metadata[CONFIG_METADATA_KEY])
        except (ValueError, TypeError, RecursionError) as e:
            raise CheckpointError(f"{source}: its {CONFIG_METADATA_KEY} metadata is not a valid encoder config "
                                  f"({e})") from None
    if _tinyvit.is_tinyvit(sd):
        return _tinyvit.infer_tinyvit_config(sd, source)
    return infer_config(sd, source)


def infer_config(sd: StateDict, source: str = "checkpoint") -> EncoderConfig:
    """The preset whose parameter names and shapes match an encoder state dict exactly (CheckpointError naming
    `source` otherwise)."""
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    for cfg in PRESETS.values():
        if _expected_shapes(cfg) == shapes:
            return cfg
    w = sd.get("patch_embed.proj.weight")
    if w is None:
        raise CheckpointError(f"{source}: cannot infer the model: no `patch_embed.proj.weight` tensor "
                              "(is this a SAM image encoder checkpoint?)")
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    raise CheckpointError(
        f"{source}: no preset matches this checkpoint (width {w.shape[0]}, {depth} blocks); pass model= with one of "
        f"{', '.join(PRESETS)} or an EncoderConfig")


_SHAPE_CACHE: Dict[EncoderConfig, Dict[str, tuple]] = {}


def _expected_shapes(cfg: EncoderConfig) -> Dict[str, tuple]:
    if cfg not in _SHAPE_CACHE:
        with torch.device("meta"):
            model = ImageEncoder(cfg)
        _SHAPE_CACHE[cfg] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return _SHAPE_CACHE[cfg]


def check_state_dict(sd: StateDict, cfg: AnyEncoderConfig, source: str = "checkpoint") -> None:
    """Raise CheckpointError naming every missing, unexpected and wrongly shaped encoder key."""
    if isinstance(cfg, TinyViTConfig):
        return _tinyvit.check_tinyvit_state_dict(sd, cfg, source)
    check_keys(sd, _expected_shapes(cfg), f"{source} does not fit model {cfg.name!r}:")


def _count(sd: StateDict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return 1 + max((int(m.group(1)) for k in sd for m in [pat.match(k)] if m), default=-1)


def infer_decoder_config(sd: StateDict, base: DecoderConfig = DecoderConfig(), source: str = "checkpoint"
                         ) -> DecoderConfig:
    """Widths and depths from the tensors' shapes; num_heads and the image sizes (not stored) come from `base`.

    When the state dict also holds the image encoder, the image sizes are read from its patch and position
    embeddings.
    """
    sd = to_official(sd)
    try:
        cfg = base.replace(
            embed_dim=sd["mask_decoder.iou_token.weight"].shape[1],
            mask_in_chans=sd["prompt_encoder.mask_downscaling.3.weight"].shape[0],
            depth=_count(sd, "mask_decoder.transformer.layers."),
            mlp_dim=sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
            num_multimask_outputs=sd["mask_decoder.mask_tokens.weight"].shape[0] - 1,
            iou_head_depth=_count(sd, "mask_decoder.iou_prediction_head.layers."),
            iou_head_hidden_dim=sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
            hq_vit_dim=hq_vit_dim(sd),
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: not a full SAM checkpoint: no {e.args[0]!r} tensor (the prompt_encoder.* "
                              "and mask_decoder.* tensors are needed; an encoder-only file has neither)") from None
    pos = sd.get("image_encoder.pos_embed")
    patch = sd.get("image_encoder.patch_embed.proj.weight")
    if pos is not None and patch is not None:
        cfg = cfg.replace(image_embedding_size=pos.shape[1], input_image_size=pos.shape[1] * patch.shape[-1])
    return cfg


def hq_vit_dim(sd: StateDict) -> int:
    """HQ-SAM: the width of the encoder features its mask decoder fuses (from `compress_vit_feat`), 0 for SAM."""
    w = sd.get("mask_decoder.compress_vit_feat.0.weight")  # ConvTranspose2d: (in, out, k, k)
    return 0 if w is None else int(w.shape[0])


def hq_early_block(cfg: AnyEncoderConfig) -> int:
    """The encoder block whose output HQ-SAM's decoder fuses: the first global-attention block (as the official
    code, which keeps every global block's output and uses the first); for TinyViT (HQ-SAM's vit_tiny) the stage
    (1, the official `layers[1]`, after its patch merging)."""
    if isinstance(cfg, TinyViTConfig):
        return 1
    if not cfg.global_attn_indexes:
        raise CheckpointError(f"model {cfg.name!r} has no global-attention block, whose output HQ-SAM's decoder "
                              "takes")
    return min(cfg.global_attn_indexes)


def hq_early_dim(cfg: AnyEncoderConfig) -> int:
    """The width of the early features HQ-SAM's decoder takes from this encoder (hq_early_block's output)."""
    if isinstance(cfg, TinyViTConfig):  # stage 1 ends with the patch merging to stage 2's width
        return cfg.embed_dims[min(hq_early_block(cfg) + 1, len(cfg.embed_dims) - 1)]
    return cfg.embed_dim


def check_hq_fits(cfg: Optional[AnyEncoderConfig], dec: DecoderConfig, source: str = "checkpoint") -> None:
    """CheckpointError unless an HQ-SAM decoder's early-feature width is that of the encoder's early features."""
    if dec.hq_vit_dim and cfg is not None:
        hq_early_block(cfg)
        if hq_early_dim(cfg) != dec.hq_vit_dim:
            raise CheckpointError(f"{source}: HQ-SAM's decoder takes {dec.hq_vit_dim}-wide encoder features, but "
                                  f"the encoder's ({cfg.name}, block/stage {hq_early_block(cfg)}) are "
                                  f"{hq_early_dim(cfg)} wide")


def check_decoder_state_dict(sd: StateDict, cfg: DecoderConfig, source: str = "checkpoint") -> None:
    """Raise CheckpointError naming every missing, unexpected and wrongly shaped decoder key."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in SamDecoder(cfg).state_dict().items()}
    check_keys(sd, expected, f"{source}: prompt encoder / mask decoder do not fit {cfg}:")


def _finish(module: torch.nn.Module, device: Device, dtype: Optional[torch.dtype]) -> torch.nn.Module:
    module.eval()
    if device is not None or dtype is not None:
        module.to(device=device, dtype=dtype)
    return module


def with_img_size(cfg: AnyEncoderConfig, img_size: Optional[int]) -> AnyEncoderConfig:
    """cfg for another input side (a multiple of the patch size), or cfg itself for None."""
    if img_size is None or img_size == cfg.img_size:
        return cfg
    if not isinstance(img_size, int) or img_size < cfg.patch_size or img_size % cfg.patch_size:
        raise ParameterError(f"img_size must be a positive multiple of the patch size {cfg.patch_size}, "
                             f"got {img_size!r}")
    return dataclasses.replace(cfg, img_size=img_size)


def _build_encoder(sd: StateDict, cfg: AnyEncoderConfig, source: str, kernel: str,
                   img_size: Optional[int] = None) -> Encoder:
    check_state_dict(sd, cfg, source=source)
    if img_size is not None and img_size != cfg.img_size:  # position tables resized to the new grid
        cfg = with_img_size(cfg, img_size)
        if isinstance(cfg, EncoderConfig):  # TinyViT has no position tables
            sd = fit_position_tables(sd, cfg)
    with torch.device("meta"):
        encoder = build_encoder(cfg, kernel)
    encoder.load_state_dict(sd, strict=True, assign=True)
    return encoder


def _build_decoder(full: StateDict, config: Optional[DecoderConfig], source: str) -> SamDecoder:
    sd = {k: v for k, v in full.items() if k.startswith(DECODER_PREFIXES)}
    if not sd:
        raise CheckpointError(f"{source}: no prompt_encoder.* / mask_decoder.* tensors: a full SAM checkpoint "
                              "(e.g. sam_vit_b_01ec64.pth) is needed, not an encoder-only file")
    cfg = config if config is not None else infer_decoder_config(full, source=source)
    check_decoder_state_dict(sd, cfg, source)
    with torch.device("meta"):
        decoder = SamDecoder(cfg)
    decoder.load_state_dict(sd, strict=True, assign=True)
    return decoder


def load_encoder(model: ModelSpec = None, checkpoint: Union[PathLike, None] = None, device: Device = None,
                 dtype: DtypeArg = None, kernel: str = DEFAULT_KERNEL, progress: Optional[bool] = None,
                 attn_impl: Optional[str] = None, img_size: Optional[int] = None) -> Encoder:
    """Build an ImageEncoder (or a TinyViT, MobileSAM's encoder) and load its weights.

    Args:
        model: a preset name, an EncoderConfig or a TinyViTConfig; None: from the file's metadata, else inferred
            from the tensors.
        checkpoint: a file (official, transformers or timm layout; .pth/.bin/.safetensors), a transformers model
            folder, or a registry name (vit_b, vit_l, vit_h) fetched into the verified cache. None: the preset's
            freshly initialised weights.
        device: where to put the weights (None: the CPU).
        dtype: the compute dtype: None for the default, float32 (samvit.runtime.DEFAULT_DTYPE: the official
            package's, the same numbers on every CPU), "auto" (bfloat16 where the device computes it natively, else
            float32; see samvit.runtime.auto_dtype), or a torch dtype or its name (see ImageEncoder for the tensors
            kept in float32).
        kernel: the attention kernel ("sdpa_chunked", "reference", ...; see samvit.modeling.attention).
        progress: download/verification bar (None: only on a terminal).
        attn_impl: former name of `kernel` ("fast" or "reference"); wins when given.
        img_size: the input side to build for (e.g. 512, 768, 1280; a multiple of the patch size): the position
            embedding and the global blocks' relative-position tables are resized to its grid. None: the
            checkpoint's (1024 for the released models).
    Returns:
        the encoder in eval mode.
    """
    dev = as_device(device)
    dtype = resolve_dtype(dtype, dev or torch.device("cpu"))
    if checkpoint is None:
        if model is None:
            raise ParameterError("load_encoder needs a model preset, a checkpoint, or both")
        cfg = with_img_size(encoder_config(model, {}, {}), img_size)
        return _finish(build_encoder(cfg, attn_impl or kernel), device, dtype)
    sd, metadata, source = read_official(checkpoint, progress)
    sd = _encoder_part(sd)
    encoder = _build_encoder(sd, encoder_config(model, metadata, sd, source), source, attn_impl or kernel, img_size)
    return _finish(encoder, device, dtype)


def load_encoder_hq(model: ModelSpec, checkpoint: PathLike, device: Device = None, dtype: DtypeArg = "auto",
                    kernel: str = DEFAULT_KERNEL, progress: Optional[bool] = None, img_size: Optional[int] = None
                    ) -> Tuple[Encoder, Optional[int]]:
    """load_encoder (same arguments), plus, for an HQ-SAM checkpoint, the encoder block (TinyViT: stage) whose
    output its decoder also takes (hq_early_block; None for any other checkpoint), from one read of the file."""
    dev = None if device is None else torch.device(device)
    dtype = resolve_dtype(dtype, dev or torch.device("cpu"))
    sd, metadata, source = read_official(checkpoint, progress)
    hq = hq_vit_dim(sd)
    sd = _encoder_part(sd)
    cfg = encoder_config(model, metadata, sd, source)
    early = None
    if hq:
        check_hq_fits(cfg, DecoderConfig(hq_vit_dim=hq), source)
        early = hq_early_block(cfg)
    return _finish(_build_encoder(sd, cfg, source, kernel, img_size), device, dtype), early


def load_decoder(checkpoint: CheckpointSource, config: Optional[DecoderConfig] = None, device: Device = None,
                 dtype: Optional[torch.dtype] = None, progress: Optional[bool] = None) -> SamDecoder:
    """Build a SamDecoder (prompt encoder + mask decoder) from a full SAM checkpoint.

    Args:
        checkpoint: as for load_encoder (a full SAM model: official .pth, transformers SamModel), or a state dict.
        config: the decoder's architecture; None: widths and depths inferred from the tensors, num_heads from
            the file's samvit metadata, else 8 (as in every released model).
        device, dtype: where and in which dtype to put the weights (default float32 on the CPU).
    Returns:
        the decoder in eval mode.
    """
    sd, metadata, source = read_official(checkpoint, progress)
    if config is None and DECODER_CONFIG_METADATA_KEY in metadata:
        config = infer_decoder_config(sd, decoder_base(metadata, source), source=source)
    return _finish(_build_decoder(sd, config, source), device, dtype)


def decoder_base(metadata: Dict[str, str], source: str = "checkpoint") -> DecoderConfig:
    """The DecoderConfig a file's samvit metadata records (`samvit train sam` writes it: the head count is in no
    tensor), else the released models' defaults."""
    if DECODER_CONFIG_METADATA_KEY not in metadata:
        return DecoderConfig()
    try:
        return DecoderConfig.from_json(metadata[DECODER_CONFIG_METADATA_KEY])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: unreadable {DECODER_CONFIG_METADATA_KEY} metadata ({e})") from None


def load_sam(checkpoint: CheckpointSource, model: ModelSpec = None, device: Device = None,
             dtype: DtypeArg = None, with_encoder: bool = True, kernel: str = DEFAULT_KERNEL,
             progress: Optional[bool] = None, attn_impl: Optional[str] = None, img_size: Optional[int] = None
             ) -> Tuple[Optional[Encoder], SamDecoder]:
    """Encoder and decoder from one read of a full SAM checkpoint.

    Args:
        checkpoint: as for load_encoder (a full SAM model).
        model: the encoder's preset or EncoderConfig; None: from the file's metadata, else inferred.
        device: for both. dtype: the encoder's compute dtype (None: float32, the default; "auto", a dtype or
            its name; as load_encoder); the decoder (cheap) stays float32.
        with_encoder: False skips the encoder (for precomputed embeddings); its tensors need not be present.
        kernel: the encoder's attention kernel (attn_impl: its former name, wins when given).
        progress: download/verification bar (None: only on a terminal).
        img_size: the input side (as load_encoder); the decoder's embedding grid and input frame follow it.
    Returns:
        (encoder in eval mode or None, decoder in eval mode); the decoder's image sizes follow the encoder's.
    """
    encoder, decoder, _, _ = _load_sam(checkpoint, model, device, dtype, with_encoder, attn_impl or kernel, progress,
                                       img_size)
    return encoder, decoder


def _load_sam(checkpoint: CheckpointSource, model: ModelSpec, device: Device, dtype: DtypeArg,
              with_encoder: bool, kernel: str, progress: Optional[bool], img_size: Optional[int] = None
              ) -> Tuple[Optional[Encoder], SamDecoder, Optional[AnyEncoderConfig], str]:
    """load_sam, plus the encoder config at img_size (None when neither given, stored nor inferable) and the
    source file."""
    dev = as_device(device)
    dtype = resolve_dtype(dtype, dev or torch.device("cpu")) if with_encoder else None
    sd, metadata, source = read_official(checkpoint, progress)
    esd = _encoder_part(sd) if any(k.startswith(ENCODER_PREFIX) for k in sd) else {}
    cfg = encoder_config(model, metadata, esd, source) if (model is not None or esd or CONFIG_METADATA_KEY in metadata) \
        else None
    encoder = None
    if with_encoder:
        if not esd:
            raise CheckpointError(f"{source}: no image_encoder.* tensors; pass with_encoder=False and use "
                                  "set_embedding, or give a full SAM checkpoint")
        encoder = _finish(_build_encoder(esd, cfg, source, kernel, img_size), device, dtype)
    base = infer_decoder_config(sd, decoder_base(metadata, source), source=source)
    if cfg is not None:
        cfg = with_img_size(cfg, img_size)
        base = base.replace(image_embedding_size=cfg.grid_size, input_image_size=cfg.img_size)
    elif img_size is not None:
        patch = base.input_image_size // base.image_embedding_size
        if img_size % patch:
            raise ParameterError(f"img_size must be a multiple of the patch size {patch}, got {img_size}")
        base = base.replace(image_embedding_size=img_size // patch, input_image_size=img_size)
    check_hq_fits(cfg, base, source)
    return encoder, _finish(_build_decoder(sd, base, source), device, None), cfg, source


def save_encoder(encoder: Encoder, path: PathLike, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write the encoder's weights as safetensors (atomically), with its config in the metadata."""
    meta = {CONFIG_METADATA_KEY: encoder.config.to_json(), "format": "samvit"}
    meta.update(metadata or {})
    write_tensors(path, encoder.state_dict(), meta)


def checkpoint_info(checkpoint: PathLike) -> Dict[str, object]:
    """Config, parameter count and dtypes of a checkpoint's encoder, without building the model on real memory."""
    sd, metadata, source = read_official(checkpoint)
    hq = hq_vit_dim(sd)
    sd = _encoder_part(sd)
    cfg = encoder_config(None, metadata, sd, source)
    n = _tinyvit.num_parameters(sd) if isinstance(cfg, TinyViTConfig) else sum(v.numel() for v in sd.values())
    info = {"config": cfg, "num_parameters": n,
            "dtypes": sorted({str(v.dtype) for v in sd.values()}), "metadata": json.dumps(metadata), "hq": None}
    if hq:  # HQ-SAM: its decoder also takes the encoder's early features
        check_hq_fits(cfg, DecoderConfig(hq_vit_dim=hq), source)
        info["hq"] = {"early_block": hq_early_block(cfg), "early_features": [hq, cfg.grid_size, cfg.grid_size]}
    return info
