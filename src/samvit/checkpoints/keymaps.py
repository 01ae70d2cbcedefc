"""Key maps between the official SAM layout and the transformers (SamModel / SamVisionModel) and timm (samvit_*)
layouts, and layout detection. Only names change: every tensor is passed through as is
(all three keep the fused qkv projection and the same relative position tables)."""
from __future__ import annotations

import re
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from .files import CheckpointError, StateDict
from ..errors import ParameterError

FORMATS = ("official", "transformers", "timm")
ENCODER_PREFIX = "image_encoder."
DECODER_PREFIXES = ("prompt_encoder.", "mask_decoder.")

# (official, transformers) name pairs, matched as whole keys; {n} is a number.
_HF_ENCODER = [
    ("image_encoder.pos_embed", "vision_encoder.pos_embed"),
    ("image_encoder.patch_embed.proj.{p}", "vision_encoder.patch_embed.projection.{p}"),
    ("image_encoder.blocks.{n}.norm1.{p}", "vision_encoder.layers.{n}.layer_norm1.{p}"),
    ("image_encoder.blocks.{n}.norm2.{p}", "vision_encoder.layers.{n}.layer_norm2.{p}"),
    ("image_encoder.blocks.{n}.attn.{p}", "vision_encoder.layers.{n}.attn.{p}"),
    ("image_encoder.blocks.{n}.mlp.{p}", "vision_encoder.layers.{n}.mlp.{p}"),
    ("image_encoder.neck.0.{p}", "vision_encoder.neck.conv1.{p}"),
    ("image_encoder.neck.1.{p}", "vision_encoder.neck.layer_norm1.{p}"),
    ("image_encoder.neck.2.{p}", "vision_encoder.neck.conv2.{p}"),
    ("image_encoder.neck.3.{p}", "vision_encoder.neck.layer_norm2.{p}"),
]
_HF_PROMPT_DECODER = [
    ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "shared_image_embedding.positional_embedding"),
    ("prompt_encoder.point_embeddings.{n}.{p}", "prompt_encoder.point_embed.{n}.{p}"),
    ("prompt_encoder.mask_downscaling.0.{p}", "prompt_encoder.mask_embed.conv1.{p}"),
    ("prompt_encoder.mask_downscaling.1.{p}", "prompt_encoder.mask_embed.layer_norm1.{p}"),
    ("prompt_encoder.mask_downscaling.3.{p}", "prompt_encoder.mask_embed.conv2.{p}"),
    ("prompt_encoder.mask_downscaling.4.{p}", "prompt_encoder.mask_embed.layer_norm2.{p}"),
    ("prompt_encoder.mask_downscaling.6.{p}", "prompt_encoder.mask_embed.conv3.{p}"),
    ("prompt_encoder.{p}", "prompt_encoder.{p}"),
    ("mask_decoder.transformer.layers.{n}.norm{m}.{p}", "mask_decoder.transformer.layers.{n}.layer_norm{m}.{p}"),
    ("mask_decoder.transformer.norm_final_attn.{p}", "mask_decoder.transformer.layer_norm_final_attn.{p}"),
    ("mask_decoder.output_upscaling.0.{p}", "mask_decoder.upscale_conv1.{p}"),
    ("mask_decoder.output_upscaling.1.{p}", "mask_decoder.upscale_layer_norm.{p}"),
    ("mask_decoder.output_upscaling.3.{p}", "mask_decoder.upscale_conv2.{p}"),
    ("mask_decoder.{p}", "mask_decoder.{p}"),
]
# transformers keeps this tensor twice (tied); the copy is dropped on the way in and written back on the way out.
_HF_TIED = ("prompt_encoder.shared_embedding.positional_embedding", "shared_image_embedding.positional_embedding")
# The decoder's MLPs: official layers.0..L-1 <-> transformers proj_in, layers.0..L-3, proj_out.
_HF_MLP = re.compile(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.(.+)$")
_TIMM = [("blocks.{n}.mlp.lin{m}.{p}", "blocks.{n}.mlp.fc{m}.{p}")]
# timm's samvit_* carries a classifier head (`head.*`) that SAM does not have.
_TIMM_HEAD = "head."


def _compile(pattern: str) -> "re.Pattern[str]":
    rx = re.escape(pattern).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{m\}", r"(?P<m>\d+)")
    return re.compile("^" + rx.replace(r"\{p\}", r"(?P<p>.+)") + "$")


def _rename(sd: StateDict, pairs: List[Tuple[str, str]], reverse: bool) -> Tuple[StateDict, StateDict]:
    """Rename keys by the first matching pair; returns (renamed, unmatched)."""
    rules = [(_compile(b if reverse else a), a if reverse else b) for a, b in pairs]
    out, rest = {}, {}
    for k, v in sd.items():
        for rx, target in rules:
            m = rx.match(k)
            if m:
                out[target.format(**m.groupdict())] = v
                break
        else:
            rest[k] = v
    return out, rest


def _mlp_layers(sd: StateDict, to_hf: bool) -> StateDict:
    """Renumber the decoder's MLP layers between the two layouts; other keys pass through."""
    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    out = {}
    for k, v in sd.items():
        m = _HF_MLP.match(k)
        if m:
            groups.setdefault(m.group(1), {})[m.group(2)] = v
        else:
            out[k] = v
    for prefix, items in groups.items():
        if to_hf:
            last = max(int(k.split(".")[1]) for k in items)
            for k, v in items.items():
                i, p = int(k.split(".")[1]), k.split(".", 2)[2]
                name = "proj_in" if i == 0 else "proj_out" if i == last else f"layers.{i - 1}"
                out[f"{prefix}.{name}.{p}"] = v
        else:
            inner = 1 + max((int(k.split(".")[1]) for k in items if k.startswith("layers.")), default=-1)
            for k, v in items.items():
                head, p = k.rsplit(".", 1)
                i = 0 if head == "proj_in" else inner + 1 if head == "proj_out" else int(head.split(".")[1]) + 1
                out[f"{prefix}.layers.{i}.{p}"] = v
    return out


def detect_format(sd: StateDict) -> str:
    """'transformers', 'timm' or 'official', from the key names."""
    keys = list(sd)
    if any(k.startswith("vision_encoder.") or re.match(r"^layers\.\d+\.layer_norm1\.", k)
           or k.startswith("patch_embed.projection.") for k in keys):
        return "transformers"
    if any(re.match(r"^blocks\.\d+\.mlp\.fc1\.", k) for k in keys):
        return "timm"
    return "official"


def _is_full(sd: StateDict) -> bool:
    return any(k.startswith(("image_encoder.", "vision_encoder.")) for k in sd)


def to_official(sd: StateDict, fmt: Optional[str] = None) -> StateDict:
    """Rename a state dict of any supported layout to the official names.

    A full SAM model gives `image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`; an encoder alone gives the
    bare encoder names (`blocks.0.attn.qkv.weight`, ...).
    """
    fmt = fmt or detect_format(sd)
    if fmt == "official":
        return dict(sd)
    if fmt == "timm":
        head = sorted(k for k in sd if k.startswith(_TIMM_HEAD))
        if head:
            warnings.warn(f"dropping timm's classifier head ({', '.join(head)}): SAM has no such layer")
        out, rest = _rename({k: v for k, v in sd.items() if k not in head}, _TIMM, reverse=True)
        return {**out, **rest}
    if fmt != "transformers":
        raise ParameterError(f"unknown checkpoint layout {fmt!r}; expected one of {', '.join(FORMATS)}")
    full = _is_full(sd)
    if not full:  # a bare SamVisionEncoder state dict
        sd = {"vision_encoder." + k: v for k, v in sd.items()}
    sd = dict(sd)
    tied = sd.pop(_HF_TIED[0], None)
    if tied is not None and _HF_TIED[1] in sd and not torch.equal(tied, sd[_HF_TIED[1]]):
        raise CheckpointError(f"transformers checkpoint: {_HF_TIED[0]} and {_HF_TIED[1]} should be the same "
                              f"tensor but differ")
    if tied is not None and _HF_TIED[1] not in sd:
        sd[_HF_TIED[1]] = tied
    out, rest = _rename(sd, _HF_ENCODER + _HF_PROMPT_DECODER, reverse=True)
    out = _mlp_layers(out, to_hf=False)
    out.update(rest)
    if not full:
        out = {k[len("image_encoder."):] if k.startswith("image_encoder.") else k: v for k, v in out.items()}
    return out


def from_official(sd: StateDict, fmt: str) -> StateDict:
    """Rename an official-layout state dict (full SAM or encoder alone) to `fmt`.

    transformers: the SamModel names for a full SAM model, the SamVisionModel names (`vision_encoder.*`) for an
    encoder; timm: the encoder only (other tensors are dropped with a warning); official: `image_encoder.*` keys.
    """
    full = any(k.startswith("image_encoder.") for k in sd)
    enc = {k[len("image_encoder."):]: v for k, v in sd.items() if k.startswith("image_encoder.")} if full else sd
    if fmt == "official":
        return dict(sd) if full else {"image_encoder." + k: v for k, v in sd.items()}
    if fmt == "timm":
        if full and len(enc) < len(sd):
            warnings.warn("the timm layout holds the image encoder only: the prompt encoder and mask decoder "
                          "tensors are not written")
        out, rest = _rename(enc, _TIMM, reverse=False)
        return {**out, **rest}
    if fmt != "transformers":
        raise ParameterError(f"unknown checkpoint layout {fmt!r}; expected one of {', '.join(FORMATS)}")
    check_not_hq(sd, "the transformers SamModel layout")
    src = sd if full else {"image_encoder." + k: v for k, v in sd.items()}
    out, rest = _rename(src, _HF_ENCODER + _HF_PROMPT_DECODER, reverse=False)
    if rest:
        raise CheckpointError(f"cannot map to the transformers layout: {', '.join(sorted(rest)[:8])}")
    out = _mlp_layers(out, to_hf=True)
    if _HF_TIED[1] in out:
        out[_HF_TIED[0]] = out[_HF_TIED[1]].clone()
    return out


# HQ-SAM's mask decoder tensors beyond SAM's (official segment-anything-hq names)
HQ_DECODER_PREFIXES = tuple(f"mask_decoder.{n}." for n in ("hf_token", "hf_mlp", "compress_vit_feat",
                                                             "embedding_encoder", "embedding_maskfeature"))


def check_not_hq(sd: StateDict, layout: str) -> None:
    """CheckpointError when an official-layout state dict is HQ-SAM's (its extra decoder tensors have no place in
    `layout`)."""
    hq = sorted(k for k in sd if k.startswith(HQ_DECODER_PREFIXES))
    if hq:
        raise CheckpointError(f"an HQ-SAM checkpoint ({hq[0]}, ...) cannot be written in {layout}: its mask decoder "
                              "is not SAM's; keep the official layout")


def encoder_state_dict(sd: StateDict) -> StateDict:
    """The encoder's tensors under official key names, from an official, transformers or timm state dict."""
    sd = to_official(sd)
    if any(k.startswith(ENCODER_PREFIX) for k in sd):
        return {k[len(ENCODER_PREFIX):]: v for k, v in sd.items() if k.startswith(ENCODER_PREFIX)}
    return dict(sd)


def decoder_state_dict(sd: StateDict) -> StateDict:
    """The `prompt_encoder.*` and `mask_decoder.*` tensors of a full SAM state dict (official key names)."""
    return {k: v for k, v in to_official(sd).items() if k.startswith(DECODER_PREFIXES)}
