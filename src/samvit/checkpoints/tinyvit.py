"""TinyViT (MobileSAM) checkpoints: recognising their encoder tensors, dropping the classifier head they carry,
and the architecture read from the tensors' shapes (MobileSAM's `mobile_sam.pt`, segment-anything-hq's
`sam_hq_vit_tiny.pth`, samvit's own files)."""
from __future__ import annotations

import re
from typing import Dict

import torch

from ..config import TINYVIT_PRESETS, TinyViTConfig
from .files import CheckpointError, StateDict, check_keys

# The official TinyViT keeps an ImageNet classifier (norm_head, head: 1000 classes) that SAM never runs.
HEAD_PREFIXES = ("norm_head.", "head.")
_MARK = "patch_embed.seq.0.c.weight"
_STEPS = "num_batches_tracked"


def is_tinyvit(sd: StateDict) -> bool:
    """True for a TinyViT encoder state dict (bare encoder names, as load._encoder_part gives them)."""
    return _MARK in sd


def drop_head(sd: StateDict) -> StateDict:
    """The encoder tensors without the unused classifier head, each BatchNorm's step counter present (a file
    without them, e.g. one saved without buffers, gets 0: it is not used in inference nor with a set momentum)."""
    out = {k: v for k, v in sd.items() if not k.startswith(HEAD_PREFIXES)}
    for k in list(out):
        if k.endswith(".bn.running_mean"):
            out.setdefault(k[:-len("running_mean")] + _STEPS, torch.tensor(0, dtype=torch.long))
    return out


def _count(sd: StateDict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return 1 + max((int(m.group(1)) for k in sd for m in [pat.match(k)] if m), default=-1)


def infer_tinyvit_config(sd: StateDict, source: str = "checkpoint") -> TinyViTConfig:
    """The TinyViTConfig whose tensors have these names and shapes: a preset's (with its name) when one fits, else
    a config named "tinyvit" (CheckpointError naming `source` when the tensors are not a TinyViT's)."""
    try:
        n = _count(sd, "layers.")
        dims, depths, heads, windows = [], [], [], []
        for i in range(n):
            depths.append(_count(sd, f"layers.{i}.blocks."))
            if i == 0:
                w = sd["layers.0.blocks.0.conv1.c.weight"]
                dims.append(w.shape[1])
                expand = w.shape[0] / w.shape[1]
                heads.append(max(1, w.shape[1] // 32))  # stage 0 has no attention: the official values (unused)
                windows.append(7)
                continue
            bias = sd[f"layers.{i}.blocks.0.attn.attention_biases"]
            dims.append(sd[f"layers.{i}.blocks.0.attn.norm.weight"].shape[0])
            heads.append(bias.shape[0])
            ws = round(bias.shape[1] ** 0.5)
            if ws * ws != bias.shape[1]:
                raise CheckpointError(f"{source}: layers.{i} attention_biases has {bias.shape[1]} offsets, not a "
                                      "square window's")
            windows.append(ws)
        fc1 = sd["layers.1.blocks.0.mlp.fc1.weight"]
        cfg = TinyViTConfig(
            embed_dims=tuple(dims), depths=tuple(depths), num_heads=tuple(heads), window_sizes=tuple(windows),
            mlp_ratio=fc1.shape[0] / fc1.shape[1], mbconv_expand_ratio=expand,
            local_conv_size=sd["layers.1.blocks.0.local_conv.c.weight"].shape[-1],
            out_chans=sd["neck.0.weight"].shape[0], in_chans=sd[_MARK].shape[1], name="tinyvit")
    except KeyError as e:
        raise CheckpointError(f"{source}: not a TinyViT encoder this version reads: no {e.args[0]!r} tensor") from None
    except ValueError as e:
        raise CheckpointError(f"{source}: its TinyViT tensors do not make a valid model ({e})") from None
    for p in TINYVIT_PRESETS.values():
        if p == cfg:
            return p
    check_tinyvit_state_dict(sd, cfg, source)
    return cfg


_SHAPES: Dict[TinyViTConfig, Dict[str, tuple]] = {}


def expected_shapes(cfg: TinyViTConfig) -> Dict[str, tuple]:
    """Every tensor name and shape of a TinyViT encoder of this config (built on the meta device)."""
    from ..modeling.tinyvit import TinyViT

    if cfg not in _SHAPES:
        with torch.device("meta"):
            model = TinyViT(cfg)
        _SHAPES[cfg] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return _SHAPES[cfg]


def check_tinyvit_state_dict(sd: StateDict, cfg: TinyViTConfig, source: str = "checkpoint") -> None:
    """Raise CheckpointError naming every missing, unexpected and wrongly shaped TinyViT key."""
    header = f"{source} does not fit model {cfg.name!r}:"
    steps = {k for k in sd if k.endswith(_STEPS)}
    check_keys({k: v for k, v in sd.items() if k not in steps},
               {k: v for k, v in expected_shapes(cfg).items() if not k.endswith(_STEPS)}, header)
    bad = sorted(k for k in steps if sd[k].is_floating_point() or sd[k].numel() != 1)
    if bad:
        raise CheckpointError(f"{header}\n  not an integer counter: {', '.join(bad[:8])}")


def num_parameters(sd: StateDict) -> int:
    """Learned parameters of a TinyViT state dict (BatchNorm running statistics are not counted)."""
    return sum(v.numel() for k, v in sd.items()
               if not k.endswith(("running_mean", "running_var", _STEPS)))
