"""Loading the prompt encoder + mask decoder from a full SAM checkpoint; key maps official <-> transformers."""
from __future__ import annotations

import os
import re
from typing import Dict, Optional, Union

import torch

from .modeling.mask_decoder import DecoderConfig, SamDecoder
from .weights import CheckpointError, StateDict, read_checkpoint

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
    full, sd = sd, from_transformers(sd) if any(k.startswith(HF_PREFIXES) for k in sd) else sd
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
    pos = full.get("image_encoder.pos_embed", full.get("vision_encoder.pos_embed"))
    patch = full.get("image_encoder.patch_embed.proj.weight", full.get("vision_encoder.patch_embed.projection.weight"))
    if pos is not None and patch is not None:
        cfg = cfg.replace(image_embedding_size=pos.shape[1], input_image_size=pos.shape[1] * patch.shape[-1])
    return cfg


def check_decoder_state_dict(sd: StateDict, cfg: DecoderConfig, source: str = "checkpoint") -> None:
    """Raise CheckpointError naming every missing, unexpected and wrongly shaped decoder key."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in SamDecoder(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {expected[k]}"
                   for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k])
    if missing or unexpected or wrong:
        parts = [f"{source}: prompt encoder / mask decoder do not fit {cfg}:"]
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointError("\n  ".join(parts))


def load_decoder(checkpoint: CheckpointSource, config: Optional[DecoderConfig] = None,
                 device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None) -> SamDecoder:
    """Build a SamDecoder and load the prompt encoder and mask decoder of a full SAM checkpoint.

    `checkpoint` is a path (official .pth read with weights_only, or .safetensors) or a state dict with official
    key names (transformers SamModel keys are mapped). Without `config`, widths and depths are inferred from the
    tensors and num_heads is 8, as in every released model.
    """
    source = "state dict" if isinstance(checkpoint, dict) else os.fspath(checkpoint)
    sd = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)[0]
    full = sd
    sd = from_transformers(sd) if any(k.startswith(HF_PREFIXES) for k in sd) else decoder_state_dict(sd)
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


# ---- transformers SamModel <-> official key names (prompt encoder and mask decoder) ----

HF_PREFIXES = ("prompt_encoder.shared_embedding.", "prompt_encoder.mask_embed.", "prompt_encoder.point_embed.",
               "mask_decoder.upscale_conv1.", "shared_image_embedding.")
_FIXED = {
    "prompt_encoder.mask_downscaling.0.": "prompt_encoder.mask_embed.conv1.",
    "prompt_encoder.mask_downscaling.1.": "prompt_encoder.mask_embed.layer_norm1.",
    "prompt_encoder.mask_downscaling.3.": "prompt_encoder.mask_embed.conv2.",
    "prompt_encoder.mask_downscaling.4.": "prompt_encoder.mask_embed.layer_norm2.",
    "prompt_encoder.mask_downscaling.6.": "prompt_encoder.mask_embed.conv3.",
    "prompt_encoder.point_embeddings.": "prompt_encoder.point_embed.",
    "mask_decoder.output_upscaling.0.": "mask_decoder.upscale_conv1.",
    "mask_decoder.output_upscaling.1.": "mask_decoder.upscale_layer_norm.",
    "mask_decoder.output_upscaling.3.": "mask_decoder.upscale_conv2.",
    "mask_decoder.transformer.norm_final_attn.": "mask_decoder.transformer.layer_norm_final_attn.",
}
_PE_OFFICIAL = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
_PE_HF = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")
_MLP = re.compile(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.(\d+)\.(.*)$")
_NORM = re.compile(r"^(mask_decoder\.transformer\.layers\.\d+)\.norm(\d)\.(.*)$")


def _mlp_depths(keys, pattern: re.Pattern) -> Dict[str, int]:
    depths: Dict[str, int] = {}
    for k in keys:
        m = pattern.match(k)
        if m:
            depths[m.group(1)] = max(depths.get(m.group(1), 0), int(m.group(2)) + 1)
    return depths


def official_to_transformers_key(key: str, mlp_depth: int = 3) -> str:
    """One official decoder key -> its transformers SamModel name (MLPs of `mlp_depth` linear layers)."""
    if key == _PE_OFFICIAL:
        return _PE_HF[0]
    for a, b in _FIXED.items():
        if key.startswith(a):
            return b + key[len(a):]
    m = _NORM.match(key)
    if m:
        return f"{m.group(1)}.layer_norm{m.group(2)}.{m.group(3)}"
    m = _MLP.match(key)
    if m:
        i = int(m.group(2))
        name = "proj_in" if i == 0 else "proj_out" if i == mlp_depth - 1 else f"layers.{i - 1}"
        return f"{m.group(1)}.{name}.{m.group(3)}"
    return key


def to_transformers(sd: StateDict) -> StateDict:
    """Official prompt encoder / mask decoder tensors -> transformers SamModel names (other keys dropped)."""
    sd = decoder_state_dict(sd)
    depths = _mlp_depths(sd, _MLP)
    out: StateDict = {}
    for k, v in sd.items():
        m = _MLP.match(k)
        out[official_to_transformers_key(k, depths[m.group(1)] if m else 3)] = v
    if _PE_OFFICIAL in sd:
        out[_PE_HF[1]] = sd[_PE_OFFICIAL]  # transformers keeps the same matrix under two names
    return out


def from_transformers(sd: StateDict) -> StateDict:
    """transformers SamModel prompt encoder / mask decoder tensors -> official key names (other keys dropped)."""
    hf_mlp = re.compile(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\."
                        r"(proj_in|proj_out|layers\.(\d+))\.(.*)$")
    hidden: Dict[str, int] = {}
    for k in sd:
        m = hf_mlp.match(k)
        if m and m.group(3) is not None:
            hidden[m.group(1)] = max(hidden.get(m.group(1), 0), int(m.group(3)) + 1)
    inverse = {b: a for a, b in _FIXED.items()}
    out: StateDict = {}
    for k, v in sd.items():
        if k in _PE_HF:
            out[_PE_OFFICIAL] = v
            continue
        if not k.startswith(DECODER_PREFIXES):
            continue
        m = hf_mlp.match(k)
        if m:
            part = m.group(2)
            i = 0 if part == "proj_in" else hidden.get(m.group(1), 0) + 1 if part == "proj_out" else int(m.group(3)) + 1
            out[f"{m.group(1)}.layers.{i}.{m.group(4)}"] = v
            continue
        m = re.match(r"^(mask_decoder\.transformer\.layers\.\d+)\.layer_norm(\d)\.(.*)$", k)
        if m:
            out[f"{m.group(1)}.norm{m.group(2)}.{m.group(3)}"] = v
            continue
        for b, a in inverse.items():
            if k.startswith(b):
                k = a + k[len(b):]
                break
        out[k] = v
    return out
