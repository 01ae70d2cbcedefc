"""Loading the prompt encoder + mask decoder from a full SAM checkpoint (official or transformers layout)."""
from __future__ import annotations

import os
import re
from typing import Optional, Union

import torch

from .convert import to_official
from .modeling.mask_decoder import DecoderConfig, SamDecoder
from .weights import CheckpointError, StateDict, check_keys, read_checkpoint

DECODER_PREFIXES = ("prompt_encoder.", "mask_decoder.")
CheckpointSource = Union[str, os.PathLike, StateDict]


def decoder_state_dict(sd: StateDict) -> StateDict:
    """The `prompt_encoder.*` and `mask_decoder.*` tensors of a full SAM state dict (official key names)."""
    return {k: v for k, v in sd.items() if k.startswith(DECODER_PREFIXES)}


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
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: not a full SAM checkpoint: no {e.args[0]!r} tensor (the prompt_encoder.* "
                              "and mask_decoder.* tensors are needed; an encoder-only file has neither)") from None
    pos = sd.get("image_encoder.pos_embed")
    patch = sd.get("image_encoder.patch_embed.proj.weight")
    if pos is not None and patch is not None:
        cfg = cfg.replace(image_embedding_size=pos.shape[1], input_image_size=pos.shape[1] * patch.shape[-1])
    return cfg


def check_decoder_state_dict(sd: StateDict, cfg: DecoderConfig, source: str = "checkpoint") -> None:
    """Raise CheckpointError naming every missing, unexpected and wrongly shaped decoder key."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in SamDecoder(cfg).state_dict().items()}
    check_keys(sd, expected, f"{source}: prompt encoder / mask decoder do not fit {cfg}:")


def load_decoder(checkpoint: CheckpointSource, config: Optional[DecoderConfig] = None,
                 device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None) -> SamDecoder:
    """Build a SamDecoder and load the prompt encoder and mask decoder of a full SAM checkpoint.

    `checkpoint` is a path (official .pth read with weights_only, or .safetensors) or a state dict with official
    key names (transformers SamModel keys are mapped). Without `config`, widths and depths are inferred from the
    tensors and num_heads is 8, as in every released model.
    """
    source = "state dict" if isinstance(checkpoint, dict) else os.fspath(checkpoint)
    sd = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)[0]
    full = to_official(sd)
    sd = decoder_state_dict(full)
    if not sd:
        raise CheckpointError(f"{source}: no prompt_encoder.* / mask_decoder.* tensors: a full SAM checkpoint "
                              "(e.g. sam_vit_b_01ec64.pth) is needed, not an encoder-only file")
    cfg = config if config is not None else infer_decoder_config(full, source=source)
    check_decoder_state_dict(sd, cfg, source)
    with torch.device("meta"):
        decoder = SamDecoder(cfg)
    decoder.load_state_dict(sd, strict=True, assign=True)
    decoder.eval()
    if device is not None or dtype is not None:
        decoder.to(device=device, dtype=dtype)
    return decoder
